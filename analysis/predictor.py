"""Cluster-scale predictor: step time, tokens/s/GPU, TFLOPS, MFU, peak memory and goodput from formulas alone.

Start at ``predict()``. It needs no job: a model shape, a cluster description and technique choices go in, a
``Prediction`` comes out. The method (docs/predictor.md has the derivations and the sources of every default):

    compute   per-operator time: GEMM FLOPs / (gemm_eff x peak) + attention FLOPs / (attn_eff x peak)
              + memory-bound bytes (norms, RoPE, SwiGLU, residuals, softmax, loss, optimizer) / HBM bandwidth
    comm      alpha-beta ring models of flat and hierarchical collectives, per bucket, hidden behind the
              backward pass when overlap is on (all but the last bucket)
    memory    Korthikanti et al. 2022 activation formulas + mixed-precision Adam states sharded by ZeRO stage
    goodput   Young/Daly checkpoint intervals and the first-order useful-time fraction

    python -m analysis.predictor --model baichuan_7b --cluster a800_1024 --seq 4096 --micro-batch 1 --techniques all
    python -m analysis.predictor --validate   # vs Baichuan-7B and MPT-7B; writes docs/predictor_validation.json
    python -m analysis.predictor --calibrate runs/a runs/b   # fit cpu_local to this machine's measured runs

Imports only pure formulas (analysis.flops); never training code.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from analysis.flops import DEFAULT_CONVENTION

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only transformer's dimensions."""

    name: str = "custom"
    n_layers: int
    dim: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    mlp_matrices: int = 3  # 3 for SwiGLU (gate/up/down, Baichuan), 2 for a GELU MLP (MPT)
    tied_embeddings: bool = False  # MPT ties the LM head to the input embedding

    def matmul_params(self) -> int:
        """N (analysis/flops.py): attention 4h^2 + MLP m*h*f per layer, plus the LM head V*h."""
        return self.n_layers * (4 * self.dim**2 + self.mlp_matrices * self.dim * self.ffn_dim) + \
            self.vocab_size * self.dim

    def total_params(self) -> int:
        """N + the input embedding (unless tied) + norm weights (2 per layer + final)."""
        embed = 0 if self.tied_embeddings else self.vocab_size * self.dim
        return self.matmul_params() + embed + (2 * self.n_layers + 1) * self.dim

    def model_flops_per_token(self, seq_len: int) -> float:
        """PaLM convention (chuanliu's MFU): 6N + 12*L*h*T. Equals analysis.flops 'palm' for SwiGLU shapes."""
        return 6.0 * self.matmul_params() + 12.0 * self.n_layers * self.dim * seq_len


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs and the links between them. Bandwidths in GB/s (1e9 B/s), latencies in microseconds."""

    name: str
    device: str  # key of analysis.peaks.PEAK_TFLOPS, or 'cpu'
    gpus: int
    gpus_per_node: int
    peak_tflops: dict[str, float]  # dense peak per dtype
    hbm_gb: float  # memory per GPU
    hbm_gbps: float  # nominal memory bandwidth per GPU
    nvlink_gbps: float  # achieved intra-node bus bandwidth per GPU (nccl-tests busbw)
    nvlink_latency_us: float
    net_gbps: float  # inter-node bandwidth per node, all NICs together, one direction
    net_latency_us: float

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


# A800 = A100 compute and HBM with NVLink capped at 400 GB/s bidirectional (200 GB/s one way; nccl-tests busbw
# ~155 GB/s) instead of 600. Baichuan did not publish its network: we assume 4 x 200 Gb/s HDR per 8-GPU node
# (100 GB/s), a common A800 build; docs/predictor.md shows the 8-NIC variant.
_A100 = dict(device="a100", peak_tflops={"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
             hbm_gb=80.0, hbm_gbps=2039.0, nvlink_latency_us=8.0, net_latency_us=15.0)
CLUSTERS: dict[str, Cluster] = {
    "a800_1024": Cluster(name="a800_1024", **{**_A100, "device": "a800"}, gpus=1024, gpus_per_node=8,
                         nvlink_gbps=155.0, net_gbps=100.0),
    "a100_8": Cluster(name="a100_8", **_A100, gpus=8, gpus_per_node=8, nvlink_gbps=230.0, net_gbps=200.0),
    "h100_1024": Cluster(name="h100_1024", device="h100_sxm",
                         peak_tflops={"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "fp8": 1978.9},
                         hbm_gb=80.0, hbm_gbps=3350.0, gpus=1024, gpus_per_node=8, nvlink_gbps=360.0,
                         nvlink_latency_us=8.0, net_gbps=400.0, net_latency_us=15.0),  # 8 x 400 Gb/s NDR
}


@dataclass(frozen=True, kw_only=True)
class Efficiencies:
    """Achieved fraction of the device's peak per operator class (docs/predictor.md: sources)."""

    gemm: float = 0.75  # cuBLAS bf16 GEMMs of training shapes, A100 (best-shape MAMF ~0.86)
    flash_attn: float = 0.55  # FlashAttention-2 fwd+bwd, causal, head dim 128, A100 (paper: 50-73%)
    hbm: float = 0.80  # achieved / nominal HBM bandwidth for streaming kernels
    step_overhead_s: float = 0.0  # fixed cost per step (launches, Python, data); fitted on a CPU


GPU_EFFICIENCIES = Efficiencies()


@dataclass(frozen=True, kw_only=True)
class Techniques:
    """Technique choices: Baichuan's list, in the predictor's terms."""

    flash_attn: bool = False  # fused attention (no T x T scores in memory)
    fused_ops: bool = False  # fused RMSNorm / SwiGLU / RoPE / linear-cross-entropy kernels
    recompute: str = "none"  # none | selective (attention core) | full (whole layers)
    chunked_ce: bool = False  # the (tokens x vocab) logits never exist whole
    precision: str = "bf16"  # bf16 | fp32
    zero_stage: int = 0  # 0 DDP, 1 optimizer states, 2 + gradients, 3 + parameters (FSDP full shard)
    collective: str = "flat"  # flat | hierarchical
    bucket_mb: float | None = 25.0  # gradient bucket; None = Megatron-core's rule max(40M, 1M x dp) elements
    overlap: bool = False  # reduce buckets during the backward pass
    checkpoint_block_s: float = 60.0  # training blocked per checkpoint (sync save of a 7B job)
    checkpoint_interval_s: float | None = None  # None = Young's optimum
    restart_s: float = 600.0  # detect + restart + reload after a failure
    gpu_mtbf_h: float = 50_000.0  # per-GPU MTBF: Llama 3 (Meta 2024), 419 interruptions / 54 days / 16k GPUs


TECHNIQUES = {
    "none": Techniques(),
    # Baichuan-7B's list: flash-attn, fused RMSNorm, activation splitting, bf16, ZeRO-2, topology-aware comm,
    # bucket size by GPU count, overlap, async checkpoints.
    "all": Techniques(flash_attn=True, fused_ops=True, recompute="selective", chunked_ce=True, zero_stage=2,
                      collective="hierarchical", bucket_mb=None, overlap=True, checkpoint_block_s=5.0),
}
RECOMPUTE = ("none", "selective", "full")
COLLECTIVES = ("flat", "hierarchical")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ----------------------------------------------------------------------------------------------- output
@dataclass(kw_only=True)
class Prediction:
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    convention: str
    peak_memory_bytes: float
    fits_memory: bool
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    goodput: float
    effective_tokens_per_s_per_gpu: float
    breakdown: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- α-β comm
def ring_allreduce_s(n_bytes: float, p: int, alpha_s: float, bw_Bps: float) -> float:
    """Ring all-reduce: 2(p-1) steps of latency alpha, each GPU moves 2(p-1)/p * n bytes."""
    return 0.0 if p <= 1 else 2 * (p - 1) * alpha_s + 2 * (p - 1) / p * n_bytes / bw_Bps


def ring_half_s(n_bytes: float, p: int, alpha_s: float, bw_Bps: float) -> float:
    """Ring reduce-scatter or all-gather of n bytes (the full buffer): (p-1) alpha + (p-1)/p * n / B."""
    return 0.0 if p <= 1 else (p - 1) * alpha_s + (p - 1) / p * n_bytes / bw_Bps


def _links(c: Cluster) -> tuple[float, float, float, float]:
    """(alpha_nv, B_nv, alpha_net, B_net per GPU) in seconds and bytes/s."""
    return (c.nvlink_latency_us * 1e-6, c.nvlink_gbps * GB, c.net_latency_us * 1e-6,
            c.net_gbps * GB / c.gpus_per_node)


def collective_s(kind: str, n_bytes: float, c: Cluster, algorithm: str) -> float:
    """Time of one collective over all GPUs of the cluster. kind: allreduce | reducescatter | allgather.

    flat: one ring over every GPU; when it spans nodes every hop runs at the slowest link, a GPU's share of
    its node's NICs (the topology-unaware textbook ring). hierarchical: intra-node reduce-scatter over NVLink,
    inter-node collective among the g same-rank GPUs on n/g bytes (one rail each), intra-node all-gather.
    With one node both are the same ring over NVLink.
    """
    a_nv, b_nv, a_net, b_net = _links(c)
    p, g, nodes = c.gpus, min(c.gpus_per_node, c.gpus), c.nodes
    if nodes == 1 or algorithm == "flat":
        alpha, bw = (a_nv, b_nv) if nodes == 1 else (a_net, min(b_nv, b_net))
        return ring_allreduce_s(n_bytes, p, alpha, bw) if kind == "allreduce" else \
            ring_half_s(n_bytes, p, alpha, bw)
    if algorithm != "hierarchical":
        raise ValueError(f"unknown collective {algorithm!r}; choose one of {COLLECTIVES}")
    intra = ring_half_s(n_bytes, g, a_nv, b_nv)
    if kind == "allreduce":
        return 2 * intra + ring_allreduce_s(n_bytes / g, nodes, a_net, b_net)
    return intra + ring_half_s(n_bytes / g, nodes, a_net, b_net)


def bucketed_s(kind: str, n_bytes: float, bucket_bytes: float, c: Cluster, algorithm: str) -> tuple[float, float]:
    """(total, last bucket) time of a collective split into ceil(n / bucket) buckets: each pays the alphas."""
    k = max(1, math.ceil(n_bytes / bucket_bytes))
    one = collective_s(kind, n_bytes / k, c, algorithm)
    return k * one, one


def bucket_bytes(tech: Techniques, dp: int, grad_bytes: int) -> float:
    """The configured bucket, or Megatron-core's rule max(40M, 1M x dp) elements (comm/bucket=gpu_count)."""
    if tech.bucket_mb is not None:
        return tech.bucket_mb * 2**20
    return max(40e6, 1e6 * dp) * grad_bytes


# ----------------------------------------------------------------------------------------------- memory
def korthikanti_activation_bytes(*, seq: int, micro_batch: int, dim: int, heads: int,
                                 recompute: str = "none", flash_attn: bool = False) -> float:
    """Activation bytes per layer, 16-bit, no tensor parallelism (Korthikanti et al. 2022, eqs. 1-2).

    none: s*b*h*(34 + 5*a*s/h); the 5as^2b term is the attention scores, softmax and its dropout mask, which
    selective recomputation (and flash attention, which never stores them) drop: 34*s*b*h. Full recomputation
    keeps only each layer's input: 2*s*b*h.
    """
    sbh = seq * micro_batch * dim
    if recompute == "full":
        return 2.0 * sbh
    scores = 0.0 if (recompute == "selective" or flash_attn) else 5.0 * heads * seq * seq * micro_batch
    return 34.0 * sbh + scores


def model_state_bytes(params: int, precision: str, zero_stage: int, dp: int) -> float:
    """Mixed-precision Adam: 2 (bf16 weights) + 2 (grads) + 12 (fp32 master, m, v) bytes per parameter
    (ZeRO paper, Rajbhandari et al. 2020); fp32 training: 4 + 4 + 8. ZeRO-1/2/3 shard the states over dp."""
    w, g, o = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    return params * (w + g + o)


def peak_memory_bytes(m: ModelShape, c: Cluster, t: Techniques, seq: int, micro_batch: int) -> float:
    scale = DTYPE_BYTES[t.precision] / 2  # the formulas are for 16-bit activations
    acts = m.n_layers * korthikanti_activation_bytes(seq=seq, micro_batch=micro_batch, dim=m.dim, heads=m.n_heads,
                                                     recompute=t.recompute, flash_attn=t.flash_attn)
    # fp32 logits and their gradient, unless chunked / fused cross-entropy keeps one chunk alive
    logits = 0.0 if (t.chunked_ce or t.fused_ops) else 2 * 4.0 * seq * micro_batch * m.vocab_size
    return model_state_bytes(m.total_params(), t.precision, t.zero_stage, c.gpus) + scale * acts + logits


# ----------------------------------------------------------------------------------------------- compute
# Bytes moved per token per layer by the memory-bound operators (forward; backward ~2x), in elements of the
# activation dtype, counted from the kernels a LLaMA layer launches (docs/predictor.md, "memory-bound ops"):
#   unfused: RMSNorm x2 in fp32 (~6 kernels, 24h each), RoPE on q,k (~6 kernels), SwiGLU (silu + mul: 5f),
#            residual adds (6h), head transposes (8h)  ->  ~85h + 5f elements
#   fused:   one read + one write per norm, RoPE fused into attention, one SwiGLU kernel (3f), residuals (6h)
#            ->  ~14h + 3f elements
_ELEMWISE = {False: (85, 5), True: (14, 3)}


def _compute_terms(m: ModelShape, c: Cluster, t: Techniques, eff: Efficiencies, seq: int, mb: int) -> dict:
    """Seconds per micro-batch by operator class, and the forward fraction (for recompute and overlap)."""
    peak = c.peak_tflops[t.precision] * 1e12
    hbm = c.hbm_gbps * GB * eff.hbm
    tokens, L, h = seq * mb, m.n_layers, m.dim
    elem = DTYPE_BYTES[t.precision]
    fwd_passes = 2 if t.recompute == "full" else 1  # forward work executed per step, counted in forwards
    layer_gemm = 2.0 * (m.matmul_params() - m.vocab_size * h) * tokens  # forward
    head_gemm = 2.0 * m.vocab_size * h * tokens
    gemm_s = (layer_gemm * (fwd_passes + 2) + head_gemm * 3) / (eff.gemm * peak)
    attn_fwd = 4.0 * L * h * seq * tokens  # QK^T and AV over the full T x T matrix
    attn_passes = 1 + (t.recompute != "none")
    if t.flash_attn:
        # FlashAttention-2 skips the masked half and its backward costs 2.5 forwards (its own recompute)
        attn_s = 0.5 * attn_fwd * (attn_passes + 2.5) / (eff.flash_attn * peak)
        scores_s = 0.0
    else:
        attn_s = attn_fwd * (attn_passes + 2) / (eff.gemm * peak)
        # scores: write QK^T, mask+softmax read/write, read for AV (fwd ~4 passes), backward ~2x: 12 passes
        scores_s = 12.0 * elem * mb * m.n_heads * seq * seq * L * attn_passes / hbm
    ch, cf = _ELEMWISE[t.fused_ops]
    elem_fwd = (ch * h + cf * m.ffn_dim) * elem * tokens * L
    elem_s = elem_fwd * (fwd_passes + 2) / hbm
    # cross-entropy over fp32 logits: ~4 passes over (tokens x V); fused linear-CE never writes them out
    loss_s = 0.0 if t.fused_ops else 4 * 4.0 * tokens * m.vocab_size / hbm
    total = gemm_s + attn_s + scores_s + elem_s + loss_s
    fwd = (gemm_s / (fwd_passes + 2) + attn_s / (attn_passes + 2.5 if t.flash_attn else attn_passes + 2)
           + elem_s / (fwd_passes + 2))
    return {"gemm_s": gemm_s, "attention_s": attn_s, "scores_s": scores_s, "elementwise_s": elem_s,
            "loss_s": loss_s, "micro_batch_s": total, "backward_s": total - fwd}


def optimizer_s(m: ModelShape, c: Cluster, t: Techniques, eff: Efficiencies) -> float:
    """Adam over this GPU's shard: read p, g, m, v (16 B), write p, m, v (12 B), write the 16-bit copy (2 B)."""
    shard = m.total_params() / (c.gpus if t.zero_stage >= 1 else 1)
    return 30.0 * shard / (c.hbm_gbps * GB * eff.hbm)


# ----------------------------------------------------------------------------------------------- goodput
def young_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young (1974): tau_opt = sqrt(2 * delta * M)."""
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly (2006) higher-order optimum; M when delta >= 2M."""
    d, m = checkpoint_s, mtbf_s
    if d >= 2 * m:
        return m
    return math.sqrt(2 * d * m) * (1 + math.sqrt(d / (2 * m)) / 3 + d / (2 * m) / 9) - d


def goodput(interval_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """First-order useful fraction: lose delta/tau to checkpoints and, per failure, half an interval + restart."""
    lost = checkpoint_s / interval_s + (0 if math.isinf(mtbf_s) else (interval_s / 2 + restart_s) / mtbf_s)
    return max(0.0, 1.0 - lost)


def job_mtbf_s(t: Techniques, gpus: int) -> float:
    return math.inf if t.gpu_mtbf_h <= 0 or math.isinf(t.gpu_mtbf_h) else t.gpu_mtbf_h * 3600 / gpus


# ----------------------------------------------------------------------------------------------- predict
def _check(m: ModelShape, c: Cluster, t: Techniques, seq: int, mb: int, accum: int) -> None:
    if c.gpus <= 0 or c.gpus_per_node <= 0:
        raise ValueError(f"cluster {c.name!r} needs gpus > 0 and gpus_per_node > 0 (got {c.gpus}, {c.gpus_per_node})")
    if seq <= 0 or mb <= 0 or accum <= 0:
        raise ValueError(f"seq_len, micro_batch and grad_accum must be positive (got {seq}, {mb}, {accum})")
    if t.recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {t.recompute!r}; choose one of {RECOMPUTE}")
    if t.collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {t.collective!r}; choose one of {COLLECTIVES}")
    if t.precision not in c.peak_tflops or t.precision not in DTYPE_BYTES:
        raise ValueError(f"no {t.precision!r} peak for {c.name!r}; choose one of {sorted(c.peak_tflops)}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be one of (0, 1, 2, 3), got {t.zero_stage}")
    if m.n_layers <= 0 or m.dim <= 0:
        raise ValueError(f"model {m.name!r} needs positive n_layers and dim")


def _comm(m: ModelShape, c: Cluster, t: Techniques, backward_s: float, micro_s: float, accum: int) -> dict:
    """Communication per step: total and exposed (not hidden behind compute)."""
    gbytes = DTYPE_BYTES[t.precision]
    n = m.total_params() * gbytes
    bucket = bucket_bytes(t, c.gpus, gbytes)
    if t.zero_stage == 3:
        # FSDP full shard, per micro-batch: gather weights for forward and again for backward, reduce-scatter
        # grads; prefetching hides them behind compute except the first gather
        gather, first = bucketed_s("allgather", n, bucket, c, t.collective)
        rs, _ = bucketed_s("reducescatter", n, bucket, c, t.collective)
        per_micro = 2 * gather + rs
        exposed = accum * (max(0.0, per_micro - micro_s) + first) if t.overlap else accum * per_micro
        return {"comm_s": accum * per_micro, "exposed_comm_s": exposed}
    kind = "reducescatter" if t.zero_stage == 2 else "allreduce"
    grads, last = bucketed_s(kind, n, bucket, c, t.collective)
    # buckets reduce while backward runs; the last bucket is ready only when backward ends
    exposed = max(last, grads - backward_s) if t.overlap else grads
    total = grads
    if t.zero_stage == 2:  # DeepSpeed stage 2 all-gathers the updated 16-bit weights after the step, unhidden
        after, _ = bucketed_s("allgather", n, bucket, c, t.collective)
        total, exposed = total + after, exposed + after
    return {"comm_s": total, "exposed_comm_s": exposed}


def predict(model: ModelShape, cluster: Cluster, tech: Techniques, *, seq_len: int, micro_batch: int,
            grad_accum: int = 1, eff: Efficiencies = GPU_EFFICIENCIES) -> Prediction:
    """Predict one data-parallel training configuration (every GPU holds a full replica or a ZeRO shard)."""
    _check(model, cluster, tech, seq_len, micro_batch, grad_accum)
    terms = _compute_terms(model, cluster, tech, eff, seq_len, micro_batch)
    opt = optimizer_s(model, cluster, tech, eff)
    compute = grad_accum * terms["micro_batch_s"] + opt + eff.step_overhead_s
    comm = _comm(model, cluster, tech, terms["backward_s"], terms["micro_batch_s"], grad_accum)
    step = compute + comm["exposed_comm_s"]
    tokens = seq_len * micro_batch * grad_accum
    tps = tokens / step
    flops = model.model_flops_per_token(seq_len) * tps
    peak = cluster.peak_tflops[tech.precision] * 1e12
    mtbf = job_mtbf_s(tech, cluster.gpus)
    tau = tech.checkpoint_interval_s or (young_interval_s(tech.checkpoint_block_s, mtbf)
                                         if math.isfinite(mtbf) else math.inf)
    gp = 1.0 if math.isinf(tau) else goodput(tau, tech.checkpoint_block_s, tech.restart_s, mtbf)
    mem = peak_memory_bytes(model, cluster, tech, seq_len, micro_batch)
    breakdown = {k: grad_accum * v for k, v in terms.items() if k not in ("micro_batch_s", "backward_s")}
    breakdown |= {"optimizer_s": opt, "overhead_s": eff.step_overhead_s, "checkpoint_interval_s": tau,
                  "job_mtbf_s": mtbf, "bucket_bytes": bucket_bytes(tech, cluster.gpus, DTYPE_BYTES[tech.precision])}
    return Prediction(step_s=step, tokens_per_s_per_gpu=tps, tflops_per_gpu=flops / 1e12, mfu=flops / peak,
                      convention=DEFAULT_CONVENTION, peak_memory_bytes=mem, fits_memory=mem <= cluster.hbm_gb * GB,
                      compute_s=compute, comm_s=comm["comm_s"], exposed_comm_s=comm["exposed_comm_s"], goodput=gp,
                      effective_tokens_per_s_per_gpu=tps * gp, breakdown=breakdown)


# ----------------------------------------------------------------------------------------------- configs
def _get(cfg: dict, path: str, default=None):
    """cfg['a']['b'] for 'a.b', or default when any key is missing."""
    node = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def model_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a run's resolved config (its ``model:`` section) or from a model yaml itself."""
    m = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
    try:
        return ModelShape(name=str(m.get("name", "custom")), n_layers=int(m["n_layers"]), dim=int(m["dim"]),
                          n_heads=int(m["n_heads"]), ffn_dim=int(m["ffn_dim"]), vocab_size=int(m["vocab_size"]))
    except KeyError as e:
        raise ValueError(f"model config lacks {e}; need n_layers, dim, n_heads, ffn_dim, vocab_size") from None


def techniques_from_config(cfg: dict) -> Techniques:
    """Map a chuanliu run config (fusion, splitting, precision, engine, comm, fault) onto Techniques.

    Lenient: a missing key keeps the default. attention=sdpa counts as flash (SDPA runs FlashAttention-2 on
    a GPU in 16-bit and a fused kernel on a CPU; neither stores the scores); 'auto' picks flash on a GPU.
    """
    attention = _get(cfg, "fusion.attention", "sdpa")
    fused = _get(cfg, "fusion.rmsnorm", "eager") in ("liger", "compiled", "auto") or \
        bool(_get(cfg, "fusion.compile_layers", False))
    recompute = "full" if _get(cfg, "splitting.recompute_layers") else \
        "selective" if _get(cfg, "splitting.recompute_attention") else "none"
    dtype = str(_get(cfg, "precision.compute_dtype", "bf16"))
    algorithm = _get(cfg, "comm.algorithm.name", "native")
    policy = _get(cfg, "comm.bucket.policy", "fixed")
    ckpt = _get(cfg, "fault.checkpoint.mode", "off")
    return Techniques(
        flash_attn=attention != "eager", fused_ops=fused, recompute=recompute,
        chunked_ce=bool(_get(cfg, "splitting.chunked_ce", False)),
        precision={"fp8": "bf16"}.get(dtype, dtype),  # fp8 linears: no fp8 GEMM model here, predicted as bf16
        # DeepSpeed names its stage; FSDP2 shards parameters, gradients and optimizer state (ZeRO-3's layout)
        zero_stage=int(_get(cfg, "engine.zero_stage", 0) or 0) or (3 if "fsdp2" in str(_get(cfg, "engine._target_",
                                                                                             "")) else 0),
        collective="hierarchical" if algorithm == "hierarchical" else "flat",
        bucket_mb=None if policy == "gpu_count" else float(_get(cfg, "comm.bucket.bucket_cap_mb", 25.0)),
        # torch DDP's native hook always overlaps; flat/hierarchical follow comm.overlap
        overlap=True if algorithm == "native" else bool(_get(cfg, "comm.overlap.enabled", True)),
        checkpoint_block_s=5.0 if ckpt == "async" else 60.0)


def load_model(name: str) -> ModelShape:
    """A model by name: conf/model/<name>.yaml, or a validation-only shape (mpt_7b)."""
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name]
    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        choices = sorted([p.stem for p in path.parent.glob("*.yaml")] + list(EXTRA_MODELS))
        raise ValueError(f"unknown model {name!r}; choose one of {choices}")
    from omegaconf import OmegaConf

    return model_from_config(OmegaConf.to_container(OmegaConf.load(path)))


def get_cluster(name: str) -> Cluster:
    if name not in CLUSTERS:
        raise ValueError(f"unknown cluster {name!r}; choose one of {sorted(CLUSTERS)} "
                         f"(cpu_local: --calibration <calibration json>)")
    return CLUSTERS[name]


def get_techniques(name: str) -> Techniques:
    if name not in TECHNIQUES:
        raise ValueError(f"unknown techniques preset {name!r}; choose one of {sorted(TECHNIQUES)}")
    return TECHNIQUES[name]


# MPT-7B (mosaicml/mpt-7b config.json): GELU MLP of 4h, tied embeddings, ALiBi (no RoPE), vocab 50432.
EXTRA_MODELS = {"mpt_7b": ModelShape(name="mpt_7b", n_layers=32, dim=4096, n_heads=32, ffn_dim=16384,
                                     vocab_size=50432, mlp_matrices=2, tied_embeddings=True)}


# ----------------------------------------------------------------------------------------------- validation
# MPT on llm-foundry: FSDP FULL_SHARD, amp_bf16, Triton flash attention, fused low-precision LayerNorm, ALiBi
# inside the attention kernel; there is no RoPE and no gate to fuse, so the layer's elementwise traffic is
# close to our "fused" count.
_MPT = Techniques(flash_attn=True, fused_ops=True, zero_stage=3, overlap=True, bucket_mb=None)
VALIDATION = [
    # name, model, cluster, techniques, seq, micro batch, grad accum, published {metric: value}, source
    ("baichuan_7b_a800_1024", "baichuan_7b", "a800_1024", TECHNIQUES["all"], 4096, 1, 1,
     {"mfu": 0.583, "tflops_per_gpu": 182.0},
     "Baichuan-7B README (2023): 182 TFLOPS/GPU, 58.3% of A800 peak, ~1000 A800; 4M-token batch assumed"),
    ("mpt_7b_a100_8_seq2048", "mpt_7b", "a100_8", _MPT, 2048, 6, 2,
     {"mfu": 0.6423, "tokens_per_s_per_gpu": 4641.0},
     "llm-foundry scripts/train/benchmarking/README.md, A100 80GB table: 7b, 2048, 8 GPUs, no act. ckpt"),
    ("mpt_7b_a100_8_seq4096", "mpt_7b", "a100_8", replace(_MPT, recompute="full"), 4096, 16, 2,
     {"mfu": 0.5484, "tokens_per_s_per_gpu": 3684.0},
     "llm-foundry scripts/train/benchmarking/README.md, A100 80GB table: 7b, 4096, 8 GPUs, act. ckpt on"),
]


def validate() -> list[dict]:
    """Predict each published configuration with the default efficiencies; error = (pred - pub) / pub."""
    rows = []
    for name, model, cluster, tech, seq, mb, accum, published, source in VALIDATION:
        p = predict(load_model(model), get_cluster(cluster), tech, seq_len=seq, micro_batch=mb, grad_accum=accum)
        got = asdict(p)
        errors = {k: (got[k] - v) / v for k, v in published.items()}
        rows.append({"case": name, "model": model, "cluster": cluster, "seq_len": seq, "micro_batch": mb,
                     "grad_accum": accum, "techniques": asdict(tech), "published": published,
                     "predicted": {k: got[k] for k in published}, "error": errors,
                     "step_s": p.step_s, "exposed_comm_s": p.exposed_comm_s,
                     "peak_memory_gb": p.peak_memory_bytes / GB, "fits_memory": p.fits_memory,
                     "convention": p.convention, "source": source})
    return rows


# ----------------------------------------------------------------------------------------------- calibration
CPU_MEM_GBPS = 10.0  # assumed streaming bandwidth of a small CPU VM; only the memory-bound terms use it


def _load_run(run_dir: Path) -> tuple[dict, dict]:
    from omegaconf import OmegaConf

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg_path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False) if cfg_path.exists() else {}
    return summary, cfg


def cpu_cluster(peak_tflops: float, precision: str, world_size: int = 1,
                mem_gbps: float = CPU_MEM_GBPS) -> Cluster:
    """This machine as a 'cluster': processes share one node; loopback stands in for NVLink."""
    return Cluster(name="cpu_local", device="cpu", gpus=world_size, gpus_per_node=world_size,
                   peak_tflops={precision: peak_tflops}, hbm_gb=1e6, hbm_gbps=mem_gbps, nvlink_gbps=5.0,
                   nvlink_latency_us=50.0, net_gbps=5.0, net_latency_us=50.0)


def _fastest_step_s(summary: dict, run_dir: Path) -> float:
    """The fastest logged step after warm-up, else the summary median. On a shared CPU other processes only
    ever slow a step down (the rule analysis/peaks.py uses for the GEMM peak); medians here varied 10x."""
    warmup = int(summary.get("environment", {}).get("summary_warmup_steps", 3))
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r][warmup:]
    except (OSError, ValueError):
        steps = []
    return min(steps) if steps else summary["median"]["perf/step_s"]


def _run_case(summary: dict, cfg: dict, run_dir: Path) -> dict:
    env = summary["environment"]
    tech = techniques_from_config(cfg)
    model = model_from_config(cfg) if "model" in cfg else load_model(env["model"])
    cluster = cpu_cluster(env["peak_tflops"], tech.precision, int(env.get("world_size", 1)))
    return {"model": model, "cluster": cluster, "tech": tech, "seq": int(env["seq_len"]),
            "mb": int(env["micro_batch_size"]), "accum": int(env.get("grad_accum_steps", 1)),
            "measured_step_s": _fastest_step_s(summary, run_dir),
            "measured_peak_bytes": summary["median"].get("mem/peak_bytes")}


def _fit_relative(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, c) minimising sum(((a*x + c - y) / y)^2): relative errors, as step times span 10x and more.
    A negative overhead is not physical: then c = 0 and a alone is fitted."""
    w = [1 / y**2 for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    a, c = ((sw * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det) if det > 0 else (sxy / sxx, 0.0)
    return (a, c) if c >= 0 and a > 0 else (sxy / sxx, 0.0)


def _nnls_relative(columns: list[list[float]], ys: list[float], scale: list[float] | None = None) -> list[float]:
    """Non-negative least squares of y ~ sum_k coef_k * columns[k], each row's error divided by scale (default y:
    relative error): every subset of the columns is solved and the best all-non-negative solution kept."""
    import itertools

    import numpy as np

    div = np.array(scale if scale is not None else ys, dtype=float)
    a = np.array(columns, dtype=float).T / div[:, None]
    b = np.array(ys, dtype=float) / div
    best, best_err = [0.0] * len(columns), float("inf")
    for r in range(1, len(columns) + 1):
        for subset in itertools.combinations(range(len(columns)), r):
            coef, *_ = np.linalg.lstsq(a[:, subset], b, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((a[:, subset] @ coef - b) ** 2))
            if err < best_err:
                best_err, best = err, [0.0] * len(columns)
                for k, c in zip(subset, coef):
                    best[k] = float(c)
    return best


def calibrate(run_dirs: list[str | Path]) -> dict:
    """Fit this machine's GEMM efficiency e, memory bandwidth and a per-step overhead c on measured runs:
    measured = flop_time_at_peak / e + bytes_moved / bandwidth + c, non-negative least squares in relative error.
    The bandwidth is fitted rather than assumed: the memory-bound terms (norms, activations, cross-entropy,
    optimizer) are a large share of a small model's step on a CPU, and a wrong bandwidth pushes e past 1."""
    cases = [_run_case(*_load_run(Path(d)), Path(d)) for d in run_dirs]
    if len(cases) < 3:
        raise ValueError("calibration needs at least three runs (three unknowns: efficiency, bandwidth, overhead)")
    unit = Efficiencies(gemm=1.0, flash_attn=1.0, hbm=1.0)
    flop_s, mem_s, ys = [], [], []
    for cs in cases:
        p = predict(cs["model"], cs["cluster"], cs["tech"], seq_len=cs["seq"], micro_batch=cs["mb"],
                    grad_accum=cs["accum"], eff=unit)
        f = p.breakdown["gemm_s"] + p.breakdown["attention_s"]
        flop_s.append(f)
        mem_s.append(p.step_s - f)  # memory-bound time at CPU_MEM_GBPS (one process: no communication)
        ys.append(cs["measured_step_s"])
    inv_e, mem_scale, overhead = _nnls_relative([flop_s, mem_s, [1.0] * len(ys)], ys)
    if inv_e <= 0:
        raise ValueError("calibration found no compute term: the runs' step times do not grow with their FLOPs")
    if inv_e < 1:  # faster than the measured GEMM peak is not physical: e = 1, the rest refitted
        inv_e = 1.0
        rest = [y - f for y, f in zip(ys, flop_s)]
        mem_scale, overhead = _nnls_relative([mem_s, [1.0] * len(ys)], rest, scale=ys)
    mem_gbps = CPU_MEM_GBPS / mem_scale if mem_scale > 0 else 1e6
    eff = Efficiencies(gemm=1 / inv_e, flash_attn=1 / inv_e, hbm=1.0, step_overhead_s=overhead)
    runs = []
    for d, cs in zip(run_dirs, cases):
        cluster = cpu_cluster(cs["cluster"].peak_tflops[cs["tech"].precision], cs["tech"].precision,
                              cs["cluster"].gpus, mem_gbps=mem_gbps)
        p = predict(cs["model"], cluster, cs["tech"], seq_len=cs["seq"], micro_batch=cs["mb"],
                    grad_accum=cs["accum"], eff=eff)
        meas = cs["measured_step_s"]
        runs.append({"run": str(d), "model": cs["model"].name, "micro_batch": cs["mb"], "seq_len": cs["seq"],
                     "techniques": asdict(cs["tech"]), "measured_step_s": meas, "predicted_step_s": p.step_s,
                     "error": (p.step_s - meas) / meas, "measured_peak_bytes": cs["measured_peak_bytes"],
                     "predicted_peak_bytes": p.peak_memory_bytes})
    cluster = cpu_cluster(cases[0]["cluster"].peak_tflops[cases[0]["tech"].precision], cases[0]["tech"].precision,
                          cases[0]["cluster"].gpus, mem_gbps=mem_gbps)
    return {"cluster": asdict(cluster), "efficiencies": asdict(eff), "cpu_mem_gbps": mem_gbps,
            "method": "non-negative least squares, relative error, of each run's fastest step on FLOP time at the "
                      "GEMM peak, memory-bound bytes and a constant overhead",
            "runs": runs}


def load_calibration(path: str | Path) -> tuple[Cluster, Efficiencies]:
    data = json.loads(Path(path).read_text())
    return Cluster(**data["cluster"]), Efficiencies(**data["efficiencies"])


# ----------------------------------------------------------------------------------------------- CLI
def _fmt_prediction(p: Prediction, cluster: Cluster) -> str:
    rows = [("step time", f"{p.step_s:.3f} s"), ("  compute", f"{p.compute_s:.3f} s"),
            ("  comm (total / exposed)", f"{p.comm_s:.3f} / {p.exposed_comm_s:.3f} s"),
            ("tokens/s/GPU", f"{p.tokens_per_s_per_gpu:,.0f}"),
            (f"TFLOPS/GPU ({p.convention})", f"{p.tflops_per_gpu:.1f}"), (f"MFU ({p.convention})", f"{p.mfu:.1%}"),
            ("peak memory", f"{p.peak_memory_bytes / GB:.1f} GB of {cluster.hbm_gb:g} "
                            f"({'fits' if p.fits_memory else 'DOES NOT FIT'})"),
            ("goodput (Young interval)", f"{p.goodput:.3f}"),
            ("effective tokens/s/GPU", f"{p.effective_tokens_per_s_per_gpu:,.0f}")]
    rows += [(f"  {k}", f"{v:.4g}") for k, v in p.breakdown.items()]
    return "\n".join(f"{k:<30} {v}" for k, v in rows)


def _fmt_validation(rows: list[dict]) -> str:
    lines = [f"{'case':<26} {'metric':<22} {'published':>10} {'predicted':>10} {'error':>8}"]
    for r in rows:
        for k, pub in r["published"].items():
            lines.append(f"{r['case']:<26} {k:<22} {pub:>10.4g} {r['predicted'][k]:>10.4g} {r['error'][k]:>+8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m analysis.predictor", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="baichuan_7b")
    ap.add_argument("--cluster", default="a800_1024", help=f"{sorted(CLUSTERS)} or cpu_local")
    ap.add_argument("--calibration", help="cpu_local calibration json (from --calibrate)")
    ap.add_argument("--techniques", default="all", help=f"{sorted(TECHNIQUES)}")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--gpus", type=int, help="override the preset's GPU count")
    ap.add_argument("--json", help="write the prediction here")
    ap.add_argument("--validate", action="store_true", 
                    help="vs published results; writes docs/predictor_validation.json")
    ap.add_argument("--calibrate", nargs="+", metavar="RUN_DIR", help="fit cpu_local to these runs")
    ap.add_argument("--out", help="calibration json (default: <first run's parent>/cpu_local_calibration.json)")
    args = ap.parse_args(argv)
    if args.validate:
        rows = validate()
        print(_fmt_validation(rows))
        out = REPO / "docs" / "predictor_validation.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")
        return
    if args.calibrate:
        result = calibrate(args.calibrate)
        for r in result["runs"]:
            print(f"{r['run']:<40} measured {r['measured_step_s']:.3f} s  predicted {r['predicted_step_s']:.3f} s"
                  f"  error {r['error']:+.1%}")
        e = result["efficiencies"]
        print(f"fitted FLOP efficiency {e['gemm']:.3f} of the measured GEMM peak, "
              f"overhead {e['step_overhead_s']:.3f} s")
        out = Path(args.out) if args.out else Path(args.calibrate[0]).resolve().parent / "cpu_local_calibration.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return
    eff = GPU_EFFICIENCIES
    if args.cluster == "cpu_local":
        if not args.calibration:
            raise ValueError("cluster cpu_local needs --calibration <json written by --calibrate>")
        cluster, eff = load_calibration(args.calibration)
        precision = next(iter(cluster.peak_tflops))  # the dtype the CPU peak was measured in
    else:
        cluster = get_cluster(args.cluster)
    if args.gpus is not None:
        cluster = replace(cluster, gpus=args.gpus)
    tech = get_techniques(args.techniques)
    if args.cluster == "cpu_local":
        tech = replace(tech, precision=precision)
    p = predict(load_model(args.model), cluster, tech, seq_len=args.seq, micro_batch=args.micro_batch,
                grad_accum=args.grad_accum, eff=eff)
    print(f"{args.model} on {cluster.name} ({cluster.gpus} x {cluster.device}), techniques={args.techniques}, "
          f"seq {args.seq}, micro-batch {args.micro_batch}, grad-accum {args.grad_accum}")
    print(_fmt_prediction(p, cluster))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(p), indent=1) + "\n")


if __name__ == "__main__":
    main()

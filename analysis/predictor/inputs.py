"""What goes into a prediction: the model's shape, the GPUs and their network, the techniques, and the ranges of
inputs a published run does not state.

Every number here is a datasheet figure or a documented assumption; nothing is fitted (fitted constants live in
``calibration.py`` and ``data/fit.json``). Peaks come from ``analysis.peaks`` (the table MFU uses) and FLOPs from
``analysis.flops``, so the predictor and the trainer count the same way.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from analysis import flops as flops_mod
from analysis.peaks import PEAK_TFLOPS
from comm.buckets import BucketConfig, GpuCountBuckets

GB = 1e9


# ----------------------------------------------------------------------------------------------- model
@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only transformer's dimensions (LLaMA/Baichuan, MPT, GPT-style)."""

    name: str = "custom"
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (multi-head)
    ffn_dim: int
    vocab_size: int
    mlp: str = "swiglu"  # swiglu (gate, up, down: Baichuan, LLaMA) | gelu (up, down: MPT, GPT)
    tied_embeddings: bool = False  # MPT ties the LM head to the input embedding
    position: str = "rope"  # rope (rotates q, k) | learned (a seq x dim table: MPT as benchmarked) | alibi
    max_seq_len: int = 4096  # rows of a learned position table
    bias: bool = False  # linear layers and norms carry biases (parameters only: their FLOPs are negligible)

    def __post_init__(self) -> None:
        if self.position not in ("rope", "learned", "alibi"):
            raise ValueError(f"model {self.name!r}: position={self.position!r} is unknown; use rope, learned or alibi")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"model {self.name!r}: mlp={self.mlp!r} is unknown; use swiglu or gelu")
        if min(self.n_layers, self.dim, self.n_heads, self.ffn_dim, self.vocab_size) <= 0:
            raise ValueError(f"model {self.name!r} needs positive n_layers, dim, n_heads, ffn_dim, vocab_size")
        if self.dim % self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(f"model {self.name!r}: dim {self.dim}, n_heads {self.n_heads} and n_kv_heads "
                             f"{self.kv_heads} must divide (dim by heads, heads by kv heads)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.kv_heads

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    def linears(self) -> list[tuple[str, int, int]]:
        """One decoder layer's matmuls as (name, in features, out features)."""
        h, f = self.dim, self.ffn_dim
        mlp_in = [("gate_up", h, 2 * f)] if self.mlp == "swiglu" else [("up", h, f)]
        return [("qkv", h, h + 2 * self.kv_dim), ("o_proj", h, h), *mlp_in, ("down", f, h)]

    def layer_params(self) -> int:
        norms = 2 * self.dim * (2 if self.bias else 1)
        return sum(i * o + (o if self.bias else 0) for _, i, o in self.linears()) + norms

    def total_params(self) -> int:
        embed = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        positions = self.max_seq_len * self.dim if self.position == "learned" else 0
        return self.n_layers * self.layer_params() + embed + positions + self.dim * (2 if self.bias else 1)

    def flops_per_token(self, seq_len: int, recompute: flops_mod.Recompute | None = None) -> dict[str, float]:
        """Every convention of analysis.flops for this shape (palm is the predictor's MFU)."""
        kw = {"recompute": recompute} if recompute is not None else {}
        return flops_mod.flops_per_token(n_layers=self.n_layers, dim=self.dim, ffn_dim=self.ffn_dim,
                                         vocab_size=self.vocab_size, seq_len=seq_len, n_heads=self.n_heads,
                                         n_kv_heads=self.kv_heads, mlp_matrices=self.mlp_matrices, **kw)


# ----------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True, kw_only=True)
class GPU:
    """One GPU type: datasheet figures and the achieved NVLink bandwidth of an 8-GPU node."""

    name: str
    peak_key: str  # key of analysis.peaks.PEAK_TFLOPS
    hbm_gb: float
    hbm_gbps: float  # nominal HBM bandwidth
    sms: int  # streaming multiprocessors: GEMM tiles are scheduled in waves of this many
    nvlink_busbw_gbps: float  # nccl-tests all-reduce busbw inside one 8-GPU node (large messages, ring)
    family: str  # whose fitted efficiencies it uses (itself, or the same silicon when it has no data)
    nvls_busbw_gbps: float = 0.0  # NVLink SHARP all-reduce busbw in a node (H100/H200 SXM: ~480); 0 = none
    peak_override: dict[str, float] | None = None  # TFLOPS per dtype when not from the table (a measured CPU)

    def peak_flops(self, dtype: str) -> float:
        table = self.peak_override or PEAK_TFLOPS[self.peak_key]
        tf = table.get(dtype)
        if tf is None:
            raise ValueError(f"{self.name} has no {dtype} peak; use one of {sorted(table)}")
        return tf * 1e12


# NVLink busbw: A100 NVLink3 (600 GB/s bidirectional) reaches ~230 GB/s all-reduce busbw on 8 GPUs; the A800 caps
# NVLink at 400 GB/s (~155); H100/H200 NVLink4 (900 GB/s) ~370 with rings, ~480 with NVLS (NVLink SHARP); the
# H800 keeps 400 GB/s NVLink (~155, like the A800) and its NVSwitch, whose NVLS is left out (no published figure). H800/A800/H200 have no rows in the data set: their compute efficiencies are
# those of the same silicon (family), their memory and links their own.
GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU(name="a100_40", peak_key="a100", hbm_gb=40, hbm_gbps=1555, sms=108, nvlink_busbw_gbps=230, family="a100_40"),
    GPU(name="a100_80", peak_key="a100", hbm_gb=80, hbm_gbps=2039, sms=108, nvlink_busbw_gbps=230, family="a100_80"),
    GPU(name="a800", peak_key="a800", hbm_gb=80, hbm_gbps=2039, sms=108, nvlink_busbw_gbps=155, family="a100_80"),
    GPU(name="h100_sxm", peak_key="h100_sxm", hbm_gb=80, hbm_gbps=3350, sms=132, nvlink_busbw_gbps=370,
        nvls_busbw_gbps=480, family="h100_sxm"),
    GPU(name="h800", peak_key="h800", hbm_gb=80, hbm_gbps=3350, sms=132, nvlink_busbw_gbps=155, family="h100_sxm"),
    GPU(name="h200", peak_key="h200", hbm_gb=141, hbm_gbps=4800, sms=132, nvlink_busbw_gbps=370,
        nvls_busbw_gbps=480, family="h100_sxm"),
    GPU(name="h100_pcie", peak_key="h100_pcie", hbm_gb=80, hbm_gbps=2000, sms=114, nvlink_busbw_gbps=50,
        family="h100_sxm"),
]}


def _lookup(table: dict, name: str, what: str, hint: str = ""):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}{hint}")
    return table[name]


def get_gpu(name: str) -> GPU:
    return _lookup(GPUS, name, "GPU")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """GPUs and the network between nodes. Each NIC serves one rail (the GPUs of the same local rank)."""

    name: str = "custom"
    gpu: GPU
    gpus: int
    gpus_per_node: int = 8
    nics_per_node: int = 8
    nic_gbps: float = 200.0  # Gb/s per NIC, one direction (HDR 200, NDR 400, EFA 100)
    net_efficiency: float = 0.92  # achieved / line rate of an IB or RoCE rail for large NCCL transfers

    def __post_init__(self) -> None:
        if self.gpus <= 0 or self.gpus_per_node <= 0 or self.nics_per_node <= 0 or self.nic_gbps <= 0:
            raise ValueError(f"cluster {self.name!r} needs gpus > 0 and gpus_per_node, nics_per_node, nic_gbps "
                             f"positive (got {self.gpus}, {self.gpus_per_node}, {self.nics_per_node}, "
                             f"{self.nic_gbps})")

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def node_net_Bps(self) -> float:
        """Achievable inter-node bandwidth of one node, all its NICs together, bytes/s."""
        return self.nics_per_node * self.nic_gbps / 8 * GB * self.net_efficiency


CLUSTERS: dict[str, Cluster] = {
    # Baichuan did not publish its network: 8 x 200 Gb/s HDR per node is the point estimate, the interval
    # spans 4-8 NICs of 100-200 Gb/s (PREDICTION_RANGES['baichuan_7b']).
    "a800_1024": Cluster(name="a800_1024", gpu=GPUS["a800"], gpus=1024, nics_per_node=8, nic_gbps=200),
    "a100_8": Cluster(name="a100_8", gpu=GPUS["a100_80"], gpus=8),
    "a100_64": Cluster(name="a100_64", gpu=GPUS["a100_80"], gpus=64),
    "h100_1024": Cluster(name="h100_1024", gpu=GPUS["h100_sxm"], gpus=1024, nic_gbps=400),
    "h800_1024": Cluster(name="h800_1024", gpu=GPUS["h800"], gpus=1024, nic_gbps=400),
    "h200_1024": Cluster(name="h200_1024", gpu=GPUS["h200"], gpus=1024, nic_gbps=400),
}


def get_cluster(name: str) -> Cluster:
    return _lookup(CLUSTERS, name, "cluster", " (or --gpu NAME --gpus N for any GPU type)")


# ----------------------------------------------------------------------------------------------- techniques
ATTENTION = ("flash", "triton", "eager", "fused_softmax")
FUSED_ATTENTION = ("flash", "triton")  # the attention core is one kernel: the T x T scores never reach HBM
LOSS = ("eager", "kernel", "fused")
RECOMPUTE = ("none", "selective", "full")
COLLECTIVES = ("nccl", "hierarchical")
NCCL_ALGOS = ("auto", "ring", "tree")
ENGINES = ("ddp", "zero1", "zero2", "zero3")


@dataclass(frozen=True, kw_only=True)
class Techniques:
    """Technique choices in the predictor's terms (``techniques_from_config`` maps a chuanliu run onto them)."""

    attention: str = "flash"  # flash: FlashAttention-2 / SDPA | triton: MPT's Triton kernel | eager: T x T in HBM |
    #                           fused_softmax: batched QK^T and AV GEMMs around one fused scale-mask-softmax kernel
    #                           and attention dropout (Megatron-LM's FusedScaleMaskSoftmax); T x T in HBM, 16-bit
    fused_norm: bool = False  # one kernel per norm (Liger, compiled, apex, torch LayerNorm) vs eager fp32 RMSNorm
    fused_act: bool = False  # one SwiGLU kernel vs silu + mul
    fused_rope: bool = False  # RoPE inside a fused kernel (or no RoPE: ALiBi, learned positions)
    loss: str = "eager"  # eager: fp32 logits + CE | kernel: one fused CE kernel (compiled, flash-attn's) |
    #                      fused: linear-cross-entropy (Liger), the logits never in HBM
    chunked_ce: bool = False  # LM head + loss over token chunks, each chunk's LM head re-run in backward
    recompute: str = "none"  # none | selective (attention core) | full (whole layers)
    recompute_mlp: bool = False  # MLP re-run (recompute_mlp or tiled_mlp)
    recompute_last_op: bool = False  # full recomputation re-runs the layer's last op too (Megatron-LM's own
    #                                  checkpoint, torch's reentrant one); False: torch's non-reentrant checkpoint,
    #                                  which stops before it (analysis/flops.py)
    precision: str = "bf16"  # bf16 | fp16 | fp32 | tf32 | fp8 (fp8 GEMMs in the decoder, bf16 elsewhere)
    engine: str = "ddp"  # ddp | zero1 | zero2 | zero3 (FSDP full shard is ZeRO-3's layout)
    layers_per_unit: int = 1  # ZeRO-3/FSDP: decoder layers gathered together
    reshard_after_forward: bool = True  # ZeRO-3/FSDP: gather again for backward (False: FSDP SHARD_GRAD_OP)
    shard_group: int = 0  # ranks the ZeRO/FSDP shards span (HSDP, InternEvo's zero1=8); 0: every rank
    reduce_bytes: int = 2  # gradient element bytes in the reduction (bf16 2; fp32 4)
    collective: str = "nccl"  # nccl: NCCL's own collectives | hierarchical: chuanliu's two-level all-reduce
    nccl_algo: str = "auto"  # auto (chosen as NCCL's tuner would) | ring | tree
    bucket_bytes: float = 25 * 2**20  # gradient bucket (bytes), unless ``bucket`` gives a policy
    bucket: BucketConfig | None = None  # comm/bucket's policy (gpu_count, cost_model), sized by comm/buckets.py
    overlap: bool = True  # reduce buckets during the backward pass
    checkpoint_block_s: float = 60.0  # training blocked per checkpoint (sync save of a 7B job)
    checkpoint_interval_s: float | None = None  # None = Young's optimum
    restart_s: float = 600.0  # detect + restart + reload after a failure
    gpu_mtbf_h: float = 50_000.0  # per-GPU MTBF: Llama 3 (Meta 2024), 419 interruptions / 54 days / 16k GPUs

    def __post_init__(self) -> None:
        for key, allowed in (("attention", ATTENTION), ("loss", LOSS), ("recompute", RECOMPUTE),
                             ("collective", COLLECTIVES), ("nccl_algo", NCCL_ALGOS), ("engine", ENGINES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"techniques.{key}={getattr(self, key)!r} is unknown; choose one of {allowed}")
        if self.precision not in ("bf16", "fp16", "fp32", "tf32", "fp8"):
            raise ValueError(f"techniques.precision={self.precision!r} is unknown; choose bf16, fp16, fp32, tf32 "
                             "or fp8")

    @property
    def zero_stage(self) -> int:
        return {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[self.engine]

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision in ("fp32", "tf32") else 2

    @property
    def gemm_dtype(self) -> str:
        return {"fp8": "fp8", "fp32": "fp32", "tf32": "tf32", "fp16": "fp16"}.get(self.precision, "bf16")

    def recomputed(self) -> flops_mod.Recompute:
        """What runs twice, for analysis.flops' hfu (the same rule the trainer's FLOPs use)."""
        return flops_mod.Recompute(full_layers=self.recompute == "full",
                                   attention_core=self.recompute == "selective", mlp=self.recompute_mlp,
                                   lm_head=self.chunked_ce, attention_fused=self.attention in FUSED_ATTENTION)


def hardware_flops_per_token(m: ModelShape, seq: int, t: Techniques) -> dict[str, float]:
    """analysis.flops' conventions for this shape and these techniques; ``hfu`` also counts the down projection
    when full recomputation re-runs it (``recompute_last_op``: analysis/flops.py counts torch's non-reentrant
    checkpoint, which does not)."""
    fpt = m.flops_per_token(seq, t.recomputed())
    if t.recompute == "full" and t.recompute_last_op:
        fpt = fpt | {"hfu": fpt["hfu"] + 2.0 * m.n_layers * m.ffn_dim * m.dim}
    return fpt


TECHNIQUES = {
    "none": Techniques(attention="eager", overlap=False),
    # Baichuan-7B's list: flash attention, fused RMSNorm (and the other fused kernels), activation splitting,
    # bf16, DeepSpeed ZeRO-2 with its published 1e8-element buckets and overlap_comm, topology-aware (NCCL's own,
    # rail-aligned) collectives, asynchronous checkpoints.
    "all": Techniques(attention="flash", fused_norm=True, fused_act=True, fused_rope=True, loss="fused",
                      recompute="selective", engine="zero2", bucket_bytes=1e8 * 2, overlap=True,
                      checkpoint_block_s=5.0),
    # Megatron-core as run today (the layout search's default): FlashAttention and fused kernels through
    # TransformerEngine, selective recomputation, the distributed optimizer (ZeRO-1 over dp), gradients reduced in
    # fp32 (Megatron-LM sets accumulate_allreduce_grads_in_fp32 for bf16), its GPU-count bucket rule, overlapped.
    "megatron": Techniques(attention="flash", fused_norm=True, fused_act=True, fused_rope=True, loss="kernel",
                           recompute="selective", engine="zero1", reduce_bytes=4, bucket=GpuCountBuckets(),
                           overlap=True, checkpoint_block_s=5.0),
}


def get_techniques(name: str) -> Techniques:
    return _lookup(TECHNIQUES, name, "techniques preset")


# ----------------------------------------------------------------------------------------------- ranges
@dataclass(frozen=True, kw_only=True)
class Ranges:
    """Inputs a published run does not state, each as the values it may have taken. The first value of each is
    the point estimate; ``combinations`` enumerates all of them for the interval."""

    nics_per_node: tuple[int, ...] = ()
    nic_gbps: tuple[float, ...] = ()
    split: tuple[tuple[int, int], ...] = ()  # (micro-batch, gradient accumulation) with the same tokens per step
    bucket_bytes: tuple[float, ...] = ()
    nccl_algo: tuple[str, ...] = ()
    reduce_bytes: tuple[int, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # why each range is what it is

    def axes(self) -> dict[str, tuple]:
        return {k: v for k, v in (("nics_per_node", self.nics_per_node), ("nic_gbps", self.nic_gbps),
                                  ("split", self.split), ("bucket_bytes", self.bucket_bytes),
                                  ("nccl_algo", self.nccl_algo), ("reduce_bytes", self.reduce_bytes)) if v}

    def combinations(self) -> list[dict]:
        axes = self.axes()
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

    def point(self) -> dict:
        return {k: v[0] for k, v in self.axes().items()}


def apply_assumption(cluster: Cluster, tech: Techniques, micro_batch: int, grad_accum: int,
                     choice: dict) -> tuple[Cluster, Techniques, int, int]:
    """One combination of unpublished inputs applied to the stated ones."""
    c = replace(cluster, **{k: choice[k] for k in ("nics_per_node", "nic_gbps") if k in choice})
    t = replace(tech, **{k: choice[k] for k in ("bucket_bytes", "nccl_algo", "reduce_bytes") if k in choice})
    if "bucket_bytes" in choice:
        t = replace(t, bucket=None)
    mb, ga = choice.get("split", (micro_batch, grad_accum))
    return c, t, mb, ga


# Unpublished inputs of runs in the data set that state no network: A100 clusters of that time were built with
# 4 or 8 HDR NICs (Azure NDv4 8 x 200, AWS p4d 4 x 100 EFA, DGX SuperPOD 8 x 200); H100 clusters with 8 x 400 NDR
# (DGX H100, Azure ND H100 v5) or 8 x 200 / 16 x 200 EFA (AWS p5 3,200 Gb/s). NCCL's algorithm is its own choice.
DEFAULT_NETWORK = {"a100": ((8, 4), (200.0, 100.0)), "a800": ((8, 4), (200.0, 100.0)),
                   "h100": ((8,), (400.0, 200.0)), "h800": ((8,), (400.0, 200.0)), "h200": ((8,), (400.0, 200.0))}


def network_ranges(gpu: GPU) -> tuple[tuple[int, ...], tuple[float, ...]]:
    prefix = gpu.name.split("_")[0]
    return DEFAULT_NETWORK.get(prefix, ((8,), (200.0,)))


# Baichuan-7B's run (README, 2023): ~1000 A800, seq 4096, bf16, DeepSpeed ZeRO-2 with reduce_bucket_size 1e8
# elements and overlap_comm (its released config/deepspeed.json), flash attention, fused RMSNorm. Not published:
# the network, the micro-batch and accumulation, the NCCL algorithm. Their ranges:
BAICHUAN_7B_RANGES = Ranges(
    nics_per_node=(8, 4), nic_gbps=(200.0, 100.0),
    split=((1, 1), (2, 1), (4, 1), (1, 4), (2, 2)), nccl_algo=("auto", "ring", "tree"),
    notes={"network": "A800 nodes are built with 4 or 8 HDR (200 Gb/s) or 100 Gb/s RoCE NICs; Baichuan states "
                      "none", "split": "the released deepspeed.json says micro-batch 1, accumulation 1 (a demo "
                                       "config); the pre-training split is not published",
           "nccl_algo": "NCCL's own choice, or forced ring / tree"})

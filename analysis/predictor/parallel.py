"""Tensor x pipeline x data parallel layouts (Megatron-LM's 3D parallelism): one training step, and its memory.

Start at ``predict_layout(model, cluster, techniques, Layout(tp=, pp=, ...), seq_len=, micro_batch=, grad_accum=)``;
``grad_accum`` is m, the micro-batches each pipeline runs per step, so a step trains micro_batch x m x dp
sequences with dp = GPUs / (tp x pp). With tp = pp = 1 it is step.predict, unchanged.

    compute      compute.micro_batch_terms on one TP rank (sharded GEMMs, heads, vocabulary; sp: sharded norms)
    tensor       tensor.layer_comm: 2 + 2 all-reduces per layer and micro-batch (or RS/AG pairs), exposed
    stages       n_layers / pp layers each; the first adds the embedding, the last the LM head and loss; the
                 pipeline runs at its slowest stage's pace: step = m x T_max + bubble
    pipeline     pipeline.SCHEDULES' bubble from the stages' mean T_F, T_B, T_W; two blocking sends per
                 micro-batch and chunk (pipeline.p2p_s) on the critical path
    data         each stage's TP shard of gradients reduced over its dp replicas (``dp_cluster``: the dp group's
                 share of the NICs), bucketed and overlapped with the last micro-batch's backward when
                 ``overlap``; ZeRO-1 (Megatron's distributed optimizer) reduce-scatters, then all-gathers the
                 updated 16-bit weights (exposed); tied embeddings all-reduced between the first and last stage
    memory       memory.stage_memory_bytes: the first stage's shard and the micro-batches its schedule holds,
                 or the last stage's with its logits, whichever is larger

Only ddp and zero1 are modelled with tp or pp > 1 (Megatron's two); ZeRO-2/3 and FSDP are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.predictor import collectives as coll
from analysis.predictor import pipeline as pipe
from analysis.predictor import tensor
from analysis.predictor.compute import Efficiencies, micro_batch_terms, padded_vocab
from analysis.predictor.fitted import efficiencies_for
from analysis.predictor.goodput import job_goodput
from analysis.predictor.inputs import GB, Cluster, ModelShape, Techniques, hardware_flops_per_token
from analysis.predictor.memory import stage_memory_bytes
from analysis.predictor.step import CONVENTION, Prediction, _bucketed, _check, bucket_bytes, predict


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How a job's GPUs split the work. Megatron-LM's rank order: TP innermost, then DP, then PP."""

    tp: int = 1  # tensor-parallel ranks (NVLink when tp <= GPUs per node)
    pp: int = 1  # pipeline stages
    sp: bool = False  # sequence parallelism (Korthikanti et al. 2022): norms and residuals split over tp too
    schedule: str = "1f1b"  # pipeline.SCHEDULES (comm/schedules.py), the papers' names
    virtual_stages: int = 1  # model chunks per GPU: v of the interleaved/looped schedules (zb_v, dualpipe_v: 2)
    scatter_gather: bool = True  # Megatron's P2P optimisation: each TP rank sends 1/tp over its own rail

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.virtual_stages < 1:
            raise ValueError(f"layout needs tp, pp and virtual_stages >= 1 (got {self.tp}, {self.pp}, "
                             f"{self.virtual_stages})")
        sched = pipe.get_schedule(self.schedule)
        if self.sp and self.tp == 1:
            raise ValueError("sequence parallelism splits along the tensor-parallel group: it needs tp > 1")
        if sched.chunks == "one" and self.virtual_stages != 1:
            raise ValueError(f"schedule {self.schedule} runs one chunk per GPU; virtual_stages is for the "
                             "interleaved and looped schedules")
        if sched.chunks == "two" and self.virtual_stages not in (1, 2):
            raise ValueError(f"{self.schedule} runs exactly 2 chunks per GPU")

    @property
    def chunks(self) -> int:
        sched = pipe.get_schedule(self.schedule)
        return sched.default_chunks() if sched.chunks == "two" else self.virtual_stages

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp

    def dp(self, cluster: Cluster) -> int:
        return cluster.gpus // self.model_parallel

    def label(self) -> str:
        v = f" v{self.chunks}" if self.chunks > 1 else ""
        return f"tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} {self.schedule}{v}"

    def check(self, m: ModelShape, cluster: Cluster, t: Techniques, grad_accum: int) -> None:
        """Refuse what does not divide, with the numbers that do not."""
        if cluster.gpus % self.model_parallel:
            raise ValueError(f"tp {self.tp} x pp {self.pp} = {self.model_parallel} does not divide {cluster.gpus} "
                             f"GPUs (dp = GPUs / (tp x pp) must be whole)")
        for what, n in (("n_heads", m.n_heads), ("n_kv_heads", m.kv_heads), ("ffn_dim", m.ffn_dim)):
            if n % self.tp:
                raise ValueError(f"tp {self.tp} does not divide {m.name}'s {what} {n}")
        stages = self.pp * self.chunks
        if m.n_layers % stages:
            raise ValueError(f"pp {self.pp} x {self.chunks} chunks = {stages} does not divide {m.name}'s "
                             f"{m.n_layers} layers")
        if self.pp > 1 and pipe.get_schedule(self.schedule).m_divisible_by_p and grad_accum % self.pp:
            raise ValueError(f"the interleaved schedule needs the micro-batches per step ({grad_accum}) to be a "
                             f"multiple of pp {self.pp} (Megatron-LM's rule)")
        if self.model_parallel > 1 and t.engine not in ("ddp", "zero1"):
            raise ValueError(f"engine {t.engine} is not modelled with tensor or pipeline parallelism; use ddp or "
                             "zero1 (Megatron's distributed optimizer)")


def dp_cluster(cluster: Cluster, model_parallel: int, dp: int) -> Cluster:
    """The ``dp`` replicas of one TP/PP shard as a group of their own. A node's GPUs belong to
    ``model_parallel`` different groups (at most its GPU count), which reduce at the same time: each group gets
    its share of the node's NICs, and its GPUs per node shrink accordingly."""
    per_node = max(1, cluster.gpus_per_node // model_parallel)
    groups_per_node = cluster.gpus_per_node // per_node
    if per_node == 1:
        return coll.rail_cluster(cluster, dp)
    return Cluster(name=f"{cluster.name}/dp", gpu=cluster.gpu, gpus=dp, gpus_per_node=per_node,
                   nics_per_node=1, nic_gbps=cluster.nics_per_node * cluster.nic_gbps / groups_per_node,
                   net_efficiency=cluster.net_efficiency)


@dataclass(frozen=True)
class Stage:
    """One GPU's share of a micro-batch: forward, input-gradient backward, weight-gradient backward (s)."""

    t_f: float
    t_b: float
    t_w: float

    @property
    def total(self) -> float:
        return self.t_f + self.t_b + self.t_w


def stage_params(m: ModelShape, tp: int, pp: int) -> tuple[int, int]:
    """(first stage, last stage) parameters on one TP rank: n_layers / pp layers (norms whole on every rank), the
    vocabulary-parallel embedding (and learned positions) on the first, the final norm and the LM head on the last
    (a copy of the embedding when tied, as Megatron keeps it). One stage holds all of it when pp = 1."""
    norms = 2 * m.dim * (2 if m.bias else 1)
    layer = (m.layer_params() - norms) // tp + norms
    layers = m.n_layers // pp * layer
    embed = padded_vocab(m, tp) * m.dim + (m.max_seq_len * m.dim if m.position == "learned" else 0)
    head = padded_vocab(m, tp) * m.dim + m.dim * (2 if m.bias else 1)
    if pp == 1:
        whole = layers + embed + head - (padded_vocab(m, tp) * m.dim if m.tied_embeddings else 0)
        return whole, whole
    return layers + embed, layers + head


def _stages(mbt, tc: tensor.TensorComm, layers: int, pp: int) -> list[Stage]:
    """First, middle and last stage of a pipeline (one stage when pp = 1): T_W is the layers' dW GEMMs."""
    f = layers * (mbt.layer_forward_s + tc.forward_s)
    bw = layers * mbt.layer_weight_grad_s
    b = layers * (mbt.layer_backward_s + tc.backward_s) - bw
    embed = Stage(mbt.embed_forward_s + tc.edge_s, mbt.embed_backward_s, 0.0)
    head = Stage(mbt.head_forward_s, mbt.head_backward_s + tc.edge_s, 0.0)
    core = Stage(f, b, bw)
    if pp == 1:
        return [_sum(core, embed, head)]
    return [_sum(core, embed), core, _sum(core, head)] if pp > 2 else [_sum(core, embed), _sum(core, head)]


def _sum(*stages: Stage, weights: tuple[float, ...] | None = None) -> Stage:
    w = weights or (1.0,) * len(stages)
    return Stage(*(sum(x * getattr(s, k) for x, s in zip(w, stages)) for k in ("t_f", "t_b", "t_w")))


def _mean(stages: list[Stage], pp: int) -> Stage:
    """The mean of all pp stages: the first, pp - 2 copies of the middle one, the last."""
    if len(stages) < 3:
        return _sum(*stages, weights=(1.0 / len(stages),) * len(stages))
    return _sum(*stages, weights=(1.0 / pp, (pp - 2) / pp, 1.0 / pp))


def _data_parallel(m: ModelShape, cluster: Cluster, t: Techniques, layout: Layout, grad_params: int,
                   window_s: float) -> tuple[float, float, float]:
    """(total, exposed, overlapped) seconds per step of the dp reduction of one stage's TP shard."""
    dp = layout.dp(cluster)
    if dp <= 1:
        return 0.0, 0.0, 0.0
    group = dp_cluster(cluster, layout.model_parallel, dp)
    grad = grad_params * t.reduce_bytes
    bucket = bucket_bytes(t, m, group, window_s)
    window = window_s if t.overlap else None
    if t.zero_stage == 1:  # Megatron's distributed optimizer: reduce-scatter, then gather the 16-bit weights
        sync = _bucketed("reducescatter", grad, bucket, group, t, window)
        after = _bucketed("allgather", grad_params * 2.0, bucket, group, t, None)
        return sync.total_s + after.total_s, sync.exposed_s + after.exposed_s, sync.overlapped_s
    sync = _bucketed("allreduce", grad, bucket, group, t, window)
    return sync.total_s, sync.exposed_s, sync.overlapped_s


def predict_layout(model: ModelShape, cluster: Cluster, tech: Techniques, layout: Layout, *, seq_len: int,
                   micro_batch: int, grad_accum: int = 1, eff: Efficiencies | None = None) -> Prediction:
    """Predict one tp x pp x dp configuration; ``grad_accum`` = m micro-batches per pipeline per step."""
    _check(seq_len, micro_batch, grad_accum)
    if layout.model_parallel == 1:
        return predict(model, cluster, tech, seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum,
                       eff=eff)  # data parallel: step.py, unchanged
    layout.check(model, cluster, tech, grad_accum)
    eff = eff or efficiencies_for(cluster.gpu)
    tp, pp, v, m = layout.tp, layout.pp, layout.chunks, grad_accum
    sched = pipe.get_schedule(layout.schedule)
    dp = layout.dp(cluster)
    layers = model.n_layers // pp
    mbt = micro_batch_terms(model, cluster.gpu, tech, eff, seq_len, micro_batch, tp=tp, sp=layout.sp)
    tc = tensor.layer_comm(model, cluster, tech, tp, layout.sp, seq_len, micro_batch)
    stages = _stages(mbt, tc, layers, pp)
    act = micro_batch * seq_len * model.dim * tech.act_bytes
    send = pipe.p2p_s(act, cluster, tp, layout.scatter_gather) if pp > 1 else 0.0
    sends = 2 * v * send  # forward and backward, per chunk, blocking
    slowest, mean = max(stages, key=lambda s: s.total), _mean(stages, pp)
    # the warm-up and cool-down pass through every stage once: the mean stage, its sends included
    bubble = sched.bubble_s(pp, v, mean.t_f + send * v, mean.t_b + send * v, mean.t_w)
    pipeline_s = m * (slowest.total + sends) + bubble
    # data parallel: the largest stage's shard; its last micro-batch's backward is the overlap window
    first, last = stage_params(model, tp, pp)
    dp_total, dp_exposed, dp_overlapped = _data_parallel(model, cluster, tech, layout, max(first, last),
                                                         slowest.t_b + slowest.t_w)
    tied = 0.0
    if pp > 1 and model.tied_embeddings:  # the embedding's two copies, first and last stage, summed each step
        rail = coll.rail_cluster(cluster, 2)
        tied = coll.collective_s("allreduce", padded_vocab(model, tp) * model.dim * tech.reduce_bytes, rail, 2)
    shard = max(first, last) / (dp if tech.zero_stage >= 1 else 1)
    opt = 34.0 * shard / (cluster.gpu.hbm_gbps * GB * eff.hbm)  # AdamW, as compute.optimizer_s
    compute = m * slowest.total
    overlapped = dp_overlapped + m * layers * tc.overlapped_s
    slowdown = eff.overlap_slowdown * min(overlapped, compute)
    step = pipeline_s + dp_exposed + tied + opt + slowdown + eff.step_overhead_s
    tps = seq_len * micro_batch * m / (step * layout.model_parallel)
    fpt = hardware_flops_per_token(model, seq_len, tech)
    peak = cluster.gpu.peak_flops("bf16" if tech.precision in ("fp8", "bf16", "fp16") else tech.gemm_dtype)
    gp, tau, mtbf = job_goodput(tech, cluster.gpus)
    in_flight = sched.in_flight(pp, m, v)
    mem_first = stage_memory_bytes(model, tech, seq_len, micro_batch, params=first, layers=layers,
                                   in_flight=in_flight, tp=tp, sp=layout.sp, dp=dp, logits=pp == 1)
    mem_last = stage_memory_bytes(model, tech, seq_len, micro_batch, params=last, layers=layers,
                                  in_flight=1.0 if pp > 1 else in_flight, tp=tp, sp=layout.sp, dp=dp, logits=True)
    mem = max(mem_first, mem_last)
    tp_s = m * layers * (tc.forward_s + tc.backward_s)
    breakdown = {"tp": tp, "pp": pp, "dp": dp, "virtual_stages": v, "micro_batches": m,
                 "stage_compute_s": compute, "tp_comm_s": tp_s, "pp_send_s": m * sends, "bubble_s": bubble,
                 "bubble_fraction": bubble / (m * mean.total), "stage_imbalance": slowest.total / mean.total,
                 "dp_comm_s": dp_total, "dp_exposed_s": dp_exposed, "tied_embedding_s": tied, "optimizer_s": opt,
                 "overlap_slowdown_s": slowdown, "memory_first_stage_bytes": mem_first,
                 "memory_last_stage_bytes": mem_last, "in_flight_micro_batches": in_flight,
                 "checkpoint_interval_s": tau, "job_mtbf_s": mtbf}
    return Prediction(step_s=step, tokens_per_s_per_gpu=tps, tflops_per_gpu=fpt[CONVENTION] * tps / 1e12,
                      mfu=fpt[CONVENTION] * tps / peak, hfu=fpt["hfu"] * tps / peak, convention=CONVENTION,
                      peak_memory_bytes=mem, fits_memory=mem <= cluster.gpu.hbm_gb * GB,
                      compute_s=compute + opt, comm_s=tp_s + m * sends + dp_total + tied,
                      exposed_comm_s=tp_s + m * sends + dp_exposed + tied, goodput=gp,
                      effective_tokens_per_s_per_gpu=tps * gp, breakdown=breakdown)

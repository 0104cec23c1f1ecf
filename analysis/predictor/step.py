"""One training step: compute, communication (and what of it hides), optimizer; then tokens/s, MFU, goodput.

Start at ``predict``. How the pieces meet, per engine (the data-parallel group is every GPU):

    ddp / zero1   gradients all-reduced once per step, in buckets, during the last micro-batch's backward
                  (gradient accumulation runs without sync); ZeRO-1 then all-gathers the updated 16-bit weights
    zero2         DeepSpeed reduce-scatters the gradient buckets in every micro-batch's backward, and all-gathers
                  the updated 16-bit weights after the optimizer step (not hidden)
    zero3 / FSDP  per micro-batch and per unit of ``layers_per_unit`` layers: all-gather for the forward, again
                  for the backward, reduce-scatter of the gradients. Prefetching hides a unit's collectives behind
                  the previous unit's compute; the first all-gather (and the root unit's: embedding, head) and the
                  last reduce-scatter never hide, and a unit whose collectives outlast its compute stalls.

Bucketed exposure comes from comm/buckets.py's own simulation (``predict_exposed_s``), the one the trainer's
cost-model policy uses, fed with the (alpha, beta) the NCCL model gives for the bucket's size. Communication that
overlaps compute slows it by ``overlap_slowdown`` x its duration (NCCL kernels take SMs and HBM bandwidth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from analysis.predictor import collectives as coll
from analysis.predictor.compute import Efficiencies, MicroBatch, micro_batch_terms, optimizer_s
from analysis.predictor.fitted import efficiencies_for
from analysis.predictor.goodput import job_goodput
from analysis.predictor.inputs import GB, Cluster, ModelShape, Techniques, hardware_flops_per_token
from analysis.predictor.memory import peak_memory_bytes
from comm.buckets import BucketConfig, predict_exposed_s

CONVENTION = "palm"


@dataclass(kw_only=True)
class Prediction:
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float  # palm convention
    mfu: float  # palm FLOPs / the bf16 peak (fp8 runs too, so they compare with bf16 ones)
    hfu: float  # FLOPs executed (recomputation included) / the same peak
    convention: str
    peak_memory_bytes: float
    fits_memory: bool
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    goodput: float
    effective_tokens_per_s_per_gpu: float
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Comm:
    total_s: float  # all communication of the step
    exposed_s: float  # the part nothing hides
    overlapped_s: float  # the part that runs beside compute (and slows it)
    bucket_bytes: float = 0.0


def bucket_bytes(t: Techniques, m: ModelShape, c: Cluster, backward_s: float) -> float:
    """The bucket comm/buckets.py's policy would choose on this cluster (fixed when no policy is given)."""
    cfg: BucketConfig | None = t.bucket
    if cfg is None:
        return t.bucket_bytes
    kind = "reducescatter" if t.zero_stage == 2 else "allreduce"
    # The policy's own rule; a measuring policy (cost_model) gets this cluster's modelled alpha-beta instead.
    return cfg.cluster_bytes(grad_bytes=int(m.total_params() * t.reduce_bytes), element_bytes=t.reduce_bytes,
                             world_size=c.gpus, backward_s=backward_s,
                             alpha_beta=lambda: coll.alpha_beta(kind, 25 * 2**20, c, c.gpus, t.nccl_algo, t.collective))


def _bucketed(kind: str, n: float, bucket: float, c: Cluster, t: Techniques, window_s: float | None) -> _Comm:
    """Gradients reduced in buckets while a backward of ``window_s`` runs (None: after it, all exposed)."""
    bucket = min(max(bucket, n / 10_000), n)  # a bucket of a few bytes would be ten thousand collectives
    alpha, beta = coll.alpha_beta(kind, bucket, c, c.gpus, t.nccl_algo, t.collective)
    total = math.ceil(n / bucket) * alpha + beta * n
    if window_s is None:
        return _Comm(total, total, 0.0, bucket)
    exposed = predict_exposed_s(int(bucket), grad_bytes=int(n), backward_s=window_s, alpha_s=alpha,
                                beta_s_per_byte=beta)
    return _Comm(total, exposed, total - exposed, bucket)


def shard_ranks(t: Techniques, c: Cluster) -> int:
    """Ranks a ZeRO/FSDP shard group spans: all of them, or a hybrid group (HSDP) of ``shard_group``."""
    return min(t.shard_group, c.gpus) if t.shard_group else c.gpus


def _zero3(m: ModelShape, c: Cluster, t: Techniques, mbt: MicroBatch) -> _Comm:
    """One micro-batch of FSDP / ZeRO-3: per-unit gathers and reduce-scatters, prefetched behind compute. Hybrid
    sharding (HSDP) gathers and reduce-scatters within its group and all-reduces the shard across groups."""
    lpu = max(1, t.layers_per_unit)
    units = math.ceil(m.n_layers / lpu)
    layer = m.layer_params() * lpu
    root = m.total_params() - m.n_layers * m.layer_params()  # embedding, head, positions, final norm
    g = shard_ranks(t, c)
    replicas = c.gpus // g
    rail = coll.rail_cluster(c, replicas) if replicas > 1 else None

    def ag(n: float) -> float:
        return coll.collective_s("allgather", n * 2, c, g, t.nccl_algo)  # 16-bit weights

    def rs(n: float) -> float:
        out = coll.collective_s("reducescatter", n * t.reduce_bytes, c, g, t.nccl_algo)
        return out + (coll.collective_s("allreduce", n * t.reduce_bytes / g, rail, replicas, t.nccl_algo)
                      if rail else 0.0)

    ag_u, rs_u, ag_r, rs_r = ag(layer), rs(layer), ag(root), rs(root)
    fwd_u, bwd_u = mbt.layer_forward_s * lpu, mbt.layer_backward_s * lpu
    ag_b = ag_u if t.reshard_after_forward else 0.0  # SHARD_GRAD_OP keeps the gathered weights for backward
    exposed = (ag_r + ag_u + (units - 1) * max(0.0, ag_u - fwd_u)  # forward: first gathers, then stalls
               + (units - 1) * max(0.0, ag_b + rs_u - bwd_u) + rs_u + rs_r)  # backward: stalls, last reductions
    total = ag_r + rs_r + units * (ag_u + ag_b + rs_u)
    return _Comm(total, exposed, total - exposed)


def _communication(m: ModelShape, c: Cluster, t: Techniques, mbt: MicroBatch, accum: int) -> tuple[_Comm, float]:
    """(per-step communication, bucket bytes) summed over the step's micro-batches."""
    if c.gpus <= 1:
        return _Comm(0.0, 0.0, 0.0), 0.0
    if t.zero_stage == 3:
        one = _zero3(m, c, t, mbt)
        return _Comm(accum * one.total_s, accum * one.exposed_s, accum * one.overlapped_s), 0.0
    grad = m.total_params() * t.reduce_bytes
    bucket = bucket_bytes(t, m, c, mbt.backward_s)
    window = mbt.backward_s if t.overlap else None
    if t.zero_stage == 2:
        one = _bucketed("reducescatter", grad, bucket, c, t, window)
        sync = _Comm(accum * one.total_s, accum * one.exposed_s, accum * one.overlapped_s, one.bucket_bytes)
    else:
        sync = _bucketed("allreduce", grad, bucket, c, t, window)
    if t.zero_stage in (1, 2):  # the updated 16-bit weights, gathered after the step (within a hybrid group)
        group = replace(c, gpus=shard_ranks(t, c))
        after = _bucketed("allgather", m.total_params() * 2.0, bucket, group, t, None)
        sync = _Comm(sync.total_s + after.total_s, sync.exposed_s + after.exposed_s, sync.overlapped_s,
                     sync.bucket_bytes)
    return sync, sync.bucket_bytes


def _check(seq: int, mb: int, accum: int) -> None:
    if seq <= 0 or mb <= 0 or accum <= 0:
        raise ValueError(f"seq_len, micro_batch and grad_accum must be positive (got {seq}, {mb}, {accum})")


def predict(model: ModelShape, cluster: Cluster, tech: Techniques, *, seq_len: int, micro_batch: int,
            grad_accum: int = 1, eff: Efficiencies | None = None) -> Prediction:
    """Predict one data-parallel training configuration (every GPU holds a replica or a ZeRO shard).

    ``eff``: the GPU type's constants; by default those fitted on the calibration half of the data set
    (data/fit.json)."""
    _check(seq_len, micro_batch, grad_accum)
    eff = eff or efficiencies_for(cluster.gpu)
    mbt = micro_batch_terms(model, cluster.gpu, tech, eff, seq_len, micro_batch)
    opt = optimizer_s(model, cluster.gpu, tech, eff, shard_ranks(tech, cluster))
    comm, bucket = _communication(model, cluster, tech, mbt, grad_accum)
    compute = grad_accum * mbt.total_s + opt + eff.step_overhead_s
    slowdown = eff.overlap_slowdown * min(comm.overlapped_s, grad_accum * mbt.total_s)
    step = compute + comm.exposed_s + slowdown
    tokens = seq_len * micro_batch * grad_accum
    tps = tokens / step
    fpt = hardware_flops_per_token(model, seq_len, tech)
    peak = cluster.gpu.peak_flops("bf16" if tech.precision in ("fp8", "bf16", "fp16") else tech.gemm_dtype)
    gp, tau, mtbf = job_goodput(tech, cluster.gpus)
    mem = peak_memory_bytes(model, tech, seq_len, micro_batch, shard_ranks(tech, cluster))
    breakdown = {"gemm_s": grad_accum * mbt.gemm_s, "attention_s": grad_accum * mbt.attention_s,
                 "scores_s": grad_accum * mbt.scores_s, "elementwise_s": grad_accum * mbt.elementwise_s,
                 "loss_s": grad_accum * mbt.loss_s, "layer_overhead_s": grad_accum * mbt.overhead_s,
                 "optimizer_s": opt, "overlap_slowdown_s": slowdown, "bucket_bytes": bucket,
                 "checkpoint_interval_s": tau, "job_mtbf_s": mtbf}
    return Prediction(step_s=step, tokens_per_s_per_gpu=tps, tflops_per_gpu=fpt[CONVENTION] * tps / 1e12,
                      mfu=fpt[CONVENTION] * tps / peak, hfu=fpt["hfu"] * tps / peak, convention=CONVENTION,
                      peak_memory_bytes=mem, fits_memory=mem <= cluster.gpu.hbm_gb * GB, compute_s=compute,
                      comm_s=comm.total_s, exposed_comm_s=comm.exposed_s, goodput=gp,
                      effective_tokens_per_s_per_gpu=tps * gp, breakdown=breakdown)

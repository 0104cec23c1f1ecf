"""Gradient bucket size policies: how many bytes DDP packs into one all-reduce.

Start at ``choose_bucket_bytes``: it turns the comm/bucket option (a ``BucketConfig``, or a subclass: each
policy is one class whose ``choose`` sizes the bucket, named by its YAML's ``_target_``) into a ``BucketChoice``
(the size, the policy and one readable line saying why, which it logs). Three policies:

    fixed       bucket_cap_mb, as DDP takes it (torch's default 25 MiB)
    gpu_count   max(min_elements, elements_per_rank x data-parallel size) elements: Megatron-core's rule
                (40M, 1M per rank), so the bucket grows once there are more than 40 ranks
    cost_model  measure the process group's latency alpha and inverse bandwidth beta at start-up
                (``measure_alpha_beta``), then take the candidate size with the least predicted exposed
                communication (``predict_exposed_s``, ``best_candidate``)

Why hand-written rather than DDP's constant: the bucket size is a research knob of its own. Small buckets pay
the per-collective latency alpha many times and, once the communication stream falls behind the backward
pass, those alphas queue up; big buckets reduce in few collectives but the last one cannot start before the
backward pass ends, so its whole transfer is exposed. The best size depends on the link (alpha, beta), the
gradient volume and the backward time, which is what the cost model measures instead of guessing.

Limits of the cost model: gradients are assumed to become ready at a uniform rate over the backward pass,
communication is assumed not to slow the compute, and one bucket is reduced at a time (DDP's and chuanliu's
hooks both reduce buckets in order on one stream or thread).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from comm.hooks import synchronizer

log = logging.getLogger(__name__)

MIB = 2**20

# Baichuan-7B trained with DeepSpeed's reduce_bucket_size = 1e8 *elements*. A ``fixed`` preset reproduces it
# with bucket_cap_mb = 1e8 x element bytes / 2**20: 190.73 MiB for bf16 gradients (2 bytes), 381.47 for fp32.
baichuan_reduce_bucket_elements = 100_000_000


def _default_candidates_mb() -> list[float]:
    return [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]


def _default_probe_sizes_kb() -> list[int]:
    return [4, 64, 1024, 8192]


@dataclass(kw_only=True)
class BucketConfig:
    """The comm/bucket group's base, and its ``fixed`` policy; ``GpuCountBuckets`` and ``CostModelBuckets`` below
    are the others. Every key stays settable on every option (the group's schema), so a sweep can vary any."""

    option_field: ClassVar[str] = "policy"  # set by each class, not by the YAML (experiments.config schemas)
    policy: str = "fixed"  # the policy's name, for logs and summary.json; the YAML's _target_ chooses the class
    bucket_cap_mb: float = 25.0  # fixed: DDP's bucket_cap_mb (MiB, 2**20 bytes)
    # gpu_count: max(min_elements, elements_per_rank x data-parallel size) elements (Megatron-core's rule)
    min_elements: int = 40_000_000
    elements_per_rank: int = 1_000_000  # gpu_count: elements added per data-parallel rank
    # cost_model: bucket sizes considered (MiB); any above the total gradient size count as one bucket
    candidates_mb: list[float] = field(default_factory=_default_candidates_mb)
    # cost_model: all-reduce sizes (KiB) timed to fit alpha and beta; at least two different sizes
    probe_sizes_kb: list[int] = field(default_factory=_default_probe_sizes_kb)
    probe_iters: int = 5  # cost_model: timed all-reduces per probe size (the fastest counts)

    def __post_init__(self) -> None:
        own = next(f.default for f in dataclasses.fields(self) if f.name == "policy")
        if self.policy != own:
            raise ValueError(f"comm.bucket.policy={self.policy!r} does not choose the policy (this option is "
                             f"{own!r}, class {type(self).__name__}); select it with comm/bucket={self.policy}")
        _check_positive("bucket_cap_mb", self.bucket_cap_mb)
        _check_positive("min_elements", self.min_elements)
        _check_positive("elements_per_rank", self.elements_per_rank)
        _check_positive("probe_iters", self.probe_iters)
        if not self.candidates_mb or min(self.candidates_mb) <= 0:
            raise ValueError(f"comm.bucket.candidates_mb={list(self.candidates_mb)} must be a non-empty list "
                             "of positive sizes in MiB; set e.g. [1, 4, 16, 64].")
        if min(self.probe_sizes_kb, default=0) <= 0 or len(set(self.probe_sizes_kb)) < 2:
            raise ValueError(f"comm.bucket.probe_sizes_kb={list(self.probe_sizes_kb)} needs at least two "
                             "different positive sizes in KiB to fit latency and bandwidth; set e.g. "
                             "[4, 64, 1024, 8192].")

    def choose(self, *, grad_elements: int, grad_element_bytes: int, world_size: int, backward_s: float | None,
               reduce: Callable[[torch.Tensor], None] | None, device: torch.device) -> BucketChoice:
        """This run's bucket (``choose_bucket_bytes`` validates the inputs, names the timed collective, logs)."""
        n = int(self.bucket_cap_mb * MIB)
        reason = f"fixed: bucket_cap_mb={self.bucket_cap_mb:g} = {n:,} bytes = {n / MIB:.1f} MiB"
        return BucketChoice(bucket_bytes=n, policy=self.policy, reason=reason)

    def cluster_bytes(self, *, grad_bytes: int, element_bytes: int, world_size: int, backward_s: float,
                      alpha_beta: Callable[[], tuple[float, float]]) -> float:
        """The bucket this policy gives on a modelled cluster (analysis.predictor): the same rule, with the
        cluster's modelled (alpha, beta) in place of a measurement."""
        return self.bucket_cap_mb * MIB


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"comm.bucket.{key}={value} must be positive; set comm.bucket.{key} to a value "
                         "above 0.")


@dataclass
class BucketChoice:
    bucket_bytes: int  # what DDP gets: bucket_cap_mb = bucket_bytes / 2**20
    policy: str  # the policy that chose it
    reason: str  # one readable line for the log
    element_bytes: int = 4  # bytes per gradient element in the dtype the engine reduces (4 fp32, 2 bf16)
    alpha_s: float | None = None  # cost_model: measured latency per all-reduce (seconds)
    beta_s_per_byte: float | None = None  # cost_model: measured seconds per byte
    predicted_exposed_s: float | None = None  # cost_model: predicted exposed communication per step

    @property
    def elements(self) -> int:
        """The bucket in gradient elements (what DeepSpeed's and megatron-core's bucket sizes count)."""
        return max(1, self.bucket_bytes // self.element_bytes)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "elements": self.elements}


@dataclass(frozen=True)
class MeasuredCollective:
    """The in-place SUM all-reduce the run's gradients will go through (the flat or hierarchical reduce of its comm
    hook, an emulated slow link included), named for the log: what the cost model times."""

    name: str
    reduce: Callable[[torch.Tensor], None]


# Fraction of the peak a backward pass is assumed to reach when the cost model needs its duration before any step
# has run: `small` trains at 70-80% of the measured peak on a CPU (docs/benchmarks.md).
BACKWARD_EFFICIENCY = 0.6


def estimate_backward_s(hfu_flops_per_token: float, tokens_per_rank: int, peak_flops: float | None) -> float | None:
    """Backward time of one step per rank: 2/3 of the step's hardware FLOPs at BACKWARD_EFFICIENCY of the peak
    (None without a peak)."""
    if peak_flops is None:
        return None
    return (2 / 3) * hfu_flops_per_token * tokens_per_rank / (BACKWARD_EFFICIENCY * peak_flops)


# ---------------------------------------------------------------- measuring the link

def measure_alpha_beta(reduce: Callable[[torch.Tensor], None], sizes_bytes: list[int], iters: int,
                       device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Fit t = alpha + beta * bytes to timed in-place all-reduces of float32 tensors of each size.

    ``reduce`` is the collective the run will use (``comm.hierarchical.flat_all_reduce`` or a hook's own
    reduce, so an emulated slow link is included); ``device`` is where the gradients live, so the probe runs on
    the backend that will reduce them (NCCL for CUDA tensors under "cpu:gloo,cuda:nccl", not gloo over TCP).
    Each size is warmed up once, then timed ``iters`` times (after a barrier when a process group exists). The
    fastest time counts: on a shared machine a pause only ever adds time, so the minimum is the estimate least
    biased by noise, while a median of a few loaded samples can make a bigger transfer look faster and the
    fitted slope vanish. Collective: every rank must call it, and every rank gets the same pair (the
    element-wise maximum over ranks).
    """
    fastest = [_fastest_reduce_s(reduce, n, iters, device) for n in sizes_bytes]
    alpha, beta = _fit_nonnegative([float(n) for n in sizes_bytes], fastest)
    return _agree_across_ranks(alpha, beta, device)


def _fastest_reduce_s(reduce: Callable[[torch.Tensor], None], n_bytes: int, iters: int,
                      device: torch.device) -> float:
    # zeros stay zeros however often summed
    tensor = torch.zeros(max(1, n_bytes // 4), dtype=torch.float32, device=device)
    sync = synchronizer(device)  # CUDA work returns once queued: wait before each clock read, or launches are timed
    reduce(tensor)  # warm-up: first-use allocations and connection set-up are not the link's cost
    times = []
    for _ in range(iters):
        if _distributed():
            dist.barrier()  # start together, so no rank's wait for a late peer counts as transfer time
        sync()
        t0 = time.perf_counter()
        reduce(tensor)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _fit_nonnegative(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares of y = alpha + beta * x with alpha, beta >= 0 (a negative one is 0, the other refit).

    Relative errors are minimised (each point weighted by 1 / y^2): probe sizes span three or four orders of
    magnitude, and a plain fit lets the largest transfers decide alone, so a few percent of noise on a 16 MiB
    all-reduce swamps the 4 KiB one that carries the latency.
    """
    w = [1.0 / max(yi, 1e-12) ** 2 for yi in y]
    sw = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x)) / sw
    my = sum(wi * yi for wi, yi in zip(w, y)) / sw
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x))
    beta = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y)) / sxx
    alpha = my - beta * mx
    if beta < 0:  # time did not grow with size: latency only
        return max(0.0, my), 0.0
    if alpha < 0:  # through the origin: bandwidth only
        return 0.0, max(0.0, sum(wi * xi * yi for wi, xi, yi in zip(w, x, y)) / sum(wi * xi * xi for wi, xi in zip(w, x)))
    return alpha, beta


def _agree_across_ranks(alpha: float, beta: float, device: torch.device) -> tuple[float, float]:
    # Every rank must pick the same bucket size, or DDP's buckets (and collectives) would not match.
    if not _distributed():
        return alpha, beta
    pair = torch.tensor([alpha, beta], dtype=torch.float64, device=device)  # NCCL alone refuses CPU tensors
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return float(pair[0]), float(pair[1])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- the cost model

def predict_exposed_s(bucket_bytes: int, *, grad_bytes: int, backward_s: float, alpha_s: float,
                      beta_s_per_byte: float) -> float:
    """Communication left after the backward pass when gradients are reduced in buckets of ``bucket_bytes``.

    A deterministic simulation of DDP with overlap: k = ceil(grad_bytes / bucket_bytes) buckets (the last one
    smaller); gradients are produced at a uniform rate over ``backward_s``, so bucket i is ready when its last
    byte is, at backward_s x (bytes up to and including bucket i) / grad_bytes; buckets are reduced one at a
    time, done_i = max(ready_i, done_{i-1}) + alpha + beta x size_i. Exposed = done_last - backward_s (>= 0).

    The trade-off: small buckets start early and leave only a small last bucket, but pay alpha per bucket, and
    once communication falls behind the compute those alphas queue up and become exposed; big buckets pay few
    alphas, but the last bucket's reduction (alpha + beta x its size) cannot start before the backward pass
    ends, so it is exposed whole. One bucket of everything exposes alpha + beta x grad_bytes.
    """
    if bucket_bytes <= 0 or grad_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} and grad_bytes={grad_bytes} must both be positive.")
    k = math.ceil(grad_bytes / bucket_bytes)
    done = 0.0
    for i in range(k):
        end = min(grad_bytes, (i + 1) * bucket_bytes)  # bytes up to and including bucket i
        ready = backward_s * end / grad_bytes
        done = max(ready, done) + alpha_s + beta_s_per_byte * (end - i * bucket_bytes)
    return max(0.0, done - backward_s)


def best_candidate(cfg: BucketConfig, *, grad_bytes: int, backward_s: float, alpha_s: float,
                   beta_s_per_byte: float) -> tuple[int, float]:
    """The candidate size (capped at ``grad_bytes``) with the least predicted exposed time; ties -> larger."""
    sizes = sorted({min(int(mb * MIB), grad_bytes) for mb in cfg.candidates_mb}, reverse=True)
    predicted = [predict_exposed_s(b, grad_bytes=grad_bytes, backward_s=backward_s, alpha_s=alpha_s,
                                   beta_s_per_byte=beta_s_per_byte) for b in sizes]
    best = min(range(len(sizes)), key=lambda i: predicted[i])  # min keeps the first (the largest) on ties
    return sizes[best], predicted[best]


# ---------------------------------------------------------------- the policies

def choose_bucket_bytes(cfg: BucketConfig, *, grad_elements: int, grad_element_bytes: int, world_size: int,
                        backward_s: float | None = None,
                        reduce: MeasuredCollective | Callable[[torch.Tensor], None] | None = None,
                        device: torch.device = torch.device("cpu")) -> BucketChoice:
    """The bucket size the policy ``cfg`` gives for this model and process group; logged with its reason.

    grad_elements: gradient elements DDP reduces (the trainable parameters); grad_element_bytes: their size
    (4 for fp32 gradients, 2 for bf16); world_size: the data-parallel size. cost_model only: backward_s, the
    backward pass's time, reduce, the in-place all-reduce to time (collective: every rank calls this), and
    device, where the gradients live (the probe's tensors go there).
    """
    if grad_elements <= 0 or grad_element_bytes <= 0 or world_size < 1:
        raise ValueError(f"bucket sizing needs gradients and ranks: got grad_elements={grad_elements}, "
                         f"grad_element_bytes={grad_element_bytes}, world_size={world_size}; pass positive "
                         "counts.")
    name = reduce.name if isinstance(reduce, MeasuredCollective) else None
    reduce = reduce.reduce if isinstance(reduce, MeasuredCollective) else reduce
    choice = cfg.choose(grad_elements=grad_elements, grad_element_bytes=grad_element_bytes, world_size=world_size,
                        backward_s=backward_s, reduce=reduce, device=device)
    reason = f"{choice.reason} (timed: {name})" if name and choice.alpha_s is not None else choice.reason
    choice = dataclasses.replace(choice, element_bytes=grad_element_bytes, reason=reason)
    log.info("gradient buckets: %s = %s elements of %d B", choice.reason, f"{choice.elements:,}", grad_element_bytes)
    return choice


def gpu_count_elements(cfg: BucketConfig, world_size: int) -> int:
    """Megatron-core's rule: max(min_elements, elements_per_rank x data-parallel size) gradient elements.
    Pure: the cluster predictor (analysis/predictor) sizes buckets with it too."""
    return max(cfg.min_elements, cfg.elements_per_rank * world_size)


@dataclass(kw_only=True)
class GpuCountBuckets(BucketConfig):
    """comm/bucket=gpu_count: the bucket grows with the data-parallel size (Megatron-core's rule)."""

    policy: str = "gpu_count"

    def choose(self, *, grad_element_bytes: int, world_size: int, **_) -> BucketChoice:
        elements = gpu_count_elements(self, world_size)
        n = elements * grad_element_bytes
        reason = (f"gpu_count: max({_short(self.min_elements)}, {_short(self.elements_per_rank)} x {world_size}) = "
                  f"{elements:,} elements x {grad_element_bytes} B = {n / MIB:.1f} MiB")
        return BucketChoice(bucket_bytes=n, policy=self.policy, reason=reason)

    def cluster_bytes(self, *, element_bytes: int, world_size: int, **_) -> float:
        return gpu_count_elements(self, world_size) * element_bytes


@dataclass(kw_only=True)
class CostModelBuckets(BucketConfig):
    """comm/bucket=cost_model: measure alpha and beta at start-up, take the candidate with the least predicted
    exposed communication (the module docstring)."""

    policy: str = "cost_model"

    def choose(self, *, grad_elements: int, grad_element_bytes: int, world_size: int, backward_s: float | None,
               reduce: Callable[[torch.Tensor], None] | None, device: torch.device) -> BucketChoice:
        if world_size == 1:
            raise ValueError("comm.bucket.policy=cost_model needs several processes to measure; use fixed.")
        if reduce is None:
            raise ValueError("comm.bucket.policy=cost_model needs the all-reduce to time (pass reduce=, e.g. "
                             "comm.hierarchical.flat_all_reduce); or use fixed.")
        if backward_s is None or not backward_s >= 0:
            raise ValueError(f"comm.bucket.policy=cost_model needs the backward time (backward_s={backward_s}); "
                             "pass a measured value >= 0 or use fixed.")
        alpha, beta = measure_alpha_beta(reduce, [kb * 1024 for kb in self.probe_sizes_kb], self.probe_iters,
                                         device)
        grad_bytes = grad_elements * grad_element_bytes
        n, exposed = best_candidate(self, grad_bytes=grad_bytes, backward_s=backward_s, alpha_s=alpha,
                                    beta_s_per_byte=beta)
        capped = " (capped at the total)" if n == grad_bytes and n < max(self.candidates_mb) * MIB else ""
        gbps = f"{1e-9 / beta:.2f} GB/s" if beta > 0 else "unlimited bandwidth"
        reason = (f"cost_model: alpha {alpha * 1e6:.1f} us, {gbps}; {n / MIB:.2f} MiB{capped} minimises "
                  f"predicted exposed comm ({exposed * 1e3:.2f} ms) for {grad_bytes / MIB:.1f} MiB of gradients "
                  f"and a {backward_s * 1e3:.1f} ms backward")
        return BucketChoice(bucket_bytes=n, policy=self.policy, reason=reason, alpha_s=alpha,
                            beta_s_per_byte=beta, predicted_exposed_s=exposed)

    def cluster_bytes(self, *, grad_bytes: int, backward_s: float, alpha_beta: Callable[[], tuple[float, float]],
                      **_) -> float:
        alpha, beta = alpha_beta()
        return best_candidate(self, grad_bytes=int(grad_bytes), backward_s=backward_s, alpha_s=alpha,
                              beta_s_per_byte=beta)[0]


def _short(n: int) -> str:
    return f"{n / 1e6:g}M" if n % 100_000 == 0 else f"{n:,}"

"""Unpublished inputs are ranges, so the answer is an interval.

``predict_interval`` predicts every combination of the values in a ``Ranges`` (NICs per node and their speed,
the micro-batch / accumulation split, the bucket size, NCCL's algorithm, the reduction dtype), and reports the
point estimate (the first value of each range), the lowest and highest prediction among the combinations whose
memory fits the GPU (one that does not fit cannot have been the run), and, for a published figure,
whether it lies inside, which combinations come within ``tolerance`` of it, and how far each input alone moves the
prediction (the others at their point values).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from analysis.predictor.compute import Efficiencies
from analysis.predictor.inputs import Cluster, ModelShape, Ranges, Techniques, apply_assumption
from analysis.predictor.step import Prediction, predict


@dataclass(kw_only=True)
class Interval:
    point: Prediction
    low: Prediction
    high: Prediction
    combinations: list[dict] = field(default_factory=list)  # {"assumption": {...}, "tokens_per_s_per_gpu", "mfu"}
    sensitivity: dict[str, dict] = field(default_factory=dict)  # input -> {value: mfu} with the rest at the point
    inside: bool | None = None  # the published figure within [low, high] (None: nothing published)
    infeasible: int = 0  # assumption sets left out of [low, high] because their memory does not fit the GPU
    explaining: list[dict] = field(default_factory=list)  # combinations within tolerance of the published figure


def _fmt(v) -> str:
    return f"{v[0]}x{v[1]}" if isinstance(v, tuple) else (f"{v / 2**20:.0f} MiB" if isinstance(v, float) and v > 1e5
                                                          else str(v))


def predict_interval(model: ModelShape, cluster: Cluster, tech: Techniques, *, seq_len: int, micro_batch: int,
                     grad_accum: int = 1, ranges: Ranges, eff: Efficiencies | None = None,
                     published_tokens_per_s: float | None = None, published_mfu: float | None = None,
                     tolerance: float = 0.05) -> Interval:
    memo: dict[tuple, Prediction] = {}  # the point and each one-axis change are among the combinations

    def one(choice: dict) -> Prediction:
        key = tuple(sorted(choice.items()))
        if key not in memo:
            c, t, mb, ga = apply_assumption(cluster, tech, micro_batch, grad_accum, choice)
            memo[key] = predict(model, c, t, seq_len=seq_len, micro_batch=mb, grad_accum=ga, eff=eff)
        return memo[key]

    combos = ranges.combinations() or [{}]
    preds = [(choice, one(choice)) for choice in combos]
    point = one(ranges.point())
    # an assumption set whose memory does not fit the GPU cannot have been the run: out of the interval (listed)
    feasible = [cp for cp in preds if cp[1].fits_memory] or preds
    low = min(feasible, key=lambda cp: cp[1].tokens_per_s_per_gpu)[1]
    high = max(feasible, key=lambda cp: cp[1].tokens_per_s_per_gpu)[1]
    rows = [{"assumption": {k: _fmt(v) for k, v in c.items()}, "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
             "mfu": p.mfu, "fits_memory": p.fits_memory} for c, p in preds]
    sensitivity = {}
    for axis, values in ranges.axes().items():
        sensitivity[axis] = {_fmt(v): one(ranges.point() | {axis: v}).mfu for v in values}
    iv = Interval(point=point, low=low, high=high, combinations=rows, sensitivity=sensitivity,
                  infeasible=len(preds) - len(feasible) if len(feasible) < len(preds) else 0)
    if published_tokens_per_s is not None or published_mfu is not None:
        key, target = (("tokens_per_s_per_gpu", published_tokens_per_s) if published_tokens_per_s is not None
                       else ("mfu", published_mfu))
        lo, hi = getattr(low, key), getattr(high, key)
        iv.inside = lo * (1 - 1e-9) <= target <= hi * (1 + 1e-9)
        iv.explaining = [r for r in rows if abs(r[key] - target) <= tolerance * target]
    return iv

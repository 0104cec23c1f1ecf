"""The one metrics processor: raw step measurements in, one flat dict of named metrics out to every sink.

Keys (the report, the wandb dashboard and the tests read these names):
    train/loss  train/lr  train/grad_norm
    perf/step_s  perf/tokens_per_s  perf/tokens_per_s_per_device
    perf/tflops/<conv>  perf/mfu/<conv>      <conv> in analysis.flops.CONVENTIONS; TFLOPS are per device,
                                             MFU a fraction of the device peak (null when the peak is unknown)
    mem/peak_bytes                           CUDA max allocated on GPU, peak RSS of the process on CPU
Anything else a component measures (comm/..., fault/...) arrives in ``extra`` and is passed through; EXTRA_KEYS
lists those keys, and ``step_keys``/``summary_keys`` give the full lists the dashboard (analysis/dashboard.py) and
the tests read (tests/integration/test_dashboard.py holds them against a real run).
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from analysis.flops import CONVENTIONS, DEFAULT_CONVENTION
from analysis.peaks import BAICHUAN_7B

log = logging.getLogger(__name__)

# What components pass through ``extra``, and who emits it (grep the emitter for the name). Every step logs each key
# (null where it does not apply) except the comm/ ones, which need more than one rank and a chuanliu all-reduce hook
# (comm/algorithm=flat|hierarchical under DDP).
EXTRA_KEYS: dict[str, str] = {
    "mem/activation_bytes": "bytes autograd saved for backward (experiments/trainer.py, systems/memory.py's meter); "
                            "under pp the most alive at once; null under zero-bubble schedules (the hooks leak there)",
    "precision/loss_scale": "fp16 loss scale, 1.0 without a scaler (engine.step(), comm/engines/engine.py)",
    "precision/skipped_steps": "optimizer steps skipped on fp16 overflow so far (engine.step())",
    "fault/forward_s": "this rank's forward compute time, the straggler signal (experiments/trainer.py)",
    "fault/ckpt_block_s": "seconds a checkpoint save blocked training; null on steps without one (trainer)",
    "comm/total_s": "seconds inside collectives this step (comm/hooks.py CommState.step_stats)",
    "comm/exposed_s": "communication not hidden behind backward, seconds (comm/hooks.py)",
    "comm/exposed_frac": "comm/exposed_s over comm/total_s (comm/hooks.py)",
    "comm/bucket_bytes": "gradient bucket size the comm/bucket policy chose (comm/engines/ddp.py)",
}
# Logged every step only under pipeline parallelism (parallel.pp > 1; comm/engines/pipeline.py, engine.step()).
PIPELINE_KEYS: dict[str, str] = {
    "pp/bubble": "measured bubble: mean over the pipeline's ranks of idle / step, idle = step - own stage compute "
                 "(comm/parallel/bubble.py measure_step)",
    "pp/p2p_wait_s": "mean seconds a pipeline rank spent inside the schedule's p2p waits this step",
    "pp/step_s": "the schedule step's wall time, slowest pipeline rank, from a common barrier",
    "pp/bubble_simulated": "torch's action lists for this schedule list-scheduled at T_F=T_B=T_W: the bubble the "
                           "schedule should reach (constant per run)",
    "pp/bubble_formula": "the schedule's paper formula at T_F=T_B=T_W (constant per run)",
}
# Logged every step only under tensor parallelism (parallel.tp > 1; comm/parallel/tensor.py TPCommMeter).
TENSOR_PARALLEL_KEYS: dict[str, str] = {
    "tp/collectives": "tensor-parallel collectives launched in the step's forward and backward",
    "tp/comm_bytes": "bytes those collectives carried in, this rank",
    "tp/comm_s": "seconds from each tp collective's launch to the end of its wait, summed",
    "tp/exposed_s": "seconds the host was blocked in tp collectives (launch + wait): not hidden by compute",
}
MEDIAN_PREFIXES = ("mem/", "comm/", "precision/", "pp/", "tp/")  # extra keys summary.json holds steady-state medians of


def step_keys(conventions: tuple[str, ...] = CONVENTIONS, *, pipeline: bool = False,
              tensor_parallel: bool = False) -> list[str]:
    """Every key one training step logs (a metrics.jsonl row besides step and time; the wandb history);
    ``pipeline``: a run with parallel.pp > 1, which adds PIPELINE_KEYS; ``tensor_parallel``: parallel.tp > 1,
    TENSOR_PARALLEL_KEYS."""
    keys = ["train/loss", "train/lr", "train/grad_norm", "perf/step_s", "perf/tokens_per_s",
            "perf/tokens_per_s_per_device"]
    keys += [f"perf/{k}/{c}" for c in conventions for k in ("tflops", "mfu")]
    return keys + ["mem/peak_bytes", *EXTRA_KEYS, *(PIPELINE_KEYS if pipeline else ()),
                   *(TENSOR_PARALLEL_KEYS if tensor_parallel else ())]


def summary_keys(conventions: tuple[str, ...] = CONVENTIONS, *, pipeline: bool = False,
                 tensor_parallel: bool = False) -> list[str]:
    """summary.json's figures as the wandb sink stores them in the run summary (nested keys joined by dots): the
    steady-state medians, the peak memory over the run and the comparison with Baichuan-7B."""
    from analysis.sinks import _flatten  # the wandb sink's own flattening

    medians = [k for k in step_keys(conventions, pipeline=pipeline, tensor_parallel=tensor_parallel)
               if k.startswith(("perf/", *MEDIAN_PREFIXES))]
    vs = _flatten(compare_to_baichuan({}, {}), "vs_baichuan_7b.")
    return [f"median.{k}" for k in medians] + ["mem/peak_bytes", "loss.first", "loss.last", *vs]


class Sink(Protocol):
    def log(self, metrics: dict[str, Any]) -> None: ...
    def close(self, summary: dict[str, Any]) -> None: ...


@dataclass
class MetricsProcessor:
    flops_per_token: dict[str, float]  # per convention, from analysis.flops.flops_per_token
    peak_flops: float | None  # per device FLOP/s; None = unknown
    tokens_per_step: int  # global: world x micro-batch x accumulation x seq_len
    world_size: int
    sinks: list[Sink] = field(default_factory=list)
    warmup_steps: int = 3  # steps left out of the steady-state summary (allocator, caches, DDP buckets)
    history: list[dict[str, Any]] = field(default_factory=list)
    _warned_mfu: bool = False

    def step(self, step: int, *, loss: float, lr: float, grad_norm: float, step_s: float,
             mem_peak_bytes: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / step_s
        per_device = tokens_per_s / self.world_size
        m: dict[str, Any] = {"step": step, "time": time.time(), "train/loss": loss, "train/lr": lr,
                             "train/grad_norm": grad_norm, "perf/step_s": step_s,
                             "perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_device": per_device}
        for conv in CONVENTIONS:
            achieved = per_device * self.flops_per_token[conv]  # FLOP/s per device
            m[f"perf/tflops/{conv}"] = achieved / 1e12
            m[f"perf/mfu/{conv}"] = achieved / self.peak_flops if self.peak_flops else None
        if not self._warned_mfu and (m["perf/mfu/6n"] or 0) > 1.0:
            self._warned_mfu = True  # once: a peak below what training reaches means the peak is wrong
            log.warning("MFU %.0f%% exceeds 100%%: the peak (%.3g TFLOPS) is below what this run achieves; "
                        "check hardware.peak_tflops or recalibrate (hardware.recalibrate=true)",
                        100 * m["perf/mfu/6n"], self.peak_flops / 1e12)
        m["mem/peak_bytes"] = mem_peak_bytes
        m.update(extra or {})
        self.history.append(m)
        for sink in self.sinks:
            sink.log(m)
        return m

    def summary(self, environment: dict[str, Any]) -> dict[str, Any]:
        steady = self.history[self.warmup_steps:] or self.history
        keys = ["perf/step_s", "perf/tokens_per_s", "perf/tokens_per_s_per_device"]
        keys += [f"perf/{k}/{c}" for k in ("tflops", "mfu") for c in CONVENTIONS]
        keys += sorted({k for m in steady for k in m if k.startswith(MEDIAN_PREFIXES)})
        med = {k: _median([m.get(k) for m in steady]) for k in keys}
        return {
            "steps": len(self.history),
            "steady_state_steps": len(steady),
            "steady_state": "median over steps after the first %d" % min(self.warmup_steps, len(self.history)),
            "loss": {"first": self.history[0]["train/loss"] if self.history else None,
                     "last": self.history[-1]["train/loss"] if self.history else None},
            "median": med,
            "mem/peak_bytes": max((m["mem/peak_bytes"] or 0 for m in self.history), default=None),
            "flops_per_token": self.flops_per_token,
            "environment": environment,
            "vs_baichuan_7b": compare_to_baichuan(med, environment),
        }

    def close(self, summary: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.close(summary)


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def compare_to_baichuan(median: dict[str, Any], environment: dict[str, Any]) -> dict[str, Any]:
    """Set this run's figures beside Baichuan-7B's 182 TFLOPS / 58.3% and say what the comparison means."""
    conv = DEFAULT_CONVENTION
    tflops, mfu = median.get(f"perf/tflops/{conv}"), median.get(f"perf/mfu/{conv}")
    device = environment.get("device_name", "this device")
    if environment.get("device_type") == "cpu":
        meaning = (f"This run is on a CPU ({device}), so TFLOPS are not comparable with an A800's: the CPU's "
                   f"measured {environment.get('dtype')} GEMM peak is {environment.get('peak_tflops') or 0:.3f} "
                   "TFLOPS against the A800's 312 bf16. MFU is the comparable figure, with a caveat: on a CPU "
                   "the peak is a measured large-GEMM rate, not a datasheet number, so CPU MFU reads higher "
                   "than a GPU's would for the same efficiency. Compare techniques by ratios within one "
                   "machine; use the cluster predictor for what a configuration reaches on A800s.")
    elif mfu is None:
        meaning = (f"The peak of {device} is unknown, so MFU is null; TFLOPS are per device under the "
                   f"{conv} convention.")
    else:
        meaning = (f"Both figures are per device under the {conv} convention (Baichuan did not publish its "
                   "convention; PaLM's is the common one). Baichuan-7B's were measured on ~1000 A800s with "
                   f"ZeRO-2; this run used {environment.get('world_size')} device(s) of {device}.")
    return {
        "reference": {**BAICHUAN_7B, "convention_assumed": conv},
        "convention": conv,
        "achieved_tflops_per_device": tflops,
        "achieved_mfu": mfu,
        "tflops_ratio_to_182": None if tflops is None else tflops / BAICHUAN_7B["tflops_per_gpu"],
        "mfu_ratio_to_58_3": None if mfu is None else mfu / BAICHUAN_7B["mfu"],
        "meaning": meaning,
    }

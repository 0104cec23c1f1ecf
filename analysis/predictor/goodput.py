"""Goodput: the useful fraction of a long job's time under failures and checkpoints (Young 1974, Daly 2006)."""
from __future__ import annotations

import math

from analysis.predictor.inputs import Techniques


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


def job_goodput(t: Techniques, gpus: int) -> tuple[float, float, float]:
    """(goodput, checkpoint interval s, job MTBF s) with Young's interval unless one is set."""
    mtbf = job_mtbf_s(t, gpus)
    tau = t.checkpoint_interval_s or (young_interval_s(t.checkpoint_block_s, mtbf) if math.isfinite(mtbf)
                                      else math.inf)
    gp = 1.0 if math.isinf(tau) else goodput(tau, t.checkpoint_block_s, t.restart_s, mtbf)
    return gp, tau, mtbf

"""Pipeline schedules as facts: each one's names, layout, chunk and micro-batch rules, bubble and memory (pure forms).

Start at ``SCHEDULES`` (keyed by the papers' names, the predictor's ``--schedule``) or ``from_torch`` (torch's class
name, the trainer's ``parallel.pp_schedule``). The runner (comm/parallel/pipeline.py: stages, torch's schedule
classes, the simulation of their action lists, the measured bubble) and the cluster predictor
(analysis/predictor/pipeline.py and parallel.py) both read this table, so a chuanliu pp run maps onto the predictor's
schedule without retyping it (analysis/predictor/configs.py), and a formula is fixed in one place.

Why here. The facts belong to the technique, pipeline parallelism, which comm/ owns; analysis/ may read comm/'s pure
rules (as it reads comm/buckets.py's bucket rules) but comm/ never imports analysis/ (the pipe runs one way:
analysis reads what training wrote). The file sits at comm/'s top level, not in comm/parallel/, because that
package's ``__init__`` imports torch and DTensor, and this module must import with nothing but the standard library
so a prediction runs without torch's distributed stack.

Notation: p stages (ranks of one pipeline), m micro-batches per step, v model chunks (virtual stages) per rank;
T_F, T_B, T_W a rank's forward, input-gradient backward and weight-gradient backward of one micro-batch, all its
chunks together (T_B + T_W is the whole backward, recomputation included; T_F = T_B = T_W by default, a full
backward twice the forward). The ideal step is m (T_F + T_B + T_W); the bubble is the idle time a schedule adds:

    paper        torch                  idle time per rank and step       in flight (stage 1)          source
    gpipe        GPipe                  (p-1)(T_F+T_B+T_W)                m                            [1] [2]
    1f1b         1F1B                   (p-1)(T_F+T_B+T_W)                min(p, m)                    [2] §2.2.1
    interleaved  Interleaved1F1B        (p-1)(T_F+T_B+T_W)/v              min(p, m)(1 + (p-1)/(p v))   [2] §2.2.2, [3]
    looped_bfs   LoopedBFS              (p-1)(T_F+T_B+T_W)/v              m                            [4] §3
    zb_h1        InterleavedZeroBubble  (p-1)(T_F+T_B-T_W)/v, >= 0        min(p, m)                    [5] §2.1
    zb_h2        -                      (p-1)(T_F+T_B-2T_W), >= 0         min(2p-1, m)                 [5] §2.2
    zb_v         ZBVZeroBubble          (p-1)(T_F+T_B-2T_W)/2, >= 0       min(p, m)                    [5] §6
    dualpipe_v   DualPipeV              (p-1)(T_F+2T_B-T_W)/2, >= 0       min(p, m) + 1/2              [6]

[1] GPipe, Huang et al. 2019. [2] Narayanan et al. 2021 (Megatron-LM); PipeDream-Flush is 1F1B; interleaved needs m
divisible by p in Megatron-LM. [3] Korthikanti et al. 2022 §4.2.3, the interleaved memory factor. [4] Lamy-Poirier
2023, Breadth-First Pipeline Parallelism (arXiv 2211.05953). [5] Qi et al. 2024, Zero Bubble Pipeline Parallelism
(ICLR; arXiv 2401.10241 v2 for ZB-V, 2 chunks per rank and twice the sends). [6] DeepSeek-V3 report §3.2.1 Table 2:
DualPipe's bubble (PP/2-1)(F&B+B-3W) in chunk times with PP = 2p (DualPipe cut in half); with F&B = F+B (no overlap,
as torch runs the pair on CPU) and chunk times f = T_F/2, b = (T_B+T_W)/2, w = T_W/2 it is the form above.

The authors' numbers at T_F = T_B = T_W: 1F1B (p-1)/m, ZB-H1 (p-1)/3m, ZB-H2 and ZB-V 0 of the ideal step;
activation memory 1x, 1x, 2x, 1x of 1F1B. Our readings, checked against torch's action lists list-scheduled
(comm/parallel/bubble.py ``simulated_bubble``, ``peak_in_flight``; tests/unit/test_schedules.py): ZB-H1 over v
chunks divides by v; DualPipeV's in-flight count p + 1/2 (2p+1 chunk activations) is torch's; LoopedBFS holds all m.
ZB-V away from equal times is ZB-H2's expression on half-size chunks. One schedule disagrees with its paper: torch's
ZBVZeroBubble keeps (p-1) chunk forwards of start-up idle at equal times, where the form says 0. The closed forms
assume m >= p (DualPipeV m >= 2p) and equal stages; the zero-bubble papers also bypass the optimizer step's global
synchronisation, which no form here charges.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _full(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    return (p - 1) * (tf + tb + tw)


def _looped(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    return (p - 1) * (tf + tb + tw) / v


def _zb_h1(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    return (p - 1) * max(0.0, tf + tb - tw) / v


def _zb_h2(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    return (p - 1) * max(0.0, tf + tb - 2 * tw)


def _zb_v(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    return (p - 1) * max(0.0, tf + tb - 2 * tw) / 2


def _dualpipe_v(p: int, v: int, tf: float, tb: float, tw: float) -> float:
    # chunk times f = tf/2, b = (tb+tw)/2 (full backward), w = tw/2; F&B = f + b without overlap (CPU)
    f, b, w = tf / 2, (tb + tw) / 2, tw / 2
    return (p - 1) * max(0.0, (f + b) + b - 3 * w)


def _min_p(p: int, v: int, m: int) -> str | None:
    return None if m >= p else f"needs at least pp = {p} microbatches (torch's Schedule1F1B), got {m}"


def _rounds(p: int, v: int, m: int) -> str | None:
    rounds = max(1, m // p)
    return None if m % rounds == 0 else (f"needs a microbatch count divisible by its rounds max(1, m // pp) = "
                                         f"{rounds} (torch's interleaved schedules), got m={m}: use a multiple of "
                                         f"{rounds}, or of pp={p}")


def _min_2p(p: int, v: int, m: int) -> str | None:
    return None if m >= 2 * p else f"needs at least 2*pp = {2 * p} microbatches (one per stage), got {m}"


def _no_rule(p: int, v: int, m: int) -> str | None:
    return None


@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule: its names, which stages a rank holds, its rules, bubble and memory."""

    name: str  # the papers' name: the predictor's --schedule
    torch_name: str | None  # torch.distributed.pipelining's (get_schedule_class; parallel.pp_schedule); None: no class
    source: str
    chunks: str  # model chunks per rank: "one" (v = 1), "any" (v >= 1) or "two" (exactly 2, in a V)
    layout: str  # stage s on rank: "single" (s = rank), "loop" (s % p), "v" (rank r holds r and 2p-1-r)
    split_backward: bool  # the backward runs as input-gradient (I) and weight-gradient (W) passes
    idle: Callable[[int, int, float, float, float], float]  # (p, v, T_F, T_B, T_W) -> idle s, the table's form
    in_flight_of: Callable[[int, int, int], float]  # (p, m, v) -> micro-batches in flight, the table's form
    m_divisible_by_p: bool = False  # Megatron-LM's rule for its interleaved schedule (the predictor applies it)
    microbatch_problem: Callable[[int, int, int], str | None] = _no_rule  # (p, v, m): why torch refuses m, or None

    def default_chunks(self) -> int:
        """v when none is given: 2 for the V schedules, else 1."""
        return 2 if self.chunks == "two" else 1

    def stage_indices(self, rank: int, p: int, v: int) -> list[int]:
        """The stage indices rank ``rank`` holds, ascending (torch's generate_rank_to_stage_mapping)."""
        if self.layout == "v":
            return sorted({rank, 2 * p - 1 - rank})
        return [rank + k * p for k in range(v)]

    def bubble_s(self, p: int, v: int, t_f: float, t_b: float, t_w: float) -> float:
        """Idle seconds per step of one rank whose stage (all its chunks) takes t_f, t_b, t_w per micro-batch."""
        if p <= 1:
            return 0.0
        return self.idle(p, v, t_f, t_b, t_w)

    def bubble_fraction(self, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                        t_w: float = 1.0) -> float:
        """Bubble / ideal time, m (T_F + T_B + T_W): (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved."""
        return self.bubble_s(p, v, t_f, t_b, t_w) / (m * (t_f + t_b + t_w))

    def step_bubble(self, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                    t_w: float = 1.0) -> float:
        """Bubble as a fraction of the step, idle / (busy + idle), as a rank measures it: (p-1)/(m+p-1) for 1F1B."""
        if p <= 1:
            return 0.0
        idle = self.bubble_s(p, v, t_f, t_b, t_w)
        return idle / (m * (t_f + t_b + t_w) + idle)

    def in_flight(self, p: int, m: int, v: int = 1) -> float:
        """Micro-batches whose activations the first stage holds at its peak (its layers' worth each)."""
        return self.in_flight_of(p, m, v)


SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    Schedule("gpipe", "GPipe", "Huang et al. 2019 (GPipe); bubble (p-1)/m as Narayanan et al. 2021 §2.2.1 state it",
             "one", "single", False, _full, lambda p, m, v: float(m)),
    Schedule("1f1b", "1F1B", "PipeDream-Flush, Narayanan et al. 2021 §2.2.1: bubble (p-1)/m, p micro-batches in "
             "flight", "one", "single", False, _full, lambda p, m, v: float(min(p, m)), microbatch_problem=_min_p),
    Schedule("interleaved", "Interleaved1F1B", "Narayanan et al. 2021 §2.2.2: bubble (p-1)/(v m), m divisible by p; "
             "memory x (1 + (p-1)/(p v)) (Korthikanti et al. 2022)", "any", "loop", False, _looped,
             lambda p, m, v: min(p, m) * (1 + (p - 1) / (p * v)), m_divisible_by_p=True, microbatch_problem=_rounds),
    Schedule("looped_bfs", "LoopedBFS", "Lamy-Poirier 2023, Breadth-First Pipeline Parallelism §3: bubble "
             "(p-1)/(v m), all m micro-batches in flight", "any", "loop", False, _looped, lambda p, m, v: float(m)),
    Schedule("zb_h1", "InterleavedZeroBubble", "Qi et al. 2024 §2.1 (ZB-H1, ZB1P): bubble (p-1)(T_F+T_B-T_W), "
             "1F1B's memory; over v chunks /v", "any", "loop", True, _zb_h1, lambda p, m, v: float(min(p, m)),
             microbatch_problem=_rounds),
    Schedule("zb_h2", None, "Qi et al. 2024 §2.2 (ZB-H2): bubble (p-1)(T_F+T_B-2T_W), 2p-1 micro-batches in flight",
             "one", "single", True, _zb_h2, lambda p, m, v: float(min(2 * p - 1, m))),
    Schedule("zb_v", "ZBVZeroBubble", "Qi et al. 2024, arXiv 2401.10241 v2 §6 (ZB-V): zero bubble at T_F=T_B=T_W "
             "with 1F1B's memory, 2 chunks, 2x P2P", "two", "v", True, _zb_v, lambda p, m, v: float(min(p, m))),
    Schedule("dualpipe_v", "DualPipeV", "DualPipe, DeepSeek-V3 report §3.2.1 Table 2, cut in half (2 chunks in a "
             "V): bubble (p-1)/(3m) at T_F=T_B=T_W", "two", "v", True, _dualpipe_v,
             lambda p, m, v: min(p, m) + 0.5, microbatch_problem=_min_2p),
]}

TORCH_SCHEDULES: dict[str, Schedule] = {s.torch_name: s for s in SCHEDULES.values() if s.torch_name}


def get_schedule(name: str) -> Schedule:
    """A schedule by the papers' name (the predictor's)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def from_torch(name: str) -> Schedule:
    """A schedule by torch's class name, case-insensitive as torch's get_schedule_class (the trainer's
    ``parallel.pp_schedule``); ValueError listing torch's names otherwise."""
    for torch_name, s in TORCH_SCHEDULES.items():
        if torch_name.lower() == str(name).lower():
            return s
    raise ValueError(f"unknown pipeline schedule {name!r}; torch's schedules described here are "
                     f"{', '.join(TORCH_SCHEDULES)}")

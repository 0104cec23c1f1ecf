"""The pipeline's bubble: the papers' form, torch's action lists simulated, and the bubble measured on the ranks.

Start at ``bubble_summary`` (the two references the engine logs beside the measured bubble) or ``measure_step``.
Three numbers per schedule, one convention. A rank's bubble fraction is its idle time over the step's wall time,
idle = step - busy, busy = its stages' compute (forward, loss, backward, weight gradient):

    bubble_formula      the papers' closed forms (comm/schedules.py, the table the predictor reads too), as a
                        fraction of the step; T_B = input-gradient, T_W = weight-gradient backward of a rank's
                        stage(s); at the default T_F = T_B = T_W (a full backward is twice the forward)
    simulated_bubble    torch's own action lists for every rank (``schedule_actions``), list-scheduled with
                        dependencies and per-action costs (unit, or measured: ``simulate_bubble``, which can also
                        charge a link time per cross-rank edge and the runtime's host time per action)
    measure_step        wall clocks around each stage's forward/backward/weight calls and the loss (``StageTimer``);
                        step = the slowest rank's span from a common barrier; p2p transfer and waits count as idle

As a fraction of the step, idle / (m (T_F+T_B+T_W) + idle): GPipe/1F1B (p-1)/(m+p-1), interleaved (p-1)/(vm+p-1),
ZB-H1 (p-1)/(3vm+p-1) at equal times, and DualPipeV (p-1)/(3m+p-1): torch runs an "overlapped" F&B pair back to
back and sends both results after it, so on CPU F&B = F+B and the simulation (which models those held sends) gives
DualPipe's form exactly. ZB-V disagrees with its paper (comm/schedules.py): ``simulated_bubble`` is the reference
for "what torch's schedule should achieve", the formula column is reported beside it. ``peak_in_flight`` reads the
activations a rank holds off the same action lists (experiments/memory.py's estimate uses it).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.parallel.pipeline import as_pp_group, check_layout, schedule_traits

# ---------------------------------------------------------------- the papers' forms, and both references


def bubble_formula(name: str, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                   t_w: float = 1.0) -> float:
    """The papers' bubble as a fraction of the step (idle / (busy + idle)); t_* are a rank's stage times (all its
    chunks) per microbatch, t_b the input-gradient and t_w the weight-gradient backward."""
    return schedule_traits(name).step_bubble(p, m, v, t_f, t_b, t_w)


def bubble_summary(name: str, p: int, m: int, v: int) -> dict[str, float]:
    """The schedule's bubble, two references: the papers' formula and torch's action lists simulated, both at
    T_F = T_B = T_W (a full backward twice the forward), as fractions of the step."""
    return {"formula": bubble_formula(name, p, m, v), "simulated": simulated_bubble(name, p, m, v)}


def peak_in_flight(name: str, p: int, m: int, v: int = 1) -> float:
    """Micro-batches' worth of a rank's layers whose activations the busiest rank holds at once, read off torch's
    own action lists: a chunk's forward of a micro-batch adds 1/v, its full backward (B) or weight-gradient pass
    (W, after which nothing of it is kept) releases it. At m >= 2p it equals comm/schedules.py's ``in_flight``
    form for every schedule (GPipe m, 1F1B p, Interleaved1F1B p(1 + (p-1)/(pv)), ZB-V p, DualPipeV p + 1/2)."""
    if p <= 1:
        return 1.0
    peak = 0.0
    for actions in schedule_actions(name, p, v, m).values():
        alive: set[tuple[int, int]] = set()
        for kind, stage, mb, *_ in actions:  # DualPipeV marks an overlapped F&B pair's forward with a 4th item
            if kind == "F":
                alive.add((stage, mb))
            elif kind in ("B", "W"):
                alive.discard((stage, mb))
            peak = max(peak, len(alive) / v)
    return peak


# ---------------------------------------------------------------- the bubble: torch's action lists, simulated


class _StubStage:
    """Just enough of a PipelineStage for a schedule class to compute every rank's action list offline."""

    def __init__(self, index: int, num_stages: int, pp: int):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, num_stages, pp, 0
        self.is_first, self.is_last, self.submod = index == 0, index == num_stages - 1, None


def _single_stage_actions(name: str, p: int, m: int) -> dict[int, list[tuple[str, int, int]]]:
    """GPipe and 1F1B as their step code runs them (torch's 1F1B ``pipeline_order`` is off by one microbatch on
    the last rank, so it is not used): 1F1B warms up min(m, p - r) forwards, then alternates B, F, then drains B."""
    out = {}
    for r in range(p):
        if name == "GPipe":
            out[r] = [("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]
            continue
        warm = min(m, p - r)
        acts = [("F", r, i) for i in range(warm)]
        f, b = warm, 0
        while b < m:
            acts.append(("B", r, b))
            b += 1
            if f < m:
                acts.append(("F", r, f))
                f += 1
        out[r] = acts
    return out


def schedule_actions(name: str, p: int, v: int, m: int) -> dict[int, list[tuple]]:
    """rank -> [(kind, stage, microbatch[, held])] in execution order, kind F, B (full backward), I (input grad) or
    W (weight grad), from torch's own schedule class (its ``pipeline_order``). An overlapped F&B pair (DualPipeV)
    runs its two actions one after the other; torch's lowering sends both results after the pair, so the first
    carries ``held=True``: other ranks see its output when the second ends."""
    from torch.distributed.pipelining import schedules as S

    t = schedule_traits(name)
    check_layout(t.torch_name, p, v, p * v, m)
    if t.layout == "single":
        return _single_stage_actions(t.torch_name, p, m)
    stubs = [_StubStage(s, p * v, p) for s in t.stage_indices(0, p, v)]
    order = S.get_schedule_class(t.torch_name)(stubs, m, loss_fn=lambda out, tgt: out).pipeline_order
    kinds = {S.F: "F", S.B: "B", S.I: "I", S.W: "W"}
    out = {}
    for r, lst in order.items():
        acts: list[tuple] = []
        for a in lst:
            if a is None:
                continue
            subs = [b for b in (a.sub_actions if a.computation_type == S.OVERLAP_F_B else (a,))
                    if b.computation_type in kinds]
            for j, b in enumerate(subs):
                act = (kinds[b.computation_type], b.stage_index, b.microbatch_index)
                acts.append(act + (True,) if j < len(subs) - 1 else act)
        out[r] = acts
    return out


def unit_cost(v: int, t_f: float = 1.0, t_b: float = 1.0, t_w: float = 1.0) -> Callable[[int, str], float]:
    """Per-action cost of a chunk (a rank's stage time / v); the first stage's I is free and its W the whole
    backward, as torch runs it (no input gradient to compute: the weight pass is a full backward)."""
    def cost(stage: int, kind: str) -> float:
        f, b, w = t_f / v, t_b / v, t_w / v
        if kind == "F":
            return f
        if kind == "B":
            return b + w
        if kind == "I":
            return 0.0 if stage == 0 else b
        return b + w if stage == 0 else w
    return cost


def simulate_bubble(actions: dict[int, list[tuple]], cost: Callable[[int, str], float], link_s: float = 0.0,
                    host_s: float = 0.0) -> dict:
    """List-schedule every rank's actions in order: an action starts when its rank is free and its inputs exist
    (F(s,i) after F(s-1,i); B/I(s,i) after B/I(s+1,i), or the last stage's own F; W after I), plus ``link_s`` per
    cross-rank edge; ``host_s`` per action occupies the rank without counting as busy (a runtime's own overhead);
    a ``held`` action's output reaches other ranks when the rank's next action ends (``schedule_actions``).
    Returns {"per_rank": [bubble...], "mean", "span", "busy": [...]}; raises on a deadlock."""
    last = max(a[1] for acts in actions.values() for a in acts)
    done: dict[tuple[str, int, int], float] = {}  # event -> finish time; "G": the gradient stage s sends to s-1
    sent: dict[tuple[str, int, int], float] = {}  # event -> when other ranks can have it
    owner: dict[tuple[str, int, int], int] = {}
    clock = {r: 0.0 for r in actions}
    busy = {r: 0.0 for r in actions}
    pos = {r: 0 for r in actions}
    held: dict[int, list[tuple[str, int, int]]] = defaultdict(list)

    def deps(k: str, s: int, i: int) -> list[tuple[str, int, int]]:
        if k == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if k in "BI":
            return [("F", s, i)] + ([("G", s + 1, i)] if s < last else [])
        return [("I", s, i)]

    remaining = sum(len(a) for a in actions.values())
    while remaining:
        progressed = False
        for r, acts in actions.items():
            while pos[r] < len(acts):
                k, s, i = acts[pos[r]][:3]
                need = deps(k, s, i)
                if any(d not in done for d in need):
                    break
                ready = [done[d] if owner[d] == r else sent[d] + link_s for d in need]
                c = cost(s, k)
                clock[r] = max([clock[r], *ready]) + host_s + c
                busy[r] += c
                events = [(k, s, i)] + ([("G", s, i)] if k in "BI" else [])
                for ev in events:
                    done[ev], owner[ev], sent[ev] = clock[r], r, clock[r]
                if len(acts[pos[r]]) > 3 and acts[pos[r]][3]:
                    held[r].extend(events)
                else:
                    for ev in held.pop(r, []):
                        sent[ev] = clock[r]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: acts[pos[r]] for r, acts in actions.items() if pos[r] < len(acts)}
            raise RuntimeError(f"schedule deadlocks in simulation; next actions per rank: {stuck}")
    span = max(clock.values())
    per_rank = [1.0 - busy[r] / span for r in sorted(actions)]
    return {"per_rank": per_rank, "mean": sum(per_rank) / len(per_rank), "span": span,
            "busy": [busy[r] for r in sorted(actions)]}


def simulated_bubble(name: str, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                     t_w: float = 1.0) -> float:
    """Mean bubble fraction of torch's schedule at unit-like costs (a rank's stage times t_f, t_b, t_w)."""
    return simulate_bubble(schedule_actions(name, p, v, m), unit_cost(v, t_f, t_b, t_w))["mean"]

# ---------------------------------------------------------------- the bubble, measured


class StageTimer:
    """Host wall clocks around every compute call of this rank's stages: forward_one_chunk (F),
    backward_one_chunk (B, or I when the schedule splits the backward), backward_weight_one_chunk (W) and the
    schedule's loss (L, counted with the last stage); with ``time_waits`` also the schedule's p2p waits (P, stage
    -1: torch's module-level ``_wait_batch_p2p``, patched until ``close()``). Events are (kind, stage, t0, t1).

    On a GPU the host clock does not see kernels; synchronise inside ``clock`` (or pass a CUDA-event timer) there.
    Gloo's send/recv run outside the compute calls, so their time is idle time, as a real pipeline's exposed p2p is.
    """

    def __init__(self, schedule, stages: list, clock: Callable[[], float] = time.perf_counter, *,
                 time_waits: bool = True):
        self.clock, self.events = clock, []
        for st in stages:
            i = st.stage_index
            st.forward_one_chunk = self._timed(st.forward_one_chunk, lambda kw: "F", i)
            st.backward_one_chunk = self._timed(
                st.backward_one_chunk, lambda kw: "B" if kw.get("full_backward", True) else "I", i)
            st.backward_weight_one_chunk = self._timed(st.backward_weight_one_chunk, lambda kw: "W", i)
        last = next((st.stage_index for st in stages if st.is_last), -1)
        schedule._compute_loss = self._timed(schedule._compute_loss, lambda kw: "L", last)
        self._restore = None
        if time_waits:
            from torch.distributed.pipelining import schedules as S

            original = S._wait_batch_p2p
            S._wait_batch_p2p = self._timed(original, lambda kw: "P", -1)
            self._restore = lambda: setattr(S, "_wait_batch_p2p", original)

    def close(self) -> None:
        """Undo the p2p-wait patch (the stages' and schedule's wrappers die with them)."""
        if self._restore is not None:
            self._restore()
            self._restore = None

    def _timed(self, fn, kind_of, stage: int):
        def run(*args, **kwargs):
            t0 = self.clock()
            out = fn(*args, **kwargs)
            self.events.append((kind_of(kwargs), stage, t0, self.clock()))
            return out
        return run

    def busy_s(self) -> float:
        return sum(t1 - t0 for k, _, t0, t1 in self.events if k != "P")

    def wait_s(self) -> float:
        return sum(t1 - t0 for k, _, t0, t1 in self.events if k == "P")

    def n_actions(self) -> int:
        """Compute calls (the loss rides with its forward)."""
        return sum(1 for k, *_ in self.events if k in "FBIW")

    def costs(self) -> dict[str, list[float]]:
        """"<kind>@<stage>" -> durations of this rank's compute events since the last clear."""
        out: dict[str, list[float]] = defaultdict(list)
        for k, s, t0, t1 in self.events:
            if k != "P":
                out[f"{k}@{s}"].append(t1 - t0)
        return dict(out)


@dataclass
class StepBubble:
    """One rank's step: the step's wall time (slowest rank, common start), its busy time and the bubble.
    idle = wait (inside p2p waits: dependencies, transfers, wake-ups) + host (the runtime's own Python between
    calls: posting sends/receives, bookkeeping) + tail (step - span: done while a slower rank still works)."""

    step_s: float
    busy_s: float
    span_s: float  # this rank's own span from the barrier to the end of its last action
    wait_s: float
    n_actions: int
    costs: dict[str, list[float]]

    @property
    def idle_s(self) -> float:
        return self.step_s - self.busy_s

    @property
    def host_s(self) -> float:
        return max(0.0, self.span_s - self.busy_s - self.wait_s)

    @property
    def bubble(self) -> float:
        return self.idle_s / self.step_s


def measure_step(run: Callable[[], object], timer: StageTimer, pp) -> tuple[StepBubble, object]:
    """Run one pipeline step (``run()``) from a barrier over ``pp``; (this rank's StepBubble, run's result)."""
    group = as_pp_group(pp)
    dist.barrier(group=group)
    timer.events.clear()
    t0 = timer.clock()
    out = run()
    span = timer.clock() - t0
    step = torch.tensor([span], dtype=torch.float64)
    dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
    return StepBubble(step.item(), timer.busy_s(), span, timer.wait_s(), timer.n_actions(), timer.costs()), out


def measured_cost(costs: dict[str, list[float]]) -> Callable[[int, str], float]:
    """A simulate_bubble cost from measured events (medians; the loss is added to the last stage's forward).
    A first stage's I is ~0 and its W the full backward, as measured, so no adjustment is needed."""
    med = {k: sorted(v)[len(v) // 2] for k, v in costs.items() if v}
    loss = {int(k.split("@")[1]): t for k, t in med.items() if k.startswith("L@")}

    def cost(stage: int, kind: str) -> float:
        c = med.get(f"{kind}@{stage}")
        if c is None and kind == "B":  # a schedule that ran I+W here
            c = med.get(f"I@{stage}", 0.0) + med.get(f"W@{stage}", 0.0)
        if c is None:
            raise KeyError(f"no measured cost for {kind} of stage {stage}")
        return c + (loss.get(stage, 0.0) if kind == "F" else 0.0)
    return cost


def merge_costs(parts: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for part in parts:
        for k, v in part.items():
            out[k].extend(v)
    return dict(out)


def relative_gap(measured: float, reference: float) -> float:
    """|measured - reference| / reference (inf when the reference is 0 and the measure is not)."""
    if reference == 0:
        return 0.0 if measured == 0 else math.inf
    return abs(measured - reference) / reference

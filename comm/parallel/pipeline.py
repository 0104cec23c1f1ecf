"""Pipeline parallelism for the Baichuan decoder with ``torch.distributed.pipelining``, and its bubble.

Start at ``build_pipeline`` (split, stages and schedule in one call) or, step by step:

    check_layout(schedule, pp, v, n_layers, m)              pure refusals, before any process group
    chunks, stages = build_stages(model, pp_group, schedule=..., virtual_stages=v)
    sched = build_schedule(name, stages, n_microbatches, loss_fn=None)
    loss = pipeline_step(sched, stages, tokens, targets)     (B, T) each; B divisible by m

Splitting. The decoder's layers are cut into S = pp * v stages of n_layers / S consecutive layers; stage 0 also
holds the embedding, stage S-1 the final norm, the LM head and the loss. Which stages a rank holds follows the
schedule's layout (``SCHEDULES``): one stage per rank (GPipe, 1F1B), v stages looped (stage s on rank s % pp:
Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) or two in a V (rank r holds r and 2pp-1-r: ZBVZeroBubble,
DualPipeV). Each stage is a ``PipelineChunk`` whose children keep the model's attribute names (``model.layers`` a
ModuleDict keyed by the original index), so its parameter names and state-dict keys are the unsplit model's
("model.layers.5.mlp.gate_proj.weight"). The split is written against module attributes only, never the model
class (comm/ does not import systems/): ``model.model.embed_tokens``, ``model.model.layers`` (a ModuleList of
``layer(x, cos, sin)``), ``model.model.rotary`` (``rotary(T) -> cos, sin``), ``model.model.norm``,
``model.lm_head`` and the ``model.loss_fn(hidden, lm_head_weight, targets)`` slot. Nothing is copied: a chunk
shares its modules with ``model`` (drop ``model`` afterwards so only this rank's layers stay alive), which is also
why operator slots and recomputation wrappers applied to the layers, before or after, keep working.

The schedule. ``torch.distributed.pipelining.schedules.get_schedule_class`` names the schedules; the loss of a
micro-batch is ``loss_fn(hidden, lm_head.weight, targets)`` of the last chunk (a per-micro-batch mean) and the
schedule divides the accumulated gradients by m (``scale_grads``), so with equal micro-batches (same row count, no
unevenly ignored targets) the gradients equal those of the whole batch's mean loss.

The bubble: three numbers per schedule, one convention. A rank's bubble fraction is its idle time over the step's
wall time, idle = step - busy, busy = its stages' compute (forward, loss, backward, weight gradient):

    bubble_formula      the papers' closed forms (below), T_B = input-gradient, T_W = weight-gradient backward of a
                        rank's stage(s); at the default T_F = T_B = T_W (a full backward is twice the forward)
    simulated_bubble    torch's own action lists for every rank (``schedule_actions``), list-scheduled with
                        dependencies and per-action costs (unit, or measured: ``simulate_bubble``, which can also
                        charge a link time per cross-rank edge and the runtime's host time per action)
    measure_step        wall clocks around each stage's forward/backward/weight calls and the loss (``StageTimer``);
                        step = the slowest rank's span from a common barrier; p2p transfer and waits count as idle

    schedule               idle time per rank and step          source
    GPipe                  (p-1)(T_F+T_B+T_W)                    Huang et al. 2019; Narayanan et al. 2021 §2.2.1
    1F1B                   (p-1)(T_F+T_B+T_W)                    PipeDream-Flush, Narayanan et al. 2021 §2.2.1
    Interleaved1F1B        (p-1)(T_F+T_B+T_W)/v                  Narayanan et al. 2021 §2.2.2
    LoopedBFS              (p-1)(T_F+T_B+T_W)/v                  Lamy-Poirier 2023 (arXiv 2211.05953) §3
    InterleavedZeroBubble  (p-1)(T_F+T_B-T_W)/v                  ZB-H1, Qi et al. 2024 (arXiv 2401.10241) §2;
                                                                 /v for v chunks: our reading (= the simulation)
    ZBVZeroBubble          (p-1)(T_F+T_B-2T_W)/2, >= 0           ZB-V, Qi et al. 2024 §6 (2 chunks per rank)
    DualPipeV              (p-1)(F&B+B-3W) in chunk times,       DeepSeek-V3 report §3.2.1 Table 2: DualPipe's
                           F&B = F+B here: (p-1)(T_F+2T_B-T_W)/2 (PP/2-1) with PP = 2p (DualPipe cut in half)

As a fraction of the step: idle / (m (T_F+T_B+T_W) + idle); GPipe/1F1B (p-1)/(m+p-1), interleaved
(p-1)/(vm+p-1), ZB-H1 (p-1)/(3vm+p-1) at equal times, and DualPipeV (p-1)/(3m+p-1): torch runs an "overlapped"
F&B pair back to back and sends both results after it, so on CPU F&B = F+B and the simulation (which models those
held sends) gives DualPipe's form exactly. The closed forms assume m >= p (DualPipeV m >= 2p) and equal stages;
the simulation needs neither. One schedule disagrees with its paper: ZB-V's form is 0 at equal times, while
torch's action list keeps (p-1) chunk forwards of start-up idle on every rank ((p-1)/(3vm+p-1), as ZB-H1
interleaved): ``simulated_bubble`` is the reference for "what torch's schedule should achieve", the formula column
is reported beside it. ``analysis/predictor/pipeline.py`` holds the same forms as fractions of the ideal step
(bubble / (m(T_F+T_B+T_W))).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

# ---------------------------------------------------------------- schedules: layout, formulas, refusals


def _gpipe(p, v, tf, tb, tw):
    return (p - 1) * (tf + tb + tw)


def _looped(p, v, tf, tb, tw):
    return (p - 1) * (tf + tb + tw) / v


def _zb_h1(p, v, tf, tb, tw):
    return (p - 1) * max(0.0, tf + tb - tw) / v


def _zb_v(p, v, tf, tb, tw):
    return (p - 1) * max(0.0, tf + tb - 2 * tw) / 2


def _dualpipe_v(p, v, tf, tb, tw):
    # chunk times f = tf/2, b = (tb+tw)/2 (full backward), w = tw/2; F&B = f + b without overlap (CPU)
    f, b, w = tf / 2, (tb + tw) / 2, tw / 2
    return (p - 1) * max(0.0, (f + b) + b - 3 * w)


def _min_p(p, v, m):
    return None if m >= p else f"needs at least pp = {p} microbatches (torch's Schedule1F1B), got {m}"


def _rounds(p, v, m):
    rounds = max(1, m // p)
    return None if m % rounds == 0 else (f"needs a microbatch count divisible by its rounds max(1, m // pp) = "
                                         f"{rounds} (torch's interleaved schedules), got m={m}: use a multiple of "
                                         f"{rounds}, or of pp={p}")


def _min_2p(p, v, m):
    return None if m >= 2 * p else f"needs at least 2*pp = {2 * p} microbatches (one per stage), got {m}"


@dataclass(frozen=True)
class ScheduleTraits:
    """What this module knows about one of torch's schedules: layout, chunk count, microbatch rule, bubble."""

    name: str  # torch's name (get_schedule_class)
    layout: str  # "single": one stage per rank; "loop": stage s on rank s % pp; "v": ranks r and 2pp-1-r
    chunks: str  # virtual stages per rank: "1", "any" (>= 1) or "2"
    bubble_s: Callable[[int, int, float, float, float], float]  # (p, v, T_F, T_B, T_W) -> idle seconds per step
    source: str
    microbatch_problem: Callable[[int, int, int], str | None] = lambda p, v, m: None


SCHEDULES: dict[str, ScheduleTraits] = {s.name: s for s in [
    ScheduleTraits("GPipe", "single", "1", _gpipe, "Huang et al. 2019; Narayanan et al. 2021 §2.2.1"),
    ScheduleTraits("1F1B", "single", "1", _gpipe, "PipeDream-Flush, Narayanan et al. 2021 §2.2.1", _min_p),
    ScheduleTraits("Interleaved1F1B", "loop", "any", _looped, "Narayanan et al. 2021 §2.2.2", _rounds),
    ScheduleTraits("LoopedBFS", "loop", "any", _looped, "Lamy-Poirier 2023, Breadth-First PP, §3"),
    ScheduleTraits("InterleavedZeroBubble", "loop", "any", _zb_h1, "ZB-H1 (ZB1P), Qi et al. 2024 §2", _rounds),
    ScheduleTraits("ZBVZeroBubble", "v", "2", _zb_v, "ZB-V, Qi et al. 2024 §6"),
    ScheduleTraits("DualPipeV", "v", "2", _dualpipe_v, "DualPipe, DeepSeek-V3 report §3.2.1, cut in half",
                   _min_2p),
]}


# Schedules that split the backward into input- and weight-gradient passes (I, W): torch keeps a micro-batch's
# graph between them, and a saved-tensors hook then keeps its tensors past the W pass (systems.memory's meter).
SPLIT_BACKWARD = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})


def schedule_names() -> list[str]:
    """The schedules this module can run: torch's (get_schedule_class) that ``SCHEDULES`` describes."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    names = []
    for name in SCHEDULES:
        try:
            get_schedule_class(name)
        except ValueError:  # an older torch without it
            continue
        names.append(name)
    return names


def schedule_traits(name: str) -> ScheduleTraits:
    """The traits of ``name`` (case-insensitive, as torch); ValueError listing the valid names otherwise."""
    valid = schedule_names()
    for n in valid:
        if n.lower() == str(name).lower():
            return SCHEDULES[n]
    raise ValueError(f"unknown pipeline schedule {name!r}; the valid ones (torch {torch.__version__}) are "
                     f"{', '.join(valid)}")


def default_virtual_stages(name: str) -> int:
    return 2 if schedule_traits(name).chunks == "2" else 1


def check_layout(schedule: str, pp: int, virtual_stages: int, n_layers: int, n_microbatches: int | None = None) -> None:
    """Refuse, with the numbers, a layout the schedule cannot run. Pure: call it before any process group."""
    t = schedule_traits(schedule)
    if pp < 1 or virtual_stages < 1:
        raise ValueError(f"pp={pp} and virtual stages={virtual_stages} must be >= 1")
    if t.chunks == "1" and virtual_stages != 1:
        raise ValueError(f"schedule {t.name} runs one stage per rank; virtual stages={virtual_stages} needs an "
                         "interleaved or looped schedule (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble)")
    if t.chunks == "2" and virtual_stages != 2:
        raise ValueError(f"schedule {t.name} runs exactly 2 stages per rank in a V; got virtual stages="
                         f"{virtual_stages}")
    stages = pp * virtual_stages
    if n_layers % stages:
        raise ValueError(f"pp*virtual stages = {pp}*{virtual_stages} = {stages} does not divide model.n_layers="
                         f"{n_layers}; every stage must get the same number of layers: pick pp and virtual stages "
                         f"whose product divides {n_layers}")
    if n_microbatches is not None:
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches={n_microbatches} must be >= 1")
        problem = t.microbatch_problem(pp, virtual_stages, n_microbatches)
        if problem:
            raise ValueError(f"schedule {t.name} with pp={pp}: {problem}")


def stage_indices(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stage indices rank ``pp_rank`` holds, ascending (torch's generate_rank_to_stage_mapping)."""
    t = schedule_traits(schedule)
    if t.layout == "v":
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    return [pp_rank + k * pp for k in range(virtual_stages)]


def bubble_formula(name: str, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                   t_w: float = 1.0) -> float:
    """The papers' bubble as a fraction of the step (idle / (busy + idle)); t_* are a rank's stage times (all its
    chunks) per microbatch, t_b the input-gradient and t_w the weight-gradient backward."""
    if p <= 1:
        return 0.0
    idle = schedule_traits(name).bubble_s(p, v, t_f, t_b, t_w)
    return idle / (m * (t_f + t_b + t_w) + idle)

# ---------------------------------------------------------------- splitting


class PipelineChunk(nn.Module):
    """Stage ``stage_index`` of the decoder: its layers, plus the embedding (first) or norm, LM head, loss (last).

    Children keep the unsplit model's names: ``model.embed_tokens``, ``model.layers.<i>`` (original indices),
    ``model.rotary`` (the cos/sin tables every stage needs), ``model.norm``, ``lm_head``. forward: token ids
    (B, T) on the first stage, hidden (B, T, C) elsewhere -> hidden (B, T, C), normed on the last stage.
    """

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int, layers: range):
        super().__init__()
        src = model.model
        self.stage_index, self.num_stages, self.layer_ids = stage_index, num_stages, layers
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        inner = nn.Module()
        inner.embed_tokens = src.embed_tokens if self.is_first else None
        inner.layers = nn.ModuleDict({str(i): src.layers[i] for i in layers})
        inner.rotary = src.rotary
        inner.norm = src.norm if self.is_last else None
        self.model = inner
        self.lm_head = model.lm_head if self.is_last else None
        self.loss_fn = model.loss_fn if self.is_last else None  # the operator slot, as the model holds it
        if hasattr(model, "config"):
            self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.model
        if inner.embed_tokens is not None:
            x = inner.embed_tokens(x)  # (B, T) ids -> (B, T, C)
        cos, sin = inner.rotary(x.shape[1])
        for layer in inner.layers.values():
            x = layer(x, cos, sin)
        return inner.norm(x) if inner.norm is not None else x  # (B, T, C)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one microbatch: hidden (b, T, C), targets (b, T); last stage only."""
        if self.lm_head is None:
            raise RuntimeError(f"stage {self.stage_index} of {self.num_stages} has no LM head: the loss runs on "
                               "the last stage")
        return self.loss_fn(hidden, self.lm_head.weight, targets)


def split_model(model: nn.Module, stage_ids: list[int], num_stages: int) -> list[PipelineChunk]:
    """The chunks ``stage_ids`` of ``model`` cut into ``num_stages`` equal stages (shared modules, no copy)."""
    n_layers = len(model.model.layers)
    if n_layers % num_stages:
        raise ValueError(f"{num_stages} pipeline stages do not divide model.n_layers={n_layers}")
    per = n_layers // num_stages
    return [PipelineChunk(model, s, num_stages, range(s * per, (s + 1) * per)) for s in stage_ids]

# ---------------------------------------------------------------- stages, schedule, step


def as_pp_group(pp) -> dist.ProcessGroup:
    """A process group from a ProcessGroup, a DeviceMesh (its "pp" dim, or the mesh if 1-D) or None (WORLD)."""
    if pp is None:
        return dist.group.WORLD
    if isinstance(pp, dist.ProcessGroup):
        return pp
    names = getattr(pp, "mesh_dim_names", None)
    if names is not None and hasattr(pp, "get_group"):
        if pp.ndim == 1:
            return pp.get_group()
        if "pp" not in names:
            raise ValueError(f"device mesh dims {names} have no 'pp' dim; pass the pipeline's process group")
        return pp["pp"].get_group()
    raise TypeError(f"expected a ProcessGroup or a DeviceMesh for the pipeline group, got {type(pp).__name__}")


def build_stages(model: nn.Module, pp, *, schedule: str = "1F1B", virtual_stages: int | None = None,
                 device: torch.device | str = "cpu") -> tuple[list[PipelineChunk], list]:
    """This rank's chunks of ``model`` and their ``PipelineStage``s over ``pp`` (group or mesh)."""
    from torch.distributed.pipelining import PipelineStage

    group = as_pp_group(pp)
    v = default_virtual_stages(schedule) if virtual_stages is None else virtual_stages
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    check_layout(schedule, p, v, len(model.model.layers))
    chunks = split_model(model, stage_indices(schedule, rank, p, v), p * v)
    device = torch.device(device)
    stages = [PipelineStage(c, c.stage_index, p * v, device, group=group) for c in chunks]
    return chunks, stages


class _LastChunkLoss:
    """The schedule's loss_fn(output, target): the last chunk's loss slot. Every rank passes one (torch runs
    backward only when the schedule has a loss_fn); it is called only where the last stage lives."""

    def __init__(self, chunks: list[PipelineChunk]):
        self.chunk = next((c for c in chunks if c.is_last), None)

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.chunk is None:
            raise RuntimeError("the pipeline loss was called on a rank without the last stage")
        return self.chunk.loss(hidden, targets)


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn: Callable | None = None, *,
                   scale_grads: bool = True):
    """torch's schedule ``name`` over this rank's ``stages``. loss_fn(output, target) -> scalar; None: the last
    chunk's loss slot (``PipelineChunk.loss``). Refuses unknown names (listing the valid ones), a stage count the
    schedule does not run and a microbatch count it cannot take, each with the reason."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    t = schedule_traits(name)
    if not stages:
        raise ValueError("build_schedule needs this rank's stages (build_stages)")
    p = stages[0].group_size
    check_layout(t.name, p, len(stages), stages[0].num_stages, n_microbatches)  # num_stages layers: always divides
    held, expected = sorted(s.stage_index for s in stages), stage_indices(t.name, stages[0].group_rank, p, len(stages))
    if held != expected:
        raise ValueError(f"rank {stages[0].group_rank} holds stages {held} but {t.name} places {expected} on it: "
                         f"build the stages for this schedule (build_stages(..., schedule={t.name!r}))")
    if loss_fn is None:
        loss_fn = _LastChunkLoss([s.submod for s in stages])
    cls = get_schedule_class(t.name)
    try:
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    except ValueError as e:  # a rule of torch's that check_layout does not know yet
        raise ValueError(f"schedule {t.name} with pp={p}, {len(stages)} stages per rank and {n_microbatches} "
                         f"microbatches: {e}") from e


def pipeline_step(schedule, stages: list, inputs: torch.Tensor | None, targets: torch.Tensor | None, *,
                  group=None) -> torch.Tensor | None:
    """One forward+backward of the whole batch (inputs, targets: (B, T), needed on the ranks holding the first /
    last stage); gradients accumulate in the chunks' parameters (scaled by 1/m). Returns the batch's mean loss
    (mean of the microbatch means) where the last stage lives, or on every rank of ``group`` if one is given."""
    m = schedule._n_microbatches
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    for t, needed in ((inputs, first), (targets, last)):
        if needed and (t is None or t.shape[0] % m):
            raise ValueError(f"batch of {None if t is None else t.shape[0]} rows does not split into {m} equal "
                             "microbatches; unequal microbatches would change the mean loss")
    losses: list[torch.Tensor] | None = [] if last else None
    args = (inputs,) if first else ()
    schedule.step(*args, target=targets if last else None, losses=losses)
    loss = torch.stack(losses).mean().detach() if last else None
    if group is None:
        return loss
    out = loss.clone() if last else torch.zeros(())
    dist.all_reduce(out, group=as_pp_group(group))  # one rank holds the last stage: the sum is its loss
    return out

# ---------------------------------------------------------------- whole-model views across the pipeline


def _gather(local: list[tuple[int, dict[str, torch.Tensor]]], group) -> dict[str, torch.Tensor]:
    """Every rank's (stage index, {name: tensor}) on every rank, merged in stage order (= the model's order)."""
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, [(s, {k: v.detach().cpu() for k, v in d.items()}) for s, d in local], group=group)
    out: dict[str, torch.Tensor] = {}
    for _, d in sorted((item for part in parts for item in part), key=lambda item: item[0]):
        for k, v in d.items():
            if k in out:
                raise RuntimeError(f"parameter {k} is held by two pipeline stages")
            out[k] = v
    return out


def full_state_dict(chunks: list[PipelineChunk], pp) -> dict[str, torch.Tensor]:
    """The whole model's state dict (original names and order) on every rank of the pipeline: a pickled
    all-gather, for tests and small models; a checkpoint should let each rank write its own keys (DCP)."""
    return _gather([(c.stage_index, c.state_dict()) for c in chunks], as_pp_group(pp))


def full_grads(chunks: list[PipelineChunk], pp) -> dict[str, torch.Tensor]:
    """name -> gradient of every parameter of the model, gathered over the pipeline (as full_state_dict)."""
    local = [(c.stage_index, {n: p.grad for n, p in c.named_parameters() if p.grad is not None}) for c in chunks]
    return _gather(local, as_pp_group(pp))


def clip_grad_norm_(parameters, max_norm: float, pp) -> torch.Tensor:
    """torch's clip_grad_norm_ (L2) over the whole model: squares summed on each rank, all-reduced over ``pp``."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32)
    for g in grads:
        sq += g.detach().float().pow(2).sum().cpu()
    dist.all_reduce(sq, group=as_pp_group(pp))
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return norm


@dataclass
class Pipeline:
    """What ``build_pipeline`` made, and the settings in effect (``knobs``), as engines report them."""

    chunks: list[PipelineChunk]
    stages: list
    schedule: object
    group: dist.ProcessGroup
    knobs: dict = field(default_factory=dict)
    unhonoured: list[str] = field(default_factory=list)
    link_delay: "P2PDelay | None" = None  # comm/link=slow across (virtual) nodes, installed by the trainer

    def parameters(self):
        return [p for c in self.chunks for p in c.parameters()]

    def named_parameters(self):
        return [(n, p) for c in self.chunks for n, p in c.named_parameters()]

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *, broadcast_loss: bool = True):
        return pipeline_step(self.schedule, self.stages, inputs, targets,
                             group=self.group if broadcast_loss else None)


def build_pipeline(model: nn.Module, pp, *, schedule: str = "1F1B", n_microbatches: int | None = None,
                   virtual_stages: int | None = None, device: torch.device | str = "cpu") -> Pipeline:
    """Split ``model`` over ``pp`` (group or mesh) and build the schedule; m defaults to the stage count."""
    group = as_pp_group(pp)
    v = default_virtual_stages(schedule) if virtual_stages is None else virtual_stages
    p = dist.get_world_size(group)
    m = p * v if n_microbatches is None else n_microbatches
    check_layout(schedule, p, v, len(model.model.layers), m)
    chunks, stages = build_stages(model, group, schedule=schedule, virtual_stages=v, device=device)
    sched = build_schedule(schedule, stages, m)
    knobs = {"pp": p, "schedule": schedule_traits(schedule).name, "virtual_stages": v, "n_microbatches": m,
             "stages": [c.stage_index for c in chunks],
             "layers": [list(c.layer_ids) for c in chunks]}
    return Pipeline(chunks, stages, sched, group, knobs)

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
    check_layout(t.name, p, v, p * v, m)
    if t.layout == "single":
        return _single_stage_actions(t.name, p, m)
    stubs = [_StubStage(s, p * v, p) for s in stage_indices(t.name, 0, p, v)]
    order = S.get_schedule_class(t.name)(stubs, m, loss_fn=lambda out, tgt: out).pipeline_order
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

# ---------------------------------------------------------------- this rank's part of the model, as one module


def stage_module(model: nn.Module, chunks: list[PipelineChunk]) -> nn.Module:
    """``model`` pruned in place to what this rank's chunks hold, so one module names exactly this rank's
    parameters under the unsplit model's names: ``model.layers`` becomes a ModuleDict of the held layers keyed by
    their original index, and the embedding (no first stage here), final norm and LM head (no last stage) become
    None. The chunks keep running the same module objects. Engines build the optimizer and the checkpoint state
    (torch.distributed.checkpoint, by these names) over it, which is what lets a checkpoint written with one
    pp be read with another: every rank writes and asks for its own keys.

    Not callable as a model any more (its forward would miss layers): the schedule runs the chunks."""
    held = sorted(i for c in chunks for i in c.layer_ids)
    inner = model.model
    inner.layers = nn.ModuleDict({str(i): inner.layers[i] for i in held})
    if not any(c.is_first for c in chunks):
        inner.embed_tokens = None
    if not any(c.is_last for c in chunks):
        inner.norm = None
        model.lm_head = None
    model._pipeline_chunks = [c.stage_index for c in chunks]
    return model


def bubble_summary(name: str, p: int, m: int, v: int) -> dict[str, float]:
    """The schedule's bubble, two references: the papers' formula and torch's action lists simulated, both at
    T_F = T_B = T_W (a full backward twice the forward), as fractions of the step."""
    return {"formula": bubble_formula(name, p, m, v), "simulated": simulated_bubble(name, p, m, v)}


def peak_in_flight(name: str, p: int, m: int, v: int = 1) -> float:
    """Micro-batches' worth of a rank's layers whose activations the busiest rank holds at once, read off torch's
    own action lists: a chunk's forward of a micro-batch adds 1/v, its full backward (B) or weight-gradient pass
    (W, after which nothing of it is kept) releases it. GPipe: m; 1F1B: p; Interleaved1F1B, ZB-V, DualPipeV: as
    torch orders them (their papers' p(1 + (p-1)/(pv)), p, p+1 are what torch's lists give at m >= 2p)."""
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


# ---------------------------------------------------------------- the emulated slow link, for the pipeline's p2p


class P2PDelay:
    """comm/link=slow for pipeline traffic: a receive from a rank on another (virtual) node waits, after its data
    arrived over loopback, the time the α-β link model gives its bytes (comm/slowlink.py). Receiver-side, as a
    slow link delays the consumer; sends stay asynchronous, as torch posts them. Installed by patching torch's
    schedule-module helpers ``_batch_p2p`` (which recvs cross a node boundary: counted) and ``_wait_batch_p2p``
    (after the wait: the delay), before ``StageTimer`` wraps the latter, so the delay is measured as p2p wait."""

    def __init__(self, link, node_of_rank: tuple[int, ...], rank: int):
        self.link, self.node_of_rank, self.rank = link, node_of_rank, rank
        self.messages, self.bytes, self.delayed_s = 0, 0, 0.0
        self._restore = None

    def _crosses(self, op) -> bool:
        peer = op.peer if op.peer is not None else dist.get_global_rank(op.group, op.group_peer)
        return self.node_of_rank[peer] != self.node_of_rank[self.rank]

    def install(self) -> "P2PDelay":
        from torch.distributed.pipelining import schedules as S

        batch, wait = S._batch_p2p, S._wait_batch_p2p

        def batch_p2p(p2p_ops, desc=None):
            for op in p2p_ops:
                if op.op is dist.irecv and self._crosses(op):
                    self.messages += 1
                    self.bytes += op.tensor.numel() * op.tensor.element_size()
            return batch(p2p_ops, desc)

        def wait_batch_p2p(works):
            out = wait(works)
            if self.messages:
                seconds = self.link.delay_s(self.messages, self.bytes)
                self.link.wait(seconds)
                self.delayed_s += seconds
                self.messages, self.bytes = 0, 0
            return out

        S._batch_p2p, S._wait_batch_p2p = batch_p2p, wait_batch_p2p

        def restore():
            S._batch_p2p, S._wait_batch_p2p = batch, wait
        self._restore = restore
        return self

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def all_reduce_s(self, nbytes: float, ranks: list[int]) -> float:
        """Modelled seconds a ring all-reduce of ``nbytes`` over ``ranks`` spends on the link when they span
        nodes: 2(d-1) steps of nbytes/d each, as comm/slowlink.py's flat ring (0 inside one node)."""
        d = len(ranks)
        if d <= 1 or len({self.node_of_rank[r] for r in ranks}) <= 1:
            return 0.0
        return self.link.delay_s(2 * (d - 1), 2 * (d - 1) * nbytes / d)


def placement(groups: dict, node_of_rank: tuple[int, ...]) -> dict[str, str]:
    """For each mesh dim ("tp", "pp", "dp"), whether its groups stay inside a node or cross nodes: what
    topology-aware placement should give (tp inside, pp and dp across) and what comm/link=slow then delays."""
    out = {}
    for dim in ("tp", "pp", "dp"):
        gs = [g for g in groups.get(f"{dim}_groups", []) if len(g) > 1]
        if not gs:
            out[dim] = "size 1"
        else:
            out[dim] = "across nodes" if any(len({node_of_rank[r] for r in g}) > 1 for g in gs) else "within a node"
    return out

"""Pipeline parallelism for the Baichuan decoder with ``torch.distributed.pipelining``: split, stages, schedule, step.

Start at ``build_pipeline`` (split, stages and schedule in one call) or, step by step:

    check_layout(schedule, pp, v, n_layers, m)              pure refusals, before any process group
    chunks, stages = build_stages(model, pp_group, schedule=..., virtual_stages=v)
    sched = build_schedule(name, stages, n_microbatches, loss_fn=None)
    loss = pipeline_step(sched, stages, tokens, targets)     (B, T) each; B divisible by m

The schedules' facts (torch's names and the papers', which stages a rank holds, chunk and microbatch rules, the
papers' bubble and in-flight forms) live in comm/schedules.py, which the cluster predictor reads too; this module
looks torch's names up there (``schedule_traits``) and adds what needs torch. The bubble, simulated from torch's
action lists and measured on the ranks, is comm/parallel/bubble.py.

Splitting. The decoder's layers are cut into S = pp * v stages of n_layers / S consecutive layers; stage 0 also
holds the embedding, stage S-1 the final norm, the LM head and the loss. Which stages a rank holds follows the
schedule's layout (comm/schedules.py): one stage per rank (GPipe, 1F1B), v stages looped (stage s on rank s % pp:
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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.schedules import TORCH_SCHEDULES, Schedule

# ---------------------------------------------------------------- torch's schedules: names, layout, refusals


# Schedules that split the backward into input- and weight-gradient passes (I, W): torch keeps a micro-batch's
# graph between them, and a saved-tensors hook then keeps its tensors past the W pass (systems.memory's meter).
SPLIT_BACKWARD = frozenset(name for name, s in TORCH_SCHEDULES.items() if s.split_backward)


def schedule_names() -> list[str]:
    """The schedules this module can run: torch's (get_schedule_class) that comm/schedules.py describes."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    names = []
    for name in TORCH_SCHEDULES:
        try:
            get_schedule_class(name)
        except ValueError:  # an older torch without it
            continue
        names.append(name)
    return names


def schedule_traits(name: str) -> Schedule:
    """The schedule torch calls ``name`` (case-insensitive, as torch); ValueError listing the valid names otherwise.
    Its ``torch_name`` is torch's spelling."""
    valid = schedule_names()
    for n in valid:
        if n.lower() == str(name).lower():
            return TORCH_SCHEDULES[n]
    raise ValueError(f"unknown pipeline schedule {name!r}; the valid ones (torch {torch.__version__}) are "
                     f"{', '.join(valid)}")


def default_virtual_stages(name: str) -> int:
    return schedule_traits(name).default_chunks()


def check_layout(schedule: str, pp: int, virtual_stages: int, n_layers: int, n_microbatches: int | None = None) -> None:
    """Refuse, with the numbers, a layout the schedule cannot run. Pure: call it before any process group."""
    t = schedule_traits(schedule)
    name = t.torch_name
    if pp < 1 or virtual_stages < 1:
        raise ValueError(f"pp={pp} and virtual stages={virtual_stages} must be >= 1")
    if t.chunks == "one" and virtual_stages != 1:
        raise ValueError(f"schedule {name} runs one stage per rank; virtual stages={virtual_stages} needs an "
                         "interleaved or looped schedule (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble)")
    if t.chunks == "two" and virtual_stages != 2:
        raise ValueError(f"schedule {name} runs exactly 2 stages per rank in a V; got virtual stages="
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
            raise ValueError(f"schedule {name} with pp={pp}: {problem}")


def stage_indices(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stage indices rank ``pp_rank`` holds, ascending (torch's generate_rank_to_stage_mapping)."""
    return schedule_traits(schedule).stage_indices(pp_rank, pp, virtual_stages)

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
    check_layout(t.torch_name, p, len(stages), stages[0].num_stages, n_microbatches)  # num_stages layers: divides
    held, expected = sorted(s.stage_index for s in stages), t.stage_indices(stages[0].group_rank, p, len(stages))
    if held != expected:
        raise ValueError(f"rank {stages[0].group_rank} holds stages {held} but {t.torch_name} places {expected} on it: "
                         f"build the stages for this schedule (build_stages(..., schedule={t.torch_name!r}))")
    if loss_fn is None:
        loss_fn = _LastChunkLoss([s.submod for s in stages])
    cls = get_schedule_class(t.torch_name)
    try:
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
        return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    except ValueError as e:  # a rule of torch's that check_layout does not know yet
        raise ValueError(f"schedule {t.torch_name} with pp={p}, {len(stages)} stages per rank and {n_microbatches} "
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
    knobs = {"pp": p, "schedule": schedule_traits(schedule).torch_name, "virtual_stages": v, "n_microbatches": m,
             "stages": [c.stage_index for c in chunks],
             "layers": [list(c.layer_ids) for c in chunks]}
    return Pipeline(chunks, stages, sched, group, knobs)

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

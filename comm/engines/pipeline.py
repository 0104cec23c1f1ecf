"""The pipeline engine: ``parallel.pp > 1`` under ``engine=ddp``, the loop's same five calls over pipeline stages.

The trainer splits the model (comm/parallel/pipeline.py: ``build_pipeline``, then ``stage_module`` prunes the model
to this rank's stages under the unsplit names) and builds the optimizer over that pruned module; this engine runs
one schedule step per optimizer step:

    forward_backward   the step's micro-batches joined into one batch of rows, split by the schedule into
                       ``parallel.pp_microbatches``; the first stage reads the tokens, the last the targets; the
                       batch's mean loss reaches every pp rank (one all-reduce); each stage's compute is timed
                       (``StageTimer``) so the step's bubble is measured, not assumed
    step               gradients averaged over the data-parallel group (one all-reduce per parameter after the
                       whole backward: with pipeline stages there is no single backward for DDP's buckets to
                       overlap with), clipped by the whole model's norm (squares summed over pp, and over tp for
                       sharded weights), then the shared optimizer step
    checkpoint state   TorchOptimizerEngine's: every rank writes its own parameters' keys (unsplit names,
                       optimizer state flattened per parameter), so another pp (or none) reads them

Why not DDP around the stages: DDP expects one forward and one backward per step and the schedule runs many
interleaved ones per stage (and ZB schedules split the backward in two); one reduction after the schedule is what
torchtitan does for pp with plain data parallelism too (it uses FSDP for dp otherwise).
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from comm.engines.engine import TorchOptimizerEngine, average_grads, gather_rank_losses
from comm.parallel.bubble import StageTimer, bubble_summary, measure_step
from comm.parallel.pipeline import Pipeline
from comm.parallel.tensor import clip_grad_norm_


class PipelineEngine(TorchOptimizerEngine):
    def __init__(self, pipeline: Pipeline, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 grad_clip: float, device: torch.device, scaler: torch.amp.GradScaler, dp_mesh=None):
        """pipeline: this rank's stages and schedule; module: the model pruned to them (``stage_module``), which
        the optimizer steps. dp_mesh: the mesh's data-parallel dim (gradients averaged over it)."""
        if scaler.is_enabled():
            raise ValueError("fp16 loss scaling under parallel.pp>1 is not supported (the schedule computes the "
                             "loss inside torch.distributed.pipelining); use precision=bf16 or fp32")
        self.pipe = pipeline
        self.raw = self.model = module
        self.device = device
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.dp_group = None if dp_mesh is None or dp_mesh.size() == 1 else dp_mesh.get_group()
        self.dp_size = 1 if dp_mesh is None else dp_mesh.size()
        self.first = any(c.is_first for c in pipeline.chunks)
        self.last = any(c.is_last for c in pipeline.chunks)
        self.optimizer, self.scheduler, self.grad_clip, self.scaler = optimizer, scheduler, grad_clip, scaler
        self.clip_grad_norm = functools.partial(clip_grad_norm_, sum_over=(pipeline.group,))
        self.skipped_steps = 0
        self.rank_losses: list[float] = []
        self.timer = StageTimer(pipeline.schedule, pipeline.stages)
        k = pipeline.knobs
        self.theory = bubble_summary(k["schedule"], k["pp"], k["n_microbatches"], k["virtual_stages"])
        self.knobs = {"engine": "ddp+pipeline", **k, "bubble_formula": round(self.theory["formula"], 4),
                      "bubble_simulated": round(self.theory["simulated"], 4),
                      "dp_reduce": "after the schedule, per parameter" if self.dp_group else "none (dp=1)"}
        self.unhonoured: list[str] = []
        if self.dp_group:
            self.unhonoured.append("with parallel.pp>1 gradients are all-reduced over the data-parallel group after "
                                   "the pipeline schedule: no DDP buckets or comm hook, no overlap with backward")
        self._bubble: dict[str, float] = {}
        # Where a NaN/Inf starts: a chunk whose output is non-finite from a finite input. Each chunk forward
        # keeps that as a device tensor (no host sync on the hot path); it is read only when a loss is non-finite
        # and gathered with the losses, so check_losses blames the stage, not the replica.
        self._began_here: list[torch.Tensor] = []
        self.nan_origins: list[bool] | None = None
        for chunk in pipeline.chunks:
            chunk.register_forward_hook(self._watch_nan)

    def _watch_nan(self, module, args, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        x = args[0] if args else None
        finite_in = torch.isfinite(x).all() if x is not None and x.is_floating_point() else True
        self._began_here.append(torch.logical_and(torch.as_tensor(finite_in), ~torch.isfinite(output).all()))

    @property
    def module(self) -> nn.Module:
        return self.raw

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                         forward_context: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        xs, ys = zip(*micro_batches)
        x, y = torch.cat(xs), torch.cat(ys)  # (n_micro * B, T): the schedule cuts its own microbatches
        with forward_context():  # once per step: autocast, the activation meter and the chaos hooks span it
            bubble, loss = measure_step(
                lambda: self.pipe.step(x if self.first else None, y if self.last else None), self.timer,
                self.pipe.group)
        # The pipeline's bubble: mean over its ranks of idle / step (one small all-reduce).
        idle = torch.tensor([bubble.idle_s, bubble.wait_s], dtype=torch.float64)
        dist.all_reduce(idle, group=self.pipe.group)
        p = dist.get_world_size(self.pipe.group)
        self._bubble = {"pp/bubble": idle[0].item() / p / bubble.step_s, "pp/p2p_wait_s": idle[1].item() / p,
                        "pp/step_s": bubble.step_s}
        mean, self.rank_losses = gather_rank_losses(loss.to(self.device), self.distributed)
        if not all(map(math.isfinite, self.rank_losses)):  # only then: one more small all-gather
            here = float(torch.stack(self._began_here).any()) if self._began_here else 0.0
            _, flags = gather_rank_losses(torch.tensor(here, device=self.device), self.distributed)
            self.nan_origins = [f > 0 for f in flags]
        self._began_here.clear()
        return mean

    def step(self) -> dict[str, float]:
        if self.dp_group is not None:
            nbytes = average_grads(self.raw.parameters(), self.dp_group, self.dp_size)
            link = self.pipe.link_delay  # comm/link=slow: the reduction's modelled time on the inter-node link
            if link is not None:
                link.link.wait(link.all_reduce_s(nbytes, dist.get_process_group_ranks(self.dp_group)))
        stats = self._optimizer_step()
        stats.update(self._bubble, **{"pp/bubble_simulated": self.theory["simulated"],
                                      "pp/bubble_formula": self.theory["formula"]})
        return stats

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter of the whole model on every rank: tensor shards gathered, then the stages' parameters
        exchanged over pp (pickled: for the end-of-run replica digests, not for large models)."""
        local = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                 for name, p in self.raw.named_parameters()}
        parts: list = [None] * dist.get_world_size(self.pipe.group)
        dist.all_gather_object(parts, local, group=self.pipe.group)
        return {k: v for part in parts for k, v in part.items()}

    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None:
        """Nothing to lay out after a resume: no DDP buckets under the pipeline."""

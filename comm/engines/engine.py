"""The one interface between the training loop and a data-parallel engine (DDP, FSDP2, DeepSpeed, megatron-core).

The loop builds ``EngineInputs`` once and hands them to the selected engine config's ``build``; from then on it
only calls the methods of ``Engine`` below, never the engine's name. Each engine maps chuanliu's communication
policies onto its own knobs (``knobs``: what it used, logged at start-up and stored in ``summary.json``) and says
which it cannot honour (``unhonoured``), so a comparison never silently runs something else than it claims.

An engine config has two methods: ``build(EngineInputs) -> Engine`` and ``state_bytes(n_params, *, dp,
compute_dtype, unit_params, bucket_bytes) -> StateBytes``, what one rank will hold, which the memory estimate
(experiments/memory.py) adds to the activations before anything is allocated.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from comm.parallel.tensor import from_canonical, to_canonical

# Optimizer state keyed per parameter ("state.<name>.exp_avg", "param_groups.<name>.lr"), not by each rank's
# parameter-group lists: the keys then do not depend on which rank holds which parameters, so a checkpoint
# written under one parallel layout (pipeline stages, tensor shards) is read under another.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass(kw_only=True)
class EngineInputs:
    """What every engine is built from: the model and optimizer the loop made, and the policies' decisions."""

    model: nn.Module
    optimizer: torch.optim.Optimizer  # a torch optimizer over model.parameters() (AdamW, fp32 state)
    scheduler: Any  # a torch LR scheduler of that optimizer, stepped once per optimizer step
    grad_clip: float  # max global grad norm; <= 0 disables clipping
    device: torch.device
    scaler: torch.amp.GradScaler  # disabled unless fp16 with loss scaling
    compute_dtype: str = "fp32"  # the precision group's compute dtype: fp32 | bf16 | fp16 | fp8
    bucket_bytes: int = 25 * 2**20  # from the comm/bucket policy
    # The same bucket in gradient elements of the dtype the engine reduces (BucketChoice.elements); None: fp32.
    bucket_elements: int | None = None
    overlap: bool = True  # comm/overlap: reduce gradients while backward still runs
    comm_hook: tuple | None = None  # (hook, state) from comm.hooks.build_comm_hook, or None (engine's own reduce)
    # Builds (optimizer, scheduler) for a module: engines that replace the parameters (FSDP2's DTensors) build
    # their optimizer again over the new ones, with the same parameter groups and schedule.
    make_optimizer: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]] | None = None
    # Tensor parallelism (comm/parallel): the data-parallel dimension of the (dp, pp, tp) mesh the engine reduces
    # over (None: every rank), and the gradient-norm clip that counts sharded gradients once.
    dp_mesh: Any = None
    clip_grad_norm: Callable[[Iterable[torch.Tensor], float], torch.Tensor] = torch.nn.utils.clip_grad_norm_
    # Pipeline parallelism: this rank's stages and schedule (comm.parallel.pipeline.Pipeline); ``model`` is then
    # the model pruned to them. None: no pipeline.
    pipeline: Any = None

    def __post_init__(self) -> None:
        if self.bucket_elements is None:
            self.bucket_elements = max(1, self.bucket_bytes // 4)


@dataclass(frozen=True)
class StateBytes:
    """What one rank of an engine holds besides activations, in bytes: weights, gradients, optimizer state (incl.
    fp32 master weights) and the engine's own buffers (unshared buckets, gathered parameters, prefetch). Engine
    configs return it from ``state_bytes`` (AdamW: two fp32 moments per parameter; Rajbhandari et al. 2020 for
    what each ZeRO stage divides by the data-parallel size); ``param_bytes`` is the dtype the forward reads the
    weights in (the residual stream's dtype)."""

    weights: float
    grads: float
    optimizer: float
    buffers: float = 0.0
    param_bytes: int = 4
    grad_bytes: int = 4  # the dtype gradients are reduced in: what a bucket's bytes count

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buffers

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer, "buffers": self.buffers}


class Engine(Protocol):
    knobs: dict[str, Any]  # the engine's own settings, as used (bucket sizes, overlap flags, ZeRO stage...)
    unhonoured: list[str]  # chuanliu settings this engine could not apply, one sentence each
    rank_losses: list[float]  # each rank's local loss of the last forward_backward

    @property
    def module(self) -> nn.Module: ...  # the unwrapped model (its parameters may be shards: FSDP2, ZeRO-3)

    def full_parameters(self) -> dict[str, torch.Tensor]: ...  # every parameter whole, on every rank (collective)

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                         forward_context: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor: ...

    def step(self) -> dict[str, float]: ...  # grad_norm, lr, loss_scale, skipped_steps (+ comm/* when measured)

    def sharded_state(self) -> dict[str, Any]: ...  # tensors for torch.distributed.checkpoint

    def load_sharded_state(self, state: dict[str, Any]) -> None: ...

    def local_state(self) -> dict[str, Any]: ...  # small per-rank state (scheduler, scaler, counters)

    def load_local_state(self, state: dict[str, Any]) -> None: ...

    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None: ...  # after a resume

    # An engine with its own checkpoint format (DeepSpeed) returns an object with native_save(dir),
    # native_load(dir, trust_pickle) and native_check(dir) (fault.checkpoint.NativeFormat); fault.checkpoint runs
    # them inside the checkpoint directory it verifies and commits. None: DCP's state is the whole checkpoint.
    @property
    def native(self) -> Any | None: ...


class TorchOptimizerEngine:
    """What the engines that step a torch optimizer over ``module``'s parameters share (DDP, FSDP2, megatron-core):
    the optimizer step, and the checkpoint state: model and optimizer through torch.distributed.checkpoint
    (replicated tensors are written once, DTensor shards by their owners), the schedule, the loss scaler and the
    skipped-step count per rank."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler  # disabled unless fp16: then it passes everything through
    grad_clip: float
    skipped_steps: int
    native = None  # no format of its own: model and optimizer travel through DCP (Engine.native)

    model: nn.Module  # what the loop calls: the engine's wrapper (DDP) or the module itself
    device: torch.device
    distributed: bool  # more than one data-parallel rank
    clip_grad_norm: Callable = staticmethod(torch.nn.utils.clip_grad_norm_)  # EngineInputs.clip_grad_norm

    def forward_backward(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_micro: int,
                         forward_context: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Accumulate gradients over ``n_micro`` micro-batches, reducing them only with the last (each engine's
        ``_accumulating``); returns the mean loss over all ranks (detached). Every rank's own loss is gathered
        into ``rank_losses`` (one collective), so a NaN can be traced to the rank that produced it."""
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with self._accumulating(last=i == n_micro - 1):
                with forward_context():
                    loss = self.model(x, y) / n_micro
                self.scaler.scale(loss).backward()  # a disabled scaler passes the loss through
            total += loss.detach()
        mean, self.rank_losses = gather_rank_losses(total, self.distributed)
        return mean

    def _accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward: defers the gradient reduction unless ``last``."""
        return contextlib.nullcontext()

    def _optimizer_step(self) -> dict[str, float]:
        """Unscale, clip, step the optimizer (skipped on overflow) and the schedule; zero the gradients.

        Returns the pre-clip global grad norm, the lr used, the loss scale and the running count of steps the
        scaler skipped because gradients overflowed."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = self.clip_grad_norm(self.module.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Dynamic scaling lowers the scale only when it found inf/nan and skipped optimizer.step().
        self.skipped_steps += self.scaler.get_scale() < scale
        with warnings.catch_warnings():  # a skipped step still advances the schedule, by design
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        # set_to_none: megatron-core's .grad aliases its buffer, which must not be accumulated into twice.
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm.item(), "lr": lr, "loss_scale": scale, "skipped_steps": self.skipped_steps}

    def sharded_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=STATE_DICT_OPTIONS)
        return to_canonical(self.module, {"model": model_sd, "optim": optim_sd})

    def load_sharded_state(self, state: dict[str, Any]) -> None:
        state = from_canonical(self.module, state)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=STATE_DICT_OPTIONS)

    def local_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_local_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = state["skipped_steps"]


def average_grads(params: Iterable[nn.Parameter], group, size: int) -> int:
    """Average every gradient (a DTensor's local shard) over ``group`` of ``size`` ranks, one all-reduce each;
    returns the bytes reduced. Used where DDP's buckets cannot be: model-parallel parameters (tp, pipeline stages)."""
    nbytes = 0
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=group)
            g.div_(size)
            nbytes += g.numel() * g.element_size()
    return nbytes


def parameter_digest(params: dict[str, torch.Tensor]) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(engine: Engine) -> list[str]:
    """Every rank's digest of the whole parameters (one entry when not distributed); after a data-parallel step
    they must all agree, whichever engine sharded them."""
    digest = parameter_digest(engine.full_parameters())
    if not (dist.is_available() and dist.is_initialized()):
        return [digest]
    out: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(out, digest)
    return out


# torch 2.13 renamed all_gather_into_tensor (a FutureWarning); older releases only have the old name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_rank_losses(total: torch.Tensor, distributed: bool) -> tuple[torch.Tensor, list[float]]:
    """(mean loss over ranks, every rank's own loss): one all-gather, so a NaN can be traced to its rank."""
    if not distributed:
        return total, [total.item()]
    gathered = torch.empty(dist.get_world_size(), device=total.device, dtype=total.dtype)
    _all_gather(gathered, total.reshape(1))
    return gathered.mean(), gathered.tolist()

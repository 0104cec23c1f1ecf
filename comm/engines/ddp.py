"""The DDP engine: the training loop's one interface to gradient synchronisation and the optimizer step.

One process: the plain module. Several: ``torch.nn.parallel.DistributedDataParallel`` with gradient
accumulation under ``no_sync`` (only the last micro-batch all-reduces). Other engines (FSDP2, DeepSpeed,
megatron-core) implement the same calls: ``forward_backward``, ``step``, ``module``, ``rank_losses`` and the
checkpoint state (``sharded_state``/``load_sharded_state``, ``local_state``/``load_local_state``).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from comm.engines.engine import EngineInputs, StateBytes, TorchOptimizerEngine, average_grads
from comm.engines.pipeline import PipelineEngine

# The RoPE tables are the model's only buffers, identical constants: no buffer collective in each forward (which
# also keeps the forward free of communication, so the watchdog can time it as the rank's own speed).
_DDP_ARGS = inspect.signature(DDP.__init__).parameters
NO_BUFFER_SYNC = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}


@dataclass(kw_only=True)
class DDPConfig:
    gradient_as_bucket_view: bool = True  # grads alias the buckets: one copy fewer
    static_graph: bool = False  # the graph is the same every step (lets DDP skip unused-parameter search)

    def state_bytes(self, n_params: int, *, dp: int, compute_dtype: str, unit_params: int,
                    bucket_bytes: int) -> StateBytes:
        """fp32 weights, gradients and AdamW moments on every rank; without gradient_as_bucket_view DDP's buckets
        are a second copy of the gradients."""
        copy = 4 * n_params if dp > 1 and not self.gradient_as_bucket_view else 0
        return StateBytes(weights=4 * n_params, grads=4 * n_params, optimizer=8 * n_params, buffers=copy)

    def build(self, inputs: EngineInputs) -> DDPEngine | PipelineEngine:
        i = inputs
        if i.pipeline is not None:  # parallel.pp > 1: the schedule runs the stages, dp reduces after it
            return PipelineEngine(i.pipeline, i.model, i.optimizer, i.scheduler, grad_clip=i.grad_clip,
                                  device=i.device, scaler=i.scaler, dp_mesh=i.dp_mesh)
        engine = DDPEngine(i.model, i.optimizer, i.scheduler, cfg=self, grad_clip=i.grad_clip, device=i.device,
                           scaler=i.scaler, bucket_bytes=i.bucket_bytes, comm_hook=i.comm_hook, overlap=i.overlap,
                           dp_mesh=i.dp_mesh)
        engine.clip_grad_norm = i.clip_grad_norm
        return engine


class DDPEngine(TorchOptimizerEngine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, cfg: DDPConfig,
                 grad_clip: float, device: torch.device, scaler: torch.amp.GradScaler, bucket_bytes: int,
                 comm_hook=None, overlap: bool = True, dp_mesh=None):
        """bucket_bytes: from a comm.buckets policy. comm_hook: (hook, state) from comm.hooks.build_comm_hook, or
        None for DDP's native all-reduce. dp_mesh: with tensor parallelism, the mesh's data-parallel dimension
        (DDP then reduces over it and accepts the DTensor parameters; a process group would not)."""
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and comm_hook is None and not overlap:
            raise ValueError("comm.overlap.enabled=false with engine=ddp needs a chuanliu hook (DDP's native "
                             "all-reduce always overlaps); use comm/algorithm=flat or hierarchical")
        self.raw = model
        self.model = model
        self.device = device
        # Tensor parallelism: DDP is not used. torch 2.13's DDP(device_mesh=...) over DTensor parameters ran, but
        # its gradients came out ~70x too small (gloo, tp=2, even with dp=1; losses still matched under AdamW, which
        # is scale-free); so the gradients are all-reduced over the dp group after backward (average_grads).
        self.dp_group = None if dp_mesh is None or dp_mesh.size() == 1 else dp_mesh.get_group()
        self.dp_size = 1 if dp_mesh is None else dp_mesh.size()
        if self.distributed and dp_mesh is None:
            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                             bucket_cap_mb=bucket_bytes / 2**20, static_graph=cfg.static_graph,
                             gradient_as_bucket_view=cfg.gradient_as_bucket_view, **NO_BUFFER_SYNC)
        self.comm_state = None
        if self.distributed and comm_hook is not None:
            hook, self.comm_state = comm_hook
            self.model.register_comm_hook(self.comm_state, hook)
        self.bucket_bytes = bucket_bytes
        self.knobs = {"engine": "ddp", "bucket_cap_mb": bucket_bytes / 2**20, "comm_hook": comm_hook is not None,
                      "overlap": overlap, "static_graph": cfg.static_graph}
        self.unhonoured: list[str] = []
        if dp_mesh is not None:
            self.knobs["dp_reduce"] = "after backward, per parameter" if self.dp_group else "none (dp=1)"
            if self.dp_group:
                self.unhonoured.append("with parallel.tp>1 gradients are all-reduced over the data-parallel group "
                                       "after backward, one collective per parameter: no DDP buckets, no overlap")
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.scaler = scaler  # a disabled GradScaler passes everything through
        self.skipped_steps = 0
        self.rank_losses: list[float] = []  # each rank's local loss of the last forward_backward

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (for checkpoints and parameter inspection)."""
        return self.raw

    def full_parameters(self) -> dict[str, torch.Tensor]:
        # Tensor-parallel parameters are DTensors: gathered whole (collective over their tp group).
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                for name, p in self.raw.named_parameters()}

    def _accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        wrapped = self.model is not self.raw
        return contextlib.nullcontext() if last or not wrapped else self.model.no_sync()

    def step(self) -> dict[str, float]:
        """The shared optimizer step (TorchOptimizerEngine), plus this step's timings from a chuanliu hook."""
        if self.dp_group is not None:  # tensor parallelism: no DDP wrapper, average over dp after backward
            average_grads(self.raw.parameters(), self.dp_group, self.dp_size)
        stats = self._optimizer_step()
        if self.comm_state is not None:
            stats.update(self.comm_state.step_stats(), **{"comm/bucket_bytes": self.bucket_bytes})
        return stats

    # Checkpoint state: TorchOptimizerEngine (comm/engines/engine.py).
    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None:
        """After a resume: one throw-away forward/backward so DDP's gradient buckets are laid out as in a run that
        never stopped.

        DDP reduces the first iteration's gradients in parameter order and then rebuilds its buckets in the order
        gradients became ready. With 3 or more ranks a float sum depends on where an element sits in a bucket
        (gloo's ring gives each chunk its own reduction order), so a resumed job that reduced its first step in
        the initial layout drifted from the uninterrupted run by ~1e-7 within two steps (measured with 4 ranks).
        This backward records the ready order; the next forward rebuilds the buckets from it. Gradients, comm
        timings and random state are discarded.
        """
        if not self.distributed:
            return
        rng = torch.get_rng_state()
        with forward_context():
            loss = self.model(x, y)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        if self.comm_state is not None:
            self.comm_state.step_stats()
        torch.set_rng_state(rng)

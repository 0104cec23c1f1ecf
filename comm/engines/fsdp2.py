"""The FSDP2 engine: ``torch.distributed.fsdp.fully_shard`` (ZeRO-3-style sharding of parameters, gradients and
optimizer state), behind the same interface as DDP (comm/engines/engine.py).

Each decoder layer is its own FSDP unit (one all-gather before its forward and backward, one reduce-scatter of its
gradients after backward), and the root unit holds the embedding, the final norm and the LM head. FSDP2 replaces
the parameters with DTensor shards, so the optimizer and its schedule are built again over the new parameters
(``EngineInputs.make_optimizer``: same groups, same schedule).

Mapping chuanliu's communication policies onto FSDP2:
- bucket size: FSDP2 communicates one unit at a time; the unit is a decoder layer, not a byte count, so the
  bucket policy's size is not applied (said at start-up). ``layers_per_unit`` groups layers instead.
- overlap: FSDP2 overlaps by design (it prefetches the next unit's all-gather and runs reduce-scatters on their
  own stream on a GPU); ``overlap=False`` cannot be honoured and is reported.
- comm hooks (flat/hierarchical all-reduce) are DDP's mechanism; FSDP2 uses its own collectives.
- precision: bf16 runs as in DDP (autocast over fp32 parameters); the master weights and reduce-scatters stay fp32,
  so fp32 and bf16 results are comparable with DDP's. fp16 needs a sharded gradient scaler: refused with a clear
  message.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from comm.engines.engine import EngineInputs, StateBytes, TorchOptimizerEngine


@dataclass(kw_only=True)
class FSDP2Config:
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2-like)
    layers_per_unit: int = 1  # decoder layers per FSDP unit: the communication granularity

    def __post_init__(self) -> None:
        if self.layers_per_unit < 1:
            raise ValueError(f"engine.layers_per_unit={self.layers_per_unit} must be >= 1")

    def state_bytes(self, n_params: int, *, dp: int, compute_dtype: str, unit_params: int,
                    bucket_bytes: int) -> StateBytes:
        """fp32 weights, gradients and AdamW moments sharded over dp; during forward and backward a unit's
        parameters are gathered whole (the current unit and the prefetched next one) and its gradients are whole
        until reduce-scattered; without reshard_after_forward every unit stays gathered from forward to backward."""
        units = self.layers_per_unit * unit_params
        gathered = 0 if dp == 1 else 4 * (2 * units + units)
        if not self.reshard_after_forward and dp > 1:
            gathered += 4 * n_params * (1 - 1 / dp)
        return StateBytes(weights=4 * n_params / dp, grads=4 * n_params / dp, optimizer=8 * n_params / dp,
                          buffers=gathered)

    def build(self, inputs: EngineInputs) -> FSDP2Engine:
        return FSDP2Engine(inputs, self)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (BaichuanForCausalLM.model.layers), compiled wrappers included."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"FSDP2 shards per decoder layer, but {type(model).__name__} has no .model.layers")
    return list(layers)


class FSDP2Engine(TorchOptimizerEngine):
    def __init__(self, inputs: EngineInputs, cfg: FSDP2Config):
        if inputs.compute_dtype == "fp16":
            raise ValueError("engine=fsdp2 with precision=fp16 needs a sharded gradient scaler, which chuanliu does "
                             "not wire; use precision=bf16 (no loss scaling needed) or engine=ddp for fp16")
        if inputs.make_optimizer is None:
            raise ValueError("engine=fsdp2 rebuilds the optimizer over its sharded parameters: EngineInputs."
                             "make_optimizer is required")
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.model = inputs.model
        self.device = inputs.device
        self.unhonoured: list[str] = []
        if self.distributed:
            mesh = init_device_mesh(inputs.device.type, (dist.get_world_size(),))
            layers = _decoder_layers(self.model)
            for i in range(0, len(layers), cfg.layers_per_unit):
                group = layers[i:i + cfg.layers_per_unit]
                fully_shard(group if len(group) > 1 else group[0], mesh=mesh,
                            reshard_after_forward=cfg.reshard_after_forward)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward)
            self.unhonoured.append(
                f"comm/bucket ({inputs.bucket_bytes / 2**20:.1f} MiB): FSDP2 reduces one unit of "
                f"{cfg.layers_per_unit} decoder layer(s) at a time, not by bucket size")
            if not inputs.overlap:
                self.unhonoured.append("comm/overlap=off: FSDP2 always prefetches and overlaps its collectives")
            if inputs.comm_hook is not None:
                self.unhonoured.append("comm/algorithm (chuanliu's all-reduce hooks) is a DDP mechanism; FSDP2 "
                                       "uses its own all-gather and reduce-scatter")
        # The parameters are DTensor shards now: an optimizer over the old ones would update nothing.
        self.optimizer, self.scheduler = inputs.make_optimizer(self.model)
        self.grad_clip = inputs.grad_clip
        self.scaler = inputs.scaler  # disabled (fp16 refused above)
        self.skipped_steps = 0
        self.rank_losses: list[float] = []
        self.knobs = {"engine": "fsdp2", "reshard_after_forward": cfg.reshard_after_forward,
                      "layers_per_unit": cfg.layers_per_unit, "sharded": self.distributed}

    @property
    def module(self) -> nn.Module:
        return self.model

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Collective: every rank all-gathers every parameter."""
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
                for name, p in self.model.named_parameters()}

    def _accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        if self.distributed:  # reduce-scatter only after the last micro-batch
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def step(self) -> dict[str, float]:
        return self._optimizer_step()

    # Checkpoint state: TorchOptimizerEngine (comm/engines/engine.py); DCP saves DTensor shards natively.
    def prime(self, x: torch.Tensor, y: torch.Tensor, forward_context) -> None:
        """Nothing to prime: FSDP2's collectives do not depend on a first-iteration layout."""

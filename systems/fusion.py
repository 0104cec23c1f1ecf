"""Operator fusion: per operator, the unfused reference, torch.compile of the op, or a library kernel.

    attention  eager (materialises T x T scores) | sdpa (PyTorch fused) | flash (flash-attn, CUDA) | auto
    rmsnorm    eager | compiled | liger (Liger-Kernel Triton, CUDA) | auto
    swiglu     eager | compiled | liger | auto
    rope       eager | compiled | liger | auto
    loss       eager | compiled | liger (fused linear cross-entropy: no logits at all) | auto
    compile_layers: torch.compile each whole decoder layer (fuses across operators; applied last)

``auto`` takes the first available option in ``PREFERENCE`` and the choice is logged. Choosing an option this
machine cannot run raises systems.capabilities.Unavailable naming what is missing and what to use instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from systems import capabilities as caps
from systems import kernels
from systems.attention import eager_attention, sdpa_attention
from systems.model import apply_rotary, cross_entropy_loss, rms_norm, swiglu

log = logging.getLogger(__name__)

OPERATORS = ("attention", "rmsnorm", "swiglu", "rope", "loss")


@dataclass(kw_only=True)
class FusionConfig:
    attention: str = "sdpa"  # eager | sdpa | flash | auto
    rmsnorm: str = "eager"  # eager | compiled | liger | auto
    swiglu: str = "eager"  # eager | compiled | liger | auto
    rope: str = "eager"  # eager | compiled | liger | auto
    loss: str = "eager"  # LM head + cross-entropy: eager | compiled | liger | auto
    compile_layers: bool = False  # torch.compile every decoder layer whole (after splitting)

    def __post_init__(self) -> None:
        for op in OPERATORS:
            value = getattr(self, op)
            if value != "auto" and value not in IMPLEMENTATIONS[op]:
                raise ValueError(f"fusion.{op}={value!r} is unknown; use one of "
                                 f"{sorted(IMPLEMENTATIONS[op]) + ['auto']}")


def _compiled(fn: Callable) -> Callable:
    # Every layer shares the compiled function; dynamo caches graphs per code object and input shapes.
    return torch.compile(fn)


REFERENCE = {"attention": eager_attention, "rmsnorm": rms_norm, "swiglu": swiglu, "rope": apply_rotary,
             "loss": cross_entropy_loss}

# name -> (builder, availability check returning the reason it cannot run here, or None)
IMPLEMENTATIONS: dict[str, dict[str, tuple[Callable[[], Callable], Callable[[str], str | None]]]] = {
    op: {"eager": (lambda op=op: REFERENCE[op], lambda device: None),
         "compiled": (lambda op=op: _compiled(REFERENCE[op]), lambda device: None)}
    for op in ("rmsnorm", "swiglu", "rope")
}
# A compiled loss is compiled last, by apply_compile, around whatever splitting made of it: a chunked loss then
# becomes one graph whose recomputation the compiler plans. A compiled loss called inside chunked CE's runtime
# checkpoints saved different tensors in forward and in recomputation whenever saved-tensor hooks (the activation
# meter) were active: torch.utils.checkpoint.CheckpointError "Recomputed values ... have different metadata".
IMPLEMENTATIONS["loss"] = {"eager": (lambda: cross_entropy_loss, lambda device: None),
                           "compiled": (lambda: cross_entropy_loss, lambda device: None)}
IMPLEMENTATIONS["attention"] = {"eager": (lambda: eager_attention, lambda device: None),
                                "sdpa": (lambda: sdpa_attention, lambda device: None),
                                "flash": (lambda: kernels.flash_attention, kernels.flash_unavailable)}
for _op, _kernel in {"rmsnorm": "liger_rms_norm", "swiglu": "liger_swiglu", "rope": "liger_rope",
                     "loss": "liger_fused_linear_cross_entropy"}.items():
    IMPLEMENTATIONS[_op]["liger"] = (lambda k=_kernel: getattr(kernels, k), kernels.liger_unavailable)

# auto: first available, best first. On a CPU the library kernels are unavailable and torch.compile's fused
# elementwise kernels beat eager (docs/benchmarks.md), except attention where SDPA is the fused option.
PREFERENCE = {"attention": ("flash", "sdpa", "eager"), "rmsnorm": ("liger", "compiled", "eager"),
              "swiglu": ("liger", "compiled", "eager"), "rope": ("liger", "compiled", "eager"),
              "loss": ("liger", "compiled", "eager")}


def resolve(cfg: FusionConfig, device: str, compute_dtype: str,
            refused: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The implementation name per operator on this device; raises Unavailable for an impossible choice.
    ``refused``: op -> {implementation: reason} that another technique rules out (SplittingConfig.refused_kernels);
    an explicit choice of one raises ValueError with the reason, ``auto`` passes over it."""
    refused = refused or {}
    chosen = {}
    for op in OPERATORS:
        wanted = getattr(cfg, op)
        if wanted in refused.get(op, {}):
            raise ValueError(refused[op][wanted])
        if wanted == "auto":
            usable = [n for n in PREFERENCE[op]
                      if n not in refused.get(op, {}) and IMPLEMENTATIONS[op][n][1](device) is None]
            if op == "attention" and compute_dtype in ("fp32",):
                usable = [n for n in usable if n != "flash"]  # flash-attn has no fp32 kernel
            chosen[op] = usable[0]
            continue
        reason = IMPLEMENTATIONS[op][wanted][1](device)
        if reason:
            raise caps.Unavailable(f"fusion.{op}={wanted} cannot run here: {reason}")
        chosen[op] = wanted
    if chosen["attention"] == "flash" and compute_dtype == "fp32":
        raise caps.Unavailable("fusion.attention=flash needs bf16 or fp16 inputs (flash-attn has no fp32 kernel); "
                               "use precision=bf16 or fusion.attention=sdpa")
    return chosen


def apply_fusion(model: nn.Module, cfg: FusionConfig, *, device: str, compute_dtype: str,
                 refused: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Swap each operator function for the chosen implementation; returns the choice (logged by the caller).
    ``refused``: implementations another technique rules out (see resolve)."""
    chosen = resolve(cfg, device, compute_dtype, refused)
    impl = {op: IMPLEMENTATIONS[op][name][0]() for op, name in chosen.items()}
    for module in model.modules():
        if hasattr(module, "core_fn"):
            module.core_fn, module.rope_fn = impl["attention"], impl["rope"]
        if hasattr(module, "norm_fn"):
            module.norm_fn = impl["rmsnorm"]
        if hasattr(module, "act_fn"):
            module.act_fn = impl["swiglu"]
    model.loss_fn = impl["loss"]
    return chosen


def apply_compile(model: nn.Module, cfg: FusionConfig, chosen: dict[str, str]) -> None:
    """torch.compile whole decoder layers (in place: parameter names unchanged) and a compiled loss. Runs after
    apply_splitting, so the compiled graphs contain the recomputation boundaries."""
    if cfg.compile_layers:
        for layer in model.model.layers:
            layer.compile()
    if chosen["loss"] == "compiled":
        model.loss_fn = _compiled(model.loss_fn)

"""Mixed precision: parameters and optimizer state stay fp32 (master weights); matmuls run in ``compute_dtype``.

    fp32   no autocast (on a GPU, TF32 tensor cores when allow_tf32)
    bf16   autocast to bfloat16
    fp16   autocast to float16 with dynamic loss scaling (torch.amp.GradScaler): a step whose gradients
           overflow is skipped and counted, and the scale backs off
    fp8    bf16 autocast plus torchao's float8 training for the decoder's linear layers (CUDA, SM >= 8.9):
           ``fp8_selection`` names the nn.Linear modules that become Float8Linear and why the others do not

The MFU peak follows ``peak_dtype``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from systems import capabilities as caps

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


# torch._scaled_mm, behind torchao's Float8Linear, needs the weight's two dims (in and out features) divisible
# by 16. The third GEMM dim, tokens, must be too: it is the inner dim of the weight-gradient GEMM (torchao's
# Float8LinearConfig.pad_inner_dim, off by default, would pad it instead).
FP8_ALIGNMENT = 16
# The LM head's weight enters the loss through BaichuanForCausalLM.loss_fn (cross-entropy, chunked CE, Liger's
# fused kernel), which reads lm_head.weight and never calls lm_head.forward: a Float8Linear there would never run.
# Its logits feed the softmax, which torchtitan and others also keep out of fp8.
# Matched on the last name component, so a wrapper's prefix ("module.", "_orig_mod.") does not let it through.
FP8_EXCLUDED = {"lm_head": "the LM head: the loss reads lm_head.weight through loss_fn, never lm_head.forward, "
                           "and its logits feed the softmax, kept in bf16"}


@dataclass(frozen=True)
class Fp8Selection:
    """Which nn.Linear modules precision=fp8 turns into torchao Float8Linear, by fully-qualified name."""

    converted: tuple[str, ...]  # fully-qualified names, in model.named_modules() order
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays in bf16


def fp8_skip_reason(fqn: str, module: nn.Linear) -> str | None:
    """Why this Linear cannot or should not become a Float8Linear; None when it can."""
    excluded = FP8_EXCLUDED.get(fqn.rsplit(".", 1)[-1])
    if excluded:
        return excluded
    bad = [f"{name}={n}" for name, n in (("in_features", module.in_features), ("out_features", module.out_features))
           if n % FP8_ALIGNMENT]
    if bad:
        return f"{', '.join(bad)} not a multiple of {FP8_ALIGNMENT} (fp8 GEMMs, torch._scaled_mm, need it)"
    return None


def fp8_selection(model: nn.Module) -> Fp8Selection:
    """The Linear modules Precision.apply converts for fp8, and the reason for each one it leaves alone. Pure: needs
    neither torchao nor a GPU, so it is tested on CPU and the GPU test compares what torchao actually swapped."""
    converted, skipped = [], {}
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = fp8_skip_reason(fqn, module)
            if reason is None:
                converted.append(fqn)
            else:
                skipped[fqn] = reason
    return Fp8Selection(tuple(converted), skipped)


@dataclass(kw_only=True)
class Precision:
    compute_dtype: str = "fp32"  # fp32 | bf16 | fp16 | fp8
    loss_scaling: str = "none"  # none | dynamic (GradScaler; required by fp16)
    init_scale: float = 65536.0  # first loss scale (dynamic scaling)
    growth_interval: int = 2000  # steps without overflow before the scale doubles
    allow_tf32: bool = True  # on a GPU, fp32 matmuls run on TF32 tensor cores (and MFU uses the tf32 peak)

    def __post_init__(self) -> None:
        if self.compute_dtype not in ("fp32", "bf16", "fp16", "fp8"):
            raise ValueError(f"precision.compute_dtype={self.compute_dtype!r} is unknown; use fp32, bf16, fp16 "
                             "or fp8")
        if self.loss_scaling not in ("none", "dynamic"):
            raise ValueError(f"precision.loss_scaling={self.loss_scaling!r} is unknown; use none or dynamic")
        if self.compute_dtype == "fp16" and self.loss_scaling != "dynamic":
            raise ValueError("precision fp16 without loss scaling lets small gradients underflow to zero; set "
                             "precision.loss_scaling=dynamic (precision=fp16 does) or use precision=bf16")

    def check(self, device_type: str) -> None:
        """Refuse a precision this device cannot run (called before anything is built)."""
        if self.compute_dtype == "fp8":
            caps.require(caps.HAS_FP8, "precision=fp8 needs a CUDA GPU with fp8 tensor cores (SM 8.9+, e.g. H100) "
                                       "and torchao installed (pip install torchao); use precision=bf16")

    def setup(self, device_type: str) -> None:
        """Set process-wide matmul precision; call once before building the model."""
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.compute_dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=_AUTOCAST[self.compute_dtype])

    def make_scaler(self, device_type: str) -> torch.amp.GradScaler:
        # A disabled GradScaler is a pass-through, so the engine has one code path for every precision.
        return torch.amp.GradScaler(device_type, init_scale=self.init_scale, growth_interval=self.growth_interval,
                                    enabled=self.loss_scaling == "dynamic")

    def apply(self, model: nn.Module) -> Fp8Selection | None:
        """fp8: swap the Linear modules ``fp8_selection`` names for torchao Float8Linear (the LM head stays bf16);
        returns the selection, None for other precisions. Refuses a model with no eligible Linear."""
        if self.compute_dtype != "fp8":
            return None
        selection = fp8_selection(model)
        if not selection.converted:
            reasons = "; ".join(f"{fqn}: {why}" for fqn, why in selection.skipped.items()) or "no nn.Linear at all"
            raise ValueError(f"precision=fp8 found no nn.Linear it can run in fp8, so nothing would run in fp8 "
                             f"({reasons}); make model.dim and model.ffn_dim multiples of {FP8_ALIGNMENT} or use "
                             "precision=bf16")
        from torchao.float8 import convert_to_float8_training

        chosen = set(selection.converted)
        convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn in chosen)
        log.info("precision=fp8: %d Linear modules converted to Float8Linear, %d left in bf16",
                 len(selection.converted), len(selection.skipped))
        for fqn, why in selection.skipped.items():
            # The LM head stays in bf16 by design; a decoder Linear left out is a shape worth hearing about.
            by_design = fqn.rsplit(".", 1)[-1] in FP8_EXCLUDED
            log.log(logging.INFO if by_design else logging.WARNING, "precision=fp8: %s stays in bf16: %s", fqn, why)
        return selection

    def peak_dtype(self, device_type: str) -> str:
        """The dtype whose peak FLOPS MFU is measured against."""
        if self.compute_dtype == "fp32" and device_type == "cuda" and self.allow_tf32:
            return "tf32"
        return self.compute_dtype

"""Mixed precision: parameters and optimizer state stay fp32 (master weights); matmuls run in ``compute_dtype``.

    fp32   no autocast (on a GPU, TF32 tensor cores when allow_tf32)
    bf16   autocast to bfloat16
    fp16   autocast to float16 with dynamic loss scaling (torch.amp.GradScaler): a step whose gradients
           overflow is skipped and counted, and the scale backs off
    fp8    bf16 autocast plus torchao's float8 training for the decoder's linear layers (CUDA, SM >= 8.9)

The MFU peak follows ``peak_dtype``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from systems import capabilities as caps

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


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

    def apply(self, model: nn.Module) -> None:
        """fp8: swap the decoder's linear layers for torchao Float8Linear (the LM head stays bf16)."""
        if self.compute_dtype != "fp8":
            return
        from torchao.float8 import convert_to_float8_training

        # fp8 GEMMs need both dims divisible by 16; the LM head's softmax input is kept in higher precision.
        def keep(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and "lm_head" not in fqn and \
                module.in_features % 16 == 0 and module.out_features % 16 == 0

        convert_to_float8_training(model, module_filter_fn=keep)

    def peak_dtype(self, device_type: str) -> str:
        """The dtype whose peak FLOPS MFU is measured against."""
        if self.compute_dtype == "fp32" and device_type == "cuda" and self.allow_tf32:
            return "tf32"
        return self.compute_dtype

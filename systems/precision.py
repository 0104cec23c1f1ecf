"""Numeric precision of a run: parameters and optimizer state stay fp32 (master weights), matmuls run in
``compute_dtype`` under autocast. The MFU peak follows ``peak_dtype``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(kw_only=True)
class Precision:
    compute_dtype: str = "fp32"  # dtype of matmuls: fp32 (no autocast) or bf16 (autocast, fp32 master weights)
    allow_tf32: bool = True  # on a GPU, fp32 matmuls run on TF32 tensor cores (and MFU uses the tf32 peak)

    def __post_init__(self) -> None:
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"precision.compute_dtype={self.compute_dtype!r} is not supported; use one of "
                             f"{sorted(_DTYPES)}")

    def setup(self, device_type: str) -> None:
        """Set process-wide matmul precision; call once before building the model."""
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.compute_dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=_DTYPES[self.compute_dtype])

    def peak_dtype(self, device_type: str) -> str:
        """The dtype whose peak FLOPS MFU is measured against."""
        if self.compute_dtype == "fp32" and device_type == "cuda" and self.allow_tf32:
            return "tf32"
        return self.compute_dtype

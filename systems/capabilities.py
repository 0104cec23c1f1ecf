"""What this machine can run, probed once: optional libraries and GPU features.

Importing chuanliu never fails because flash-attn, Liger, torchao or a GPU is missing: each probe is a boolean,
and a technique that needs one raises ``Unavailable`` (one sentence: what is missing, what to use instead) only
when it is selected.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

HAS_CUDA = torch.cuda.is_available()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAS_FLASH_ATTN = HAS_CUDA and _installed("flash_attn")
HAS_LIGER = HAS_CUDA and _installed("liger_kernel")
HAS_TORCHAO = _installed("torchao")


@functools.cache
def has_fp8() -> bool:
    """fp8 tensor cores (Ada SM 8.9, Hopper SM 9.0 and newer) and torchao. Asked on first use, not at import:
    reading the capability initialises CUDA, which a process that forks workers (or never uses the GPU) must not
    have done just by importing chuanliu."""
    return HAS_CUDA and HAS_TORCHAO and torch.cuda.get_device_capability() >= (8, 9)


def __getattr__(name: str):  # caps.HAS_FP8 reads has_fp8() lazily (PEP 562)
    if name == "HAS_FP8":
        return has_fp8()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Unavailable(ValueError):
    """A selected technique cannot run here; the message says what is missing and what to use instead."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise Unavailable(message)


def summary() -> dict[str, bool]:
    return {"cuda": HAS_CUDA, "flash_attn": HAS_FLASH_ATTN, "liger_kernel": HAS_LIGER, "torchao": HAS_TORCHAO,
            "fp8": has_fp8()}

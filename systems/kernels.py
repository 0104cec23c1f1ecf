"""GPU library kernels (flash-attn, Liger-Kernel) behind the reference operators' signatures. Imported lazily:
these libraries exist only on CUDA machines, and importing chuanliu must not need them."""
from __future__ import annotations

import torch

from systems import capabilities as caps


def flash_unavailable(device: str) -> str | None:
    if device != "cuda" or not caps.HAS_CUDA:
        return "flash-attn needs a CUDA GPU; use fusion.attention=sdpa"
    if not caps.HAS_FLASH_ATTN:
        return "flash-attn is not installed (pip install flash-attn --no-build-isolation); use fusion.attention=sdpa"
    return None


def liger_unavailable(device: str) -> str | None:
    if device != "cuda" or not caps.HAS_CUDA:
        return "Liger-Kernel's Triton kernels need a CUDA GPU; use compiled (torch.compile) or eager"
    if not caps.HAS_LIGER:
        return "liger-kernel is not installed (pip install liger-kernel); use compiled or eager"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal flash-attn 2 on (B, H, T, D) tensors (flash-attn itself takes (B, T, H, D); fp16/bf16 only)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # (B, T, H, D)
    return out.transpose(1, 2)


# Liger-Kernel through its functional API (liger_kernel.transformers.functional), whose keyword arguments have
# stayed stable while the autograd Functions' positional arguments and return tuples changed across releases.

def liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm as rms_norm

    # casting_mode="llama" matches the reference (fp32 rstd, scaled in the input dtype); in_place=False because
    # the norm's input also feeds the residual connection, whose gradient must not be overwritten.
    return rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)


def liger_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu as swiglu

    return swiglu(gate, up)


def liger_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # Liger wants 3-D (1, T, D) tables in the HF rotate-half layout (ours); a 2-D (T, D) table would be read as
    # batch T. It computes in the tables' dtype, so cast like the reference does.
    return liger_rotary_pos_emb(q, k, cos.to(q.dtype).unsqueeze(0), sin.to(q.dtype).unsqueeze(0))


def liger_fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                     targets: torch.Tensor) -> torch.Tensor:
    """LM head + cross-entropy in chunks with gradients computed in forward: the logits never exist whole."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce

    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    return flce(h, weight.to(h.dtype), targets.reshape(-1), reduction="mean")

"""Attention kernels, all computing causal softmax(QK^T / sqrt(D)) V on (B, H, T, D) tensors.

``eager`` is the unfused reference (materialises the T x T score matrix); ``sdpa`` is PyTorch's fused
scaled_dot_product_attention (flash / memory-efficient / math backends chosen by PyTorch).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)



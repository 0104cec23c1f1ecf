"""AdamW with Baichuan-7B's hyper-parameters and a linear warm-up + cosine decay schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, reached after warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 5  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # decoupled decay on matrices (embeddings, linears); none on norm weights
    beta1: float = 0.9
    beta2: float = 0.95  # Baichuan-7B / LLaMA
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still measured)
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA): 5x faster than foreach on a 2-core CPU

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"optim needs lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0; got lr={self.lr},"
                             f" min_lr_ratio={self.min_lr_ratio}, warmup_steps={self.warmup_steps}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused or None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warm-up, then cosine down to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio))

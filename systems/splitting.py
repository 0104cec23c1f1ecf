"""Activation splitting: compute big operators in pieces so their activations never exist whole.

    chunked_ce           LM head + loss over token chunks, each recomputed in backward: the (tokens x vocab)
                         logits exist one chunk at a time, in forward and backward.
    tiled_mlp            the SwiGLU MLP over token tiles, each recomputed in backward: only one tile's
                         (tokens x ffn) intermediates exist at a time.
    recompute_attention  selective recomputation (Korthikanti et al. 2022): softmax(QK^T)V is recomputed.
    recompute_mlp        the MLP is recomputed (its three ffn-wide activations are not saved).
    recompute_layers     full recomputation: only each decoder layer's input is saved.

Everything recomputed costs forward FLOPs again; ``recomputed()`` tells the HFU convention which. torch's
non-reentrant checkpoint stops re-running a region once the tensors backward needs exist again, so a region's last
op (down_proj of an MLP or layer, AV of an eager attention core) runs once; a fused attention core is one op.
Recomputation swaps a module's ``forward`` for a checkpointed call of the original instead of wrapping the
module, so parameter names (and checkpoints) are the same with and without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# Refused with an explicit fusion.loss=liger, passed over by fusion.loss=auto (SplittingConfig.refused_kernels).
LIGER_LOSS_UNDER_CHUNKED_CE = (
    "splitting.chunked_ce with fusion.loss=liger: Liger's fused linear-cross-entropy already never materialises the "
    "logits and computes its gradients inside its forward, so chunking it gains nothing and its checkpoints would "
    "re-run all of that work in backward; use fusion.loss=liger with splitting.chunked_ce=false, or chunked_ce with "
    "fusion.loss=eager or compiled")


@dataclass(kw_only=True)
class SplittingConfig:
    chunked_ce: bool = False  # LM head + cross-entropy over chunks of ce_chunk_tokens tokens
    ce_chunk_tokens: int = 1024  # tokens per loss chunk
    tiled_mlp: bool = False  # SwiGLU MLP over tiles of mlp_tile_tokens tokens, each recomputed in backward
    mlp_tile_tokens: int = 1024  # tokens per MLP tile
    recompute_attention: bool = False  # selective: recompute the attention core in backward
    recompute_mlp: bool = False  # recompute the MLP in backward
    recompute_layers: bool = False  # full: recompute every decoder layer in backward

    def __post_init__(self) -> None:
        if self.ce_chunk_tokens < 1 or self.mlp_tile_tokens < 1:
            raise ValueError("splitting.ce_chunk_tokens and splitting.mlp_tile_tokens must be >= 1")
        if self.recompute_layers and (self.recompute_attention or self.recompute_mlp or self.tiled_mlp):
            raise ValueError("splitting.recompute_layers already recomputes the whole layer; combining it with "
                             "recompute_attention, recompute_mlp or tiled_mlp would recompute twice: pick one")
        if self.tiled_mlp and self.recompute_mlp:
            raise ValueError("splitting.tiled_mlp already recomputes each MLP tile in backward; drop "
                             "splitting.recompute_mlp")

    def recomputed(self, kernels: dict[str, str] | None = None) -> dict[str, bool]:
        """Which forward work runs twice (for the HFU convention, analysis.flops.Recompute). ``kernels``: the
        operator implementations fusion chose; a fused attention core (sdpa, flash) re-runs whole and redoes QK^T
        in its backward, an eager one re-runs only QK^T."""
        fused_core = (kernels or {}).get("attention", "eager") != "eager"
        return {"full_layers": self.recompute_layers, "attention_core": self.recompute_attention,
                "mlp": self.recompute_mlp or self.tiled_mlp, "lm_head": self.chunked_ce,
                "attention_fused": fused_core}

    def refused_kernels(self) -> dict[str, dict[str, str]]:
        """Operator implementations this splitting cannot wrap, each with the reason, for fusion.resolve: an
        explicit choice of one is refused with its reason, ``auto`` passes over it."""
        return {"loss": {"liger": LIGER_LOSS_UNDER_CHUNKED_CE}} if self.chunked_ce else {}


def recompute(fn: Callable, *args):
    """Run fn(*args) without saving its activations; they are recomputed during backward.

    Non-reentrant checkpoint saves fn's inputs through save_for_backward before it installs its own
    saved-tensor hooks, so systems.memory.SavedTensorMeter counts what a checkpoint keeps and nothing else.
    """
    return checkpoint(fn, *args, use_reentrant=False)


def recompute_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args):
        return recompute(inner, *args)

    module.forward = forward


def checkpointed(fn: Callable) -> Callable:
    return lambda *args: recompute(fn, *args)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn applied to x (B, T, C) over tiles of ``tile_tokens`` rows of the flattened (B*T, C), each recomputed."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (B*T, C): the MLP is position-wise
        out = [recompute(fn, tile) for tile in rows.split(tile_tokens)]
        return torch.cat(out).reshape(*x.shape[:-1], -1)

    return forward


def chunked_loss(loss_fn: Callable, chunk_tokens: int) -> Callable:
    """loss_fn(hidden, weight, targets) (a mean) computed over token chunks, each recomputed in backward."""

    def summed(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(h, w, t) * t.numel()

    def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, C), (N,)
        total = sum(recompute(summed, hc, weight, tc) for hc, tc in zip(h.split(chunk_tokens),
                                                                          t.split(chunk_tokens)))
        return total / t.numel()

    return forward


def apply_splitting(model: nn.Module, cfg: SplittingConfig) -> None:
    """Apply to a model already fused (apply_fusion): it wraps whichever operator functions fusion chose."""
    if cfg.chunked_ce:
        model.loss_fn = chunked_loss(model.loss_fn, cfg.ce_chunk_tokens)
    for layer in model.model.layers:
        if cfg.recompute_attention:
            layer.self_attn.core_fn = checkpointed(layer.self_attn.core_fn)
        if cfg.recompute_mlp:
            recompute_forward(layer.mlp)
        if cfg.tiled_mlp:
            layer.mlp.forward = tiled(layer.mlp.forward, cfg.mlp_tile_tokens)
        if cfg.recompute_layers:
            recompute_forward(layer)

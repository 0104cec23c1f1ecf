"""FLOPs per token of a Baichuan/LLaMA-style decoder under named conventions.

Pure formulas (no torch): the report and the cluster predictor import this without starting a job.

Notation: L layers, h hidden size (= heads x head dim), f SwiGLU width, V vocabulary, T sequence length.
N is the number of weights that take part in a matmul, per token:

    N = L * (4 h^2 + 3 h f) + V h
        W_pack (3h^2) + o_proj (h^2) + gate/up/down (3hf) per layer, plus the LM head (Vh).
        The input embedding is a lookup, and norms are elementwise, so neither is counted.

A matmul with N weights costs 2N FLOPs per token forward and 4N backward (grad of input and of weight): 6N.
Attention scores QK^T and the weighted sum AV each cost 2*T*h per token per layer forward (T keys of width h):
4*L*h*T forward, 12*L*h*T forward+backward.

Conventions (each a separate metric key, perf/tflops/<key>, perf/mfu/<key>):
    6n      6N                          Kaplan et al. 2020: ignores attention scores.
    palm    6N + 12*L*h*T               PaLM (Chowdhery et al. 2022, App. B): the full T x T score matrix.
                                        chuanliu's default "MFU". Baichuan-7B at T=4096: 46.87 GFLOP/token.
    causal  6N + 6*L*h*T                As palm, but a causal mask needs only half the score matrix.
    hfu     palm + recomputed forward   Hardware FLOPs (Korthikanti et al. 2022): FLOPs actually executed,
                                        counting the forward work that activation recomputation repeats.
"""
from __future__ import annotations

from dataclasses import dataclass

CONVENTIONS = ("6n", "palm", "causal", "hfu")
DEFAULT_CONVENTION = "palm"


@dataclass(frozen=True, kw_only=True)
class Recompute:
    """Which forward work is executed twice (activation recomputation); none by default."""

    full_layers: bool = False  # every decoder layer's forward re-run in backward
    attention_core: bool = False  # only softmax(QK^T)V re-run (Korthikanti's selective recomputation)
    mlp: bool = False  # the SwiGLU MLP re-run (recomputation or tiled MLP)
    lm_head: bool = False  # the LM head re-run (chunked cross-entropy recomputes each chunk's logits)


def matmul_params(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int) -> int:
    """N: weights that take part in a matmul (decoder layers + LM head; not the input embedding)."""
    return n_layers * (4 * dim * dim + 3 * dim * ffn_dim) + vocab_size * dim


def total_params(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int) -> int:
    """All parameters: N plus the input embedding and the RMSNorm weights (2 per layer + final)."""
    n = matmul_params(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, vocab_size=vocab_size)
    return n + vocab_size * dim + (2 * n_layers + 1) * dim


def flops_per_token(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int, seq_len: int,
                    recompute: Recompute = Recompute()) -> dict[str, float]:
    """FLOPs per trained token (forward + backward) under every convention in CONVENTIONS."""
    n = matmul_params(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, vocab_size=vocab_size)
    attn_fwd = 4 * n_layers * dim * seq_len  # QK^T and AV, full T x T, forward only
    palm = 6 * n + 3 * attn_fwd
    if recompute.full_layers:
        extra = 2 * (n - vocab_size * dim) + attn_fwd  # the LM head is outside the layers
    else:
        extra = (attn_fwd if recompute.attention_core else 0) + \
                (2 * n_layers * 3 * dim * ffn_dim if recompute.mlp else 0)
    extra += 2 * vocab_size * dim if recompute.lm_head else 0
    return {"6n": float(6 * n), "palm": float(palm), "causal": float(6 * n + 1.5 * attn_fwd),
            "hfu": float(palm + extra)}

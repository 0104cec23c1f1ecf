"""FLOPs per token of a Baichuan/LLaMA-style decoder under named conventions.

Pure formulas (no torch): the report and the cluster predictor import this without starting a job.

Notation: L layers, h hidden size (= heads x head dim), f MLP width, V vocabulary, T sequence length, kv the
key/value width (h, or h x n_kv_heads / n_heads with grouped-query attention), m the MLP's matrices (3 for SwiGLU:
gate, up, down; 2 for a GELU MLP). N is the number of weights that take part in a matmul, per token:

    N = L * (h * (h + 2 kv) + h^2 + m h f) + V h
        W_pack/qkv (h(h + 2kv)) + o_proj (h^2) + the MLP (m h f) per layer, plus the LM head (Vh). The input
        embedding is a lookup and norms are elementwise, so neither is counted; a tied LM head is still a matmul.

A matmul with N weights costs 2N FLOPs per token forward and 4N backward (grad of input and of weight): 6N.
Attention scores QK^T and the weighted sum AV each cost 2*T*h per token per layer forward (T keys of width h;
grouped-query attention shares keys, not the work): 4*L*h*T forward, 12*L*h*T forward+backward.

Conventions (each a separate metric key, perf/tflops/<key>, perf/mfu/<key>):
    6n      6N                          6 x every matmul weight, the LM head included, the input embedding not.
                                        Neither Kaplan et al.'s non-embedding 6N (which leaves the LM head out
                                        too) nor 6 x all parameters. Ignores attention scores.
    palm    6N + 12*L*h*T               PaLM (Chowdhery et al. 2022, App. B): the full T x T score matrix.
                                        chuanliu's default "MFU". Baichuan-7B at T=4096: 46.87 GFLOP/token.
    causal  6N + 6*L*h*T                As palm, but a causal mask needs only half the score matrix.
    hfu     palm + what runs again      Hardware FLOPs (Korthikanti et al. 2022): the forward work activation
                                        recomputation repeats, as torch's non-reentrant checkpoint repeats it,
                                        and the QK^T a fused attention kernel recomputes in its backward
                                        (``Recompute``). Counted the way torch's FlopCounterMode counts.
"""
from __future__ import annotations

from dataclasses import dataclass

CONVENTIONS = ("6n", "palm", "causal", "hfu")
DEFAULT_CONVENTION = "palm"


@dataclass(frozen=True, kw_only=True)
class Recompute:
    """Which forward work is executed twice; none by default (eager attention, no recomputation).

    torch's non-reentrant checkpoint re-runs a region's forward in backward only until every tensor backward
    needs is rebuilt, so the region's last op never runs twice: the output of down_proj (last op of a recomputed
    MLP or decoder layer) and of AV (last op of an eager attention core) are not saved for backward. A fused
    attention core (SDPA's flash / memory-efficient kernels, flash-attn) is one op, so it re-runs whole; its
    backward also recomputes QK^T from the saved log-sum-exp (5 matmuls to eager's 4), recomputation or not.
    Measured with FlopCounterMode in tests/unit/test_flops.py for every splitting option, eager and SDPA.
    """

    full_layers: bool = False  # every decoder layer re-run except its down_proj (attention whole: o_proj needs AV)
    attention_core: bool = False  # selective: the attention core re-run (QK^T only when eager, see below)
    mlp: bool = False  # the MLP's input projections (gate/up) re-run, not down_proj (recompute_mlp or tiled_mlp)
    lm_head: bool = False  # the LM head re-run (chunked cross-entropy recomputes each chunk's logits)
    attention_fused: bool = False  # the core is one op (SDPA, flash): it re-runs whole; its backward redoes QK^T


def matmul_params(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int, n_heads: int | None = None,
                  n_kv_heads: int | None = None, mlp_matrices: int = 3) -> int:
    """N: weights that take part in a matmul (decoder layers + LM head; not the input embedding)."""
    kv = dim if not (n_heads and n_kv_heads) else dim * n_kv_heads // n_heads
    return n_layers * (dim * (dim + 2 * kv) + dim * dim + mlp_matrices * dim * ffn_dim) + vocab_size * dim


def total_params(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int, n_heads: int | None = None,
                 n_kv_heads: int | None = None, mlp_matrices: int = 3, tied_embeddings: bool = False) -> int:
    """All parameters of chuanliu's model: N plus the input embedding (unless the LM head shares it) and the
    RMSNorm weights (2 per layer + final)."""
    n = matmul_params(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, vocab_size=vocab_size, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, mlp_matrices=mlp_matrices)
    return n + (0 if tied_embeddings else vocab_size * dim) + (2 * n_layers + 1) * dim


def flops_per_token(*, n_layers: int, dim: int, ffn_dim: int, vocab_size: int, seq_len: int,
                    recompute: Recompute = Recompute(), n_heads: int | None = None, n_kv_heads: int | None = None,
                    mlp_matrices: int = 3, tied_embeddings: bool = False) -> dict[str, float]:
    """FLOPs per trained token (forward + backward) under every convention in CONVENTIONS.

    ``tied_embeddings`` changes no convention: a tied LM head is still a (V x h) matmul, forward and backward;
    it is accepted so callers can pass a whole shape (it changes total_params)."""
    n = matmul_params(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, vocab_size=vocab_size, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, mlp_matrices=mlp_matrices)
    head = vocab_size * dim
    down = n_layers * ffn_dim * dim  # weights of every layer's down_proj: the last op of a recomputed MLP
    mlp_in = n_layers * (mlp_matrices - 1) * dim * ffn_dim
    qk = 2 * n_layers * dim * seq_len  # QK^T forward per token; AV costs the same
    palm = 6 * n + 6 * qk
    fused = recompute.attention_fused
    if recompute.full_layers:
        extra = 2 * (n - head - down) + 2 * qk  # the core re-runs whole either way: o_proj saves AV's output
    else:
        core = (2 * qk if fused else qk) if recompute.attention_core else 0
        extra = core + (2 * mlp_in if recompute.mlp else 0)
    extra += (2 * head if recompute.lm_head else 0) + (qk if fused else 0)  # a fused backward redoes QK^T
    return {"6n": float(6 * n), "palm": float(palm), "causal": float(6 * n + 3 * qk), "hfu": float(palm + extra)}

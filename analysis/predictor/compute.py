"""Compute time of one micro-batch: what really limits a training step on a GPU.

Start at ``micro_batch_terms``. Per operator class:

    GEMMs       every matmul of the forward, and the two of its backward (grad of input, grad of weight), at a
                rate that depends on the shape: ``gemm_s`` schedules output tiles in waves over the SMs
                (tile and wave quantisation, split-K when the output is small) and slows short contractions
                (k / (k + k0)); the best rate ``gemm`` and k0 are fitted per GPU type. A 768-wide model's
                GEMMs run well below an 8192-wide model's.
    attention   FlashAttention: causal FLOPs at a rate that grows with the sequence and the head dim,
                T / (T + 512) x d / (d + 36) (the shape of FlashAttention-2's published fwd+bwd curves on A100),
                scaled by a fitted ``attn`` per GPU type; backward = 2.5 forwards. Eager attention: batched
                GEMMs plus the T x T scores streamed through HBM.
    memory      norms, RoPE, SwiGLU/GELU, residuals, layout copies, the loss and the embedding: bytes moved /
                (HBM bandwidth x ``hbm``), counted per kernel of the implementation chosen (eager or fused).
    overhead    kernel launches and framework work per decoder layer and micro-batch (fitted).

Recomputation re-runs forward work as torch's non-reentrant checkpoint does (analysis/flops.py: the last op of a
checkpointed region is not re-run), or the whole layer (``Techniques.recompute_last_op``: Megatron-LM's own
checkpoint). Times are per micro-batch; the optimizer is per step (``optimizer_s``).

Tensor parallelism (``tp``, Shoeybi et al. 2019) gives each rank a column slice of QKV and the MLP's input
projection, a row slice of o_proj and the down projection, 1/tp of the heads and of the (padded) vocabulary; norms,
residuals and dropout stay whole on every rank unless ``sp`` (sequence parallelism, Korthikanti et al. 2022) splits
them along the sequence. The collectives this needs are tensor.py's; with tp = 1 every number here is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.predictor.inputs import FUSED_ATTENTION, GB, GPU, ModelShape, Techniques

# Output tiles cuBLAS/CUTLASS choose among for large bf16 GEMMs: (rows, cols, rate relative to the largest tile).
TILES = ((256, 128, 1.0), (128, 128, 0.92), (128, 64, 0.8), (64, 64, 0.6))
SPLIT_K = (1, 2, 4)  # split-K factors when the output has too few tiles to fill the SMs
ATTN_T0, ATTN_D0 = 512.0, 36.0  # FlashAttention-2 rate ~ T/(T+512) x d/(d+36) (Dao 2023, fwd+bwd, causal)


@dataclass(frozen=True, kw_only=True)
class Efficiencies:
    """The constants of one GPU type. Fitted on the calibration half of the data set (calibration.py)."""

    gemm: float = 0.80  # best-shape dense GEMM rate / datasheet peak
    gemm_k0: float = 128.0  # a GEMM with contraction length k runs at k / (k + k0) of its tile-limited rate
    attn: float = 0.60  # FlashAttention fwd+bwd rate / bf16 peak in the limit of long sequences, large heads
    hbm: float = 0.80  # achieved / nominal HBM bandwidth of streaming kernels
    layer_overhead_s: float = 1e-4  # launches and framework per decoder layer, per micro-batch forward+backward
    overlap_slowdown: float = 0.10  # compute slows by this fraction of the communication time it overlaps
    fp8_gemm: float = 0.60  # fp8 GEMM rate / fp8 peak, casts and scaling included
    triton_attn: float = 0.70  # MPT's Triton flash-attention kernel's rate / FlashAttention-2's
    step_overhead_s: float = 0.0  # fixed cost per step (a CPU calibration fits it; 0 on GPUs)


def tile_efficiency(m: int, n: int, k: int, sms: int) -> float:
    """Fraction of the best rate a (m x k) @ (k x n) GEMM reaches from tile fill and wave quantisation."""
    best = 0.0
    for bm, bn, rate in TILES:
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        fill = m * n / (tiles * bm * bn)
        for split in SPLIT_K:
            if split > 1 and k / split < 1024:
                break
            t = tiles * split
            waves = math.ceil(t / sms)
            best = max(best, rate * fill * t / (waves * sms) * (0.95 if split > 1 else 1.0))
    return best


def gemm_s(m: int, n: int, k: int, *, gpu: GPU, eff: Efficiencies, dtype: str, batch: int = 1,
           elem_bytes: int = 2) -> float:
    """Seconds for ``batch`` GEMMs of (m x k) @ (k x n): the slower of the FLOP and the memory roofline."""
    if dtype == "fp8":
        rate = gpu.peak_flops("fp8") * eff.fp8_gemm
        elem_bytes = 1
    else:
        rate = gpu.peak_flops(dtype) * eff.gemm
    tiles_m = m * batch if batch > 1 else m  # batched GEMMs fill the SMs together
    e = tile_efficiency(tiles_m, n, k, gpu.sms) * k / (k + eff.gemm_k0)
    flop_s = 2.0 * m * n * k * batch / (rate * e)
    mem_s = (m * k + k * n + m * n) * batch * elem_bytes / (gpu.hbm_gbps * GB * eff.hbm)
    return max(flop_s, mem_s)


def linear_s(tokens: int, fan_in: int, fan_out: int, *, gpu: GPU, eff: Efficiencies, dtype: str
             ) -> tuple[float, float]:
    """(forward, backward) seconds of one linear layer over ``tokens`` rows: Y = X W, dX = dY W^T, dW = X^T dY."""
    fwd = gemm_s(tokens, fan_out, fan_in, gpu=gpu, eff=eff, dtype=dtype)
    dx = gemm_s(tokens, fan_in, fan_out, gpu=gpu, eff=eff, dtype=dtype)
    dw = gemm_s(fan_in, fan_out, tokens, gpu=gpu, eff=eff, dtype=dtype)
    return fwd, dx + dw


def flash_attention_s(m: ModelShape, seq: int, mb: int, *, gpu: GPU, eff: Efficiencies, triton: bool = False,
                      tp: int = 1) -> float:
    """Forward seconds of causal FlashAttention for one layer (half the T x T work; GQA does not change it), on
    one of ``tp`` ranks (1/tp of the heads)."""
    flops = 2.0 * mb * seq * seq * (m.dim // tp)  # QK^T and AV, 2*T*T*h each, causal half
    rate = gpu.peak_flops("bf16") * eff.attn * seq / (seq + ATTN_T0) * m.head_dim / (m.head_dim + ATTN_D0)
    return flops / (rate * (eff.triton_attn if triton else 1.0))


def sharded_linears(m: ModelShape, tp: int = 1) -> list[tuple[str, int, int]]:
    """One decoder layer's matmuls on one of ``tp`` tensor-parallel ranks (Megatron-LM, Shoeybi et al. 2019):
    QKV and the MLP's input projection split by output features (column-parallel), o_proj and the down projection
    by input features (row-parallel, followed by the all-reduce or reduce-scatter of tensor.py)."""
    if tp == 1:
        return m.linears()
    return [(n, i // tp, o) if n in ("o_proj", "down") else (n, i, o // tp) for n, i, o in m.linears()]


def padded_vocab(m: ModelShape, tp: int = 1) -> int:
    """Vocabulary rows per tensor-parallel rank (Megatron pads the vocabulary to a multiple of tp)."""
    return -(-m.vocab_size // tp)


def _elementwise_bytes_per_token(m: ModelShape, t: Techniques, tp: int = 1, sp: bool = False) -> float:
    """Bytes one decoder layer's memory-bound kernels move per token, forward (backward moves about twice).

    Counted per kernel: eager RMSNorm upcasts to fp32 and runs pow, mean, rsqrt, two muls and a downcast
    (reads and writes ~28 + 4b bytes per element, b = activation bytes); a fused norm reads and writes once.
    Eager RoPE on q and k: ~10 passes (mul, rotate-half copies, negation, mul, add). SwiGLU eager: silu (r+w) and
    mul (2r+w) = 5 passes of the ffn width; fused 3; GELU one kernel (2). Residual adds 3 passes each, and the
    head-layout copies of q, k, v and the attention output.

    On one of ``tp`` ranks: what follows the column-parallel projections (RoPE, the activation, the layout copies)
    is 1/tp; norms and residuals are whole on every rank unless sequence-parallel (``sp``)."""
    h, f, kv, b = m.dim, m.ffn_dim // tp, m.kv_dim // tp, t.act_bytes
    hs = h // tp if sp else h  # norms and residuals
    hq = h // tp  # the query heads of this rank
    norms = 2 * ((2 * b) if t.fused_norm else (28 + 4 * b)) * hs
    rope_b = 0.0 if (t.fused_rope or m.position != "rope") else 10 * b * (hq + kv)
    act = (3 if t.fused_act else 5) * f * b if m.mlp == "swiglu" else 2 * f * b
    residual = 2 * 3 * hs * b
    layout = 4 * (hq + kv) * b
    return norms + rope_b + act + residual + layout


# Bytes per logit element: eager CE upcasts bf16 logits to fp32 (log_softmax, nll, their backward, the
# downcast: ~30 B); one fused CE kernel (compiled, or flash-attn's xentropy) reads the logits and writes their gradient (~12 B); a fused
# linear-cross-entropy (Liger, chunked in SRAM) touches each logit chunk about four times in bf16 (~8 B).
LOSS_BYTES = {"eager": 30.0, "kernel": 12.0, "fused": 8.0}


def score_bytes(t: Techniques) -> tuple[float, float]:
    """(forward, backward) bytes per element of the T x T score matrix when attention is not one fused kernel.

    eager: scale, mask, upcast, softmax, downcast (~16 + 8b B) and their backward (~22 + 8b B).
    fused_softmax (Megatron-LM): one scale-mask-softmax kernel reads the scores and writes the probabilities
    (2b), attention dropout reads them and writes its output and a 1-byte mask (2b + 1); backward: dropout
    reads the gradient and the mask and writes (2b + 1), the softmax reads the probabilities and the gradient
    and writes (3b). At b = 2: 9 B forward, 11 B backward."""
    b = t.act_bytes
    if t.attention == "fused_softmax":
        return 4.0 * b + 1, 5.0 * b + 1
    return 16 + 8 * b, 22 + 8 * b


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    """Seconds of one micro-batch, by operator class, and the forward/backward split overlap needs."""

    gemm_s: float
    attention_s: float
    scores_s: float
    elementwise_s: float
    loss_s: float
    overhead_s: float
    forward_s: float  # the forward pass (communication can hide behind it: ZeRO-3's all-gathers)
    backward_s: float  # backward incl. recomputation (gradient buckets hide behind it)
    layer_forward_s: float  # one decoder layer's forward (ZeRO-3's prefetch window per unit)
    layer_backward_s: float
    layer_weight_grad_s: float = 0.0  # the weight-gradient GEMMs (dW) inside layer_backward_s (zero-bubble's W)
    head_forward_s: float = 0.0  # LM head and loss: what the last pipeline stage adds (inside forward_s)
    head_backward_s: float = 0.0
    embed_forward_s: float = 0.0  # the input embedding: what the first pipeline stage adds
    embed_backward_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def micro_batch_terms(m: ModelShape, gpu: GPU, t: Techniques, eff: Efficiencies, seq: int, mb: int,
                      tp: int = 1, sp: bool = False) -> MicroBatch:
    """One micro-batch through the whole model on one GPU, or on one of ``tp`` tensor-parallel ranks (``sp``:
    sequence-parallel norms and residuals); the layer, head and embedding parts for pipeline stages."""
    tokens, L, b = seq * mb, m.n_layers, t.act_bytes
    hbm = gpu.hbm_gbps * GB * eff.hbm
    dtype = t.gemm_dtype
    head_dtype = "bf16" if dtype == "fp8" else dtype  # fp8 recipes keep the LM head in bf16
    # --- GEMMs of one layer, and what recomputation re-runs (not the region's last op: analysis/flops.py)
    lin = {name: linear_s(tokens, i, o, gpu=gpu, eff=eff, dtype=dtype) for name, i, o in sharded_linears(m, tp)}
    layer_fwd_gemm = sum(f for f, _ in lin.values())
    layer_bwd_gemm = sum(bw for _, bw in lin.values())
    mlp_in = lin["gate_up"][0] if "gate_up" in lin else lin["up"][0]
    regemm = 0.0
    if t.recompute == "full":
        last = 0.0 if t.recompute_last_op else lin["down"][0]  # torch's non-reentrant checkpoint skips it
        regemm += layer_fwd_gemm - last
    elif t.recompute_mlp:
        regemm += mlp_in
    # --- attention core
    heads, d = m.n_heads // tp, m.head_dim
    if t.attention in FUSED_ATTENTION:
        fwd_attn = flash_attention_s(m, seq, mb, gpu=gpu, eff=eff, triton=t.attention == "triton", tp=tp)
        re_attn = fwd_attn if t.recompute in ("selective", "full") else 0.0  # one fused op: re-run whole
        attn_fwd, attn_bwd, scores_fwd, scores_bwd = fwd_attn, 2.5 * fwd_attn + re_attn, 0.0, 0.0
    else:
        act_dtype = "fp32" if b == 4 else "bf16"
        qk = gemm_s(seq, seq, d, gpu=gpu, eff=eff, dtype=act_dtype, batch=mb * heads, elem_bytes=b)
        av = gemm_s(seq, d, seq, gpu=gpu, eff=eff, dtype=act_dtype, batch=mb * heads, elem_bytes=b)
        re = {"selective": qk, "full": qk + av}.get(t.recompute, 0.0)
        scores = mb * heads * seq * seq  # elements of the T x T matrix
        sb_fwd, sb_bwd = score_bytes(t)  # eager: ~32 B/element forward at b=2, ~38 backward
        s_fwd, s_bwd = scores * sb_fwd / hbm, scores * sb_bwd / hbm
        attn_fwd, attn_bwd = qk + av, 2 * (qk + av) + re
        scores_fwd, scores_bwd = s_fwd, s_bwd + (s_fwd if t.recompute in ("selective", "full") else 0.0)
    # --- memory-bound kernels
    ew = _elementwise_bytes_per_token(m, t, tp, sp) * tokens / hbm
    ew_re = ew if t.recompute == "full" else (
        ((3 if t.fused_act else 5) * (m.ffn_dim // tp) * b * tokens / hbm) if t.recompute_mlp and m.mlp == "swiglu"
        else 0.0)
    overhead = eff.layer_overhead_s * (1.0 + (t.recompute != "none" or t.recompute_mlp) / 3.0)
    layer_fwd = layer_fwd_gemm + attn_fwd + scores_fwd + ew + overhead / 3
    layer_bwd = layer_bwd_gemm + regemm + attn_bwd + scores_bwd + 2 * ew + ew_re + overhead * 2 / 3
    # --- LM head, loss, embedding (outside the layers)
    vocab = padded_vocab(m, tp)  # vocabulary-parallel LM head and cross-entropy
    head_f, head_b = linear_s(tokens, m.dim, vocab, gpu=gpu, eff=eff, dtype=head_dtype)
    if t.chunked_ce and t.loss != "fused":
        head_b += head_f  # each chunk's logits are recomputed in backward
    loss = LOSS_BYTES[t.loss] * tokens * vocab / hbm
    embed = 20.0 * tokens * m.dim / hbm  # gather forward, scatter-add into an fp32 gradient backward
    forward = L * layer_fwd + head_f + loss / 3 + embed / 3
    backward = L * layer_bwd + head_b + loss * 2 / 3 + embed * 2 / 3
    return MicroBatch(gemm_s=L * (layer_fwd_gemm + layer_bwd_gemm + regemm) + head_f + head_b,
                      attention_s=L * (attn_fwd + attn_bwd), scores_s=L * (scores_fwd + scores_bwd),
                      elementwise_s=L * (3 * ew + ew_re) + embed, loss_s=loss, overhead_s=L * overhead,
                      forward_s=forward, backward_s=backward, layer_forward_s=layer_fwd, layer_backward_s=layer_bwd,
                      layer_weight_grad_s=sum(gemm_s(i, o, tokens, gpu=gpu, eff=eff, dtype=dtype)
                                              for _, i, o in sharded_linears(m, tp)),
                      head_forward_s=head_f + loss / 3, head_backward_s=head_b + loss * 2 / 3,
                      embed_forward_s=embed / 3, embed_backward_s=embed * 2 / 3)


def optimizer_s(m: ModelShape, gpu: GPU, t: Techniques, eff: Efficiencies, dp: int) -> float:
    """AdamW over this GPU's shard: fp32 master p, g, m, v read (16 B), p, m, v written (12 B), the 16-bit copy
    written (2 B), and the gradient norm for clipping read once more (4 B)."""
    shard = m.total_params() / (dp if t.zero_stage >= 1 else 1)
    return 34.0 * shard / (gpu.hbm_gbps * GB * eff.hbm)

"""Memory per GPU: activations (Korthikanti et al. 2022) and mixed-precision Adam states sharded by ZeRO stage;
for tensor/pipeline layouts, the states of one stage's TP shard and the micro-batches its schedule holds."""
from __future__ import annotations

from analysis.predictor.inputs import FUSED_ATTENTION, ModelShape, Techniques


def korthikanti_activation_bytes(*, seq: int, micro_batch: int, dim: int, heads: int,
                                 recompute: str = "none", flash_attn: bool = False, tp: int = 1,
                                 sp: bool = False) -> float:
    """Activation bytes per layer on one of ``tp`` ranks, 16-bit (Korthikanti et al. 2022, eqs. 1-2, Table 2).

    none: s*b*h*(34 + 5*a*s/h); the 5as^2b term is the attention scores, softmax and its dropout mask, which
    selective recomputation (and flash attention, which never stores them) drop: 34*s*b*h. Full recomputation
    keeps only each layer's input: 2*s*b*h. Tensor parallelism splits 24 of the 34 and the scores:
    sbh(10 + 24/t + 5as/(ht)); the 10 (norm inputs, dropout masks and outputs) stay whole on every rank unless
    sequence parallelism splits them too: sbh/t (34 + 5as/h). Full recomputation: 2sbh, or 2sbh/t with sp.
    """
    sbh = seq * micro_batch * dim
    if recompute == "full":
        return 2.0 * sbh / (tp if sp else 1)
    scores = 0.0 if (recompute == "selective" or flash_attn) else 5.0 * heads * seq * seq * micro_batch / tp
    layer = 34.0 * sbh / tp if sp else (10.0 + 24.0 / tp) * sbh  # tp = 1: 34 sbh either way
    return layer + scores


def model_state_bytes(params: int, precision: str, zero_stage: int, dp: int) -> float:
    """Mixed-precision Adam: 2 (16-bit weights) + 2 (grads) + 12 (fp32 master, m, v) bytes per parameter
    (ZeRO paper, Rajbhandari et al. 2020); fp32 training: 4 + 4 + 8. ZeRO-1/2/3 shard the states over dp."""
    w, g, o = (4, 4, 8) if precision in ("fp32", "tf32") else (2, 2, 12)
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    return params * (w + g + o)


def peak_memory_bytes(m: ModelShape, t: Techniques, seq: int, micro_batch: int, dp: int) -> float:
    scale = t.act_bytes / 2  # the formulas are for 16-bit activations
    acts = m.n_layers * korthikanti_activation_bytes(seq=seq, micro_batch=micro_batch, dim=m.dim, heads=m.n_heads,
                                                     recompute=t.recompute,
                                                     flash_attn=t.attention in FUSED_ATTENTION)
    # fp32 logits and their gradient, unless chunked / fused cross-entropy keeps one chunk alive
    logits = 0.0 if (t.chunked_ce or t.loss == "fused") else 2 * 4.0 * seq * micro_batch * m.vocab_size
    return model_state_bytes(m.total_params(), t.precision, t.zero_stage, dp) + scale * acts + logits


def stage_memory_bytes(m: ModelShape, t: Techniques, seq: int, micro_batch: int, *, params: int, layers: int,
                       in_flight: float, tp: int, sp: bool, dp: int, logits: bool) -> float:
    """One GPU of a tensor/pipeline layout: its ``params`` (this stage's TP shard) with mixed-precision Adam
    (ZeRO-1, Megatron's distributed optimizer, shards the optimizer states over dp), the activations of
    ``layers`` layers for ``in_flight`` micro-batches (the schedule's count; Korthikanti et al. 2022 §4.2.3), and
    on the stage that holds the LM head the fp32 logits of one micro-batch and their gradient (vocabulary-parallel:
    1/tp), unless chunked / fused cross-entropy keeps one chunk alive."""
    scale = t.act_bytes / 2
    per_layer = korthikanti_activation_bytes(seq=seq, micro_batch=micro_batch, dim=m.dim, heads=m.n_heads,
                                             recompute=t.recompute, flash_attn=t.attention in FUSED_ATTENTION,
                                             tp=tp, sp=sp)
    head = 2 * 4.0 * seq * micro_batch * -(-m.vocab_size // tp) if logits and not (t.chunked_ce or t.loss == "fused") \
        else 0.0
    return model_state_bytes(params, t.precision, t.zero_stage, dp) + scale * layers * per_layer * in_flight + head

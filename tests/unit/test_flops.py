"""Analytic FLOPs against torch's FlopCounterMode and against the published Baichuan-7B figures.

What each side counts: FlopCounterMode counts the FLOPs of matmul ops it sees dispatched (mm, addmm, bmm, and the
CUDA SDPA kernels), 2 per multiply-add, forward and backward. The analytic formulas count the same matmuls (linear
layers incl. the LM head: 6N; attention scores and weighted sum over the full T x T matrix: 12 L h T per token).
Neither counts norms, softmax, rotary, SiLU, the loss or the embedding lookup/scatter. On CPU the fused SDPA kernel
(_scaled_dot_product_flash_attention_for_cpu) is not in FlopCounterMode's table, so the comparisons use eager
attention, whose QK^T and AV are plain bmm calls, and the recomputation test also counts SDPA by giving the CPU
kernel the formulas torch uses for its CUDA flash kernel (backward: 5 matmuls, QK^T recomputed).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from analysis.flops import Recompute, flops_per_token, matmul_params, total_params
from systems.model import ModelConfig, build_model

SHAPE = dict(n_layers=2, dim=128, n_heads=4, ffn_dim=344, vocab_size=1000)
B, T = 2, 64


def _counted() -> FlopCounterMode:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPE, max_seq_len=T))  # the reference: eager attention
    idx = torch.randint(0, SHAPE["vocab_size"], (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    return counter


def _analytic() -> dict[str, float]:
    shape = {k: v for k, v in SHAPE.items() if k != "n_heads"}
    return {k: v * B * T for k, v in flops_per_token(**shape, seq_len=T).items()}


def test_palm_convention_agrees_with_flop_counter_within_2_percent():
    counted = _counted().get_total_flops()
    assert counted == pytest.approx(_analytic()["palm"], rel=0.02)


def test_6n_is_the_linear_layers_alone():
    counts = _counted().get_flop_counts()["Global"]
    linear = counts[torch.ops.aten.mm]  # every nn.Linear forward and backward
    assert linear == pytest.approx(_analytic()["6n"], rel=0.02)
    attention = counts[torch.ops.aten.bmm]  # QK^T and AV, forward and backward
    assert attention == pytest.approx(_analytic()["palm"] - _analytic()["6n"], rel=0.02)


def test_baichuan_7b_published_figures():
    f = flops_per_token(n_layers=32, dim=4096, ffn_dim=11008, vocab_size=64000, seq_len=4096)
    assert f["palm"] / 1e9 == pytest.approx(46.9, abs=0.05)
    assert 182e12 / f["palm"] == pytest.approx(3880, rel=0.002)  # tokens/s/GPU behind 182 TFLOPS
    assert f["6n"] < f["causal"] < f["palm"] == f["hfu"]  # no recomputation: hardware = model FLOPs
    # N excludes the input embedding (a lookup) and norms; it includes the LM head (a matmul).
    assert matmul_params(n_layers=32, dim=4096, ffn_dim=11008, vocab_size=64000) == 6_738_149_376


def test_hfu_counts_recomputed_forward_work():
    shape = dict(n_layers=4, dim=256, ffn_dim=688, vocab_size=5000, seq_len=512)
    base = flops_per_token(**shape)
    qk = 2 * 4 * 256 * 512  # QK^T forward per token; AV the same
    gate_up, down = 2 * 4 * 2 * 256 * 688, 2 * 4 * 256 * 688
    layer = 2 * 4 * (4 * 256**2 + 3 * 256 * 688)
    assert flops_per_token(**shape, recompute=Recompute(attention_core=True))["hfu"] == base["palm"] + qk
    assert flops_per_token(**shape, recompute=Recompute(attention_fused=True))["hfu"] == \
        base["palm"] + qk  # a fused kernel's backward recomputes QK^T, recomputation or not
    assert flops_per_token(**shape, recompute=Recompute(attention_core=True, attention_fused=True))["hfu"] == \
        base["palm"] + 3 * qk  # one fused op: QK^T and AV re-run, and the backward's QK^T
    assert flops_per_token(**shape, recompute=Recompute(mlp=True))["hfu"] == base["palm"] + gate_up
    full = flops_per_token(**shape, recompute=Recompute(full_layers=True))
    assert full["hfu"] == base["palm"] + layer - down + 2 * qk
    assert full["palm"] == base["palm"]  # model FLOPs do not change with recomputation


def test_grouped_query_attention_and_gelu_mlp_shapes():
    llama70 = flops_per_token(n_layers=80, dim=8192, ffn_dim=28672, vocab_size=32000, seq_len=4096, n_heads=64,
                              n_kv_heads=8)
    # Llama 2 70B: 68.98B parameters of which 0.26B input embedding and ~1.3M norms: N = 68.72B
    assert llama70["6n"] / 6 == pytest.approx(68.72e9, rel=0.002)
    mpt = matmul_params(n_layers=32, dim=4096, ffn_dim=16384, vocab_size=50432, mlp_matrices=2)
    assert mpt == 32 * 12 * 4096**2 + 50432 * 4096  # a GELU MLP of 4h: 12 h^2 per layer
    mpt7b = {"n_layers": 32, "dim": 4096, "ffn_dim": 16384, "vocab_size": 50432, "mlp_matrices": 2}
    # A tied LM head is still a matmul: FLOPs unchanged, the parameter count loses one V x h matrix.
    assert flops_per_token(**mpt7b, seq_len=2048, tied_embeddings=True) == flops_per_token(**mpt7b, seq_len=2048)
    assert total_params(**mpt7b) - total_params(**mpt7b, tied_embeddings=True) == 50432 * 4096


# Every splitting option, on a shape no other test uses; chunks and tiles that do not divide the tokens evenly.
HFU_SHAPE = dict(n_layers=3, dim=96, n_heads=6, ffn_dim=260, vocab_size=777)
HFU_B, HFU_T = 3, 48
SPLITTINGS = {
    "none": {}, "chunked_ce": {"chunked_ce": True, "ce_chunk_tokens": 50},
    "tiled_mlp": {"tiled_mlp": True, "mlp_tile_tokens": 50}, "recompute_attention": {"recompute_attention": True},
    "recompute_mlp": {"recompute_mlp": True}, "recompute_layers": {"recompute_layers": True},
    "all (conf/splitting/all.yaml)": {"chunked_ce": True, "ce_chunk_tokens": 50, "tiled_mlp": True,
                                      "mlp_tile_tokens": 50, "recompute_attention": True},
    "recompute_layers + chunked_ce": {"recompute_layers": True, "chunked_ce": True, "ce_chunk_tokens": 50},
    "recompute_attention + recompute_mlp": {"recompute_attention": True, "recompute_mlp": True},
}


def _cpu_flash_as_cuda_flash(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward_as_cuda_flash(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch counts its CUDA flash / memory-efficient kernels (forward 2 matmuls, backward 5: QK^T is recomputed from
# the log-sum-exp); the CPU flash kernel works the same way and gets the same formulas.
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_as_cuda_flash,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                      _cpu_flash_backward_as_cuda_flash}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(SPLITTINGS))
def test_hfu_equals_what_torch_executes_for_every_splitting_option(name, attention):
    """FlopCounterMode counts what runs, recomputation included: eager attention's QK^T and AV are bmm; SDPA is
    pinned to its fused CPU kernel (one op) so the math fallback, which runs like eager, cannot be picked."""
    from systems.fusion import FusionConfig, apply_fusion
    from systems.splitting import SplittingConfig, apply_splitting

    split = SplittingConfig(**SPLITTINGS[name])
    torch.manual_seed(0)
    model = build_model(ModelConfig(**HFU_SHAPE, max_seq_len=HFU_T))
    kernels = apply_fusion(model, FusionConfig(attention=attention), device="cpu", compute_dtype="fp32",
                           refused=split.refused_kernels())
    apply_splitting(model, split)
    idx = torch.randint(0, HFU_SHAPE["vocab_size"], (HFU_B, HFU_T))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as c:
        model(idx, idx).backward()
    shape = {k: v for k, v in HFU_SHAPE.items() if k != "n_heads"}
    analytic = flops_per_token(**shape, seq_len=HFU_T, recompute=Recompute(**split.recomputed(kernels)))
    tokens = HFU_B * HFU_T
    # Exact in fact (both sides count the same matmuls); 1% would hide a missing QK^T at this small T.
    assert c.get_total_flops() == pytest.approx(analytic["hfu"] * tokens, rel=1e-6)
    assert analytic["palm"] == flops_per_token(**shape, seq_len=HFU_T)["palm"]  # model FLOPs: unchanged


def test_liger_loss_under_chunked_ce_is_refused_and_auto_passes_over_it(monkeypatch):
    # Resolution only: nothing is built, so Liger need not be installed; pretend it is available for auto.
    from systems.fusion import IMPLEMENTATIONS, FusionConfig, resolve
    from systems.splitting import SplittingConfig

    chunked = SplittingConfig(chunked_ce=True).refused_kernels()
    with pytest.raises(ValueError, match="chunked_ce with fusion.loss=liger.*use fusion.loss=liger with"):
        resolve(FusionConfig(loss="liger"), "cuda", "bf16", refused=chunked)
    assert resolve(FusionConfig(loss="eager"), "cpu", "fp32", refused=chunked)["loss"] == "eager"
    monkeypatch.setitem(IMPLEMENTATIONS["loss"], "liger", (IMPLEMENTATIONS["loss"]["liger"][0], lambda device: None))
    assert resolve(FusionConfig(loss="auto"), "cpu", "fp32")["loss"] == "liger"
    assert resolve(FusionConfig(loss="auto"), "cpu", "fp32", refused=chunked)["loss"] == "compiled"
    assert SplittingConfig(chunked_ce=False).refused_kernels() == {}

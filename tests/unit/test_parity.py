"""Parity: every fusion, splitting and precision variant computes the eager fp32 reference's function.

Each test builds the reference (eager attention and operators, no splitting, fp32) and the variant from the same
weights, runs forward and backward on fresh random tokens, and compares the loss and every parameter gradient.
Gradients are compared by relative error ||g - g_ref|| / ||g_ref|| per parameter. Tolerances per dtype:

    fp32 (kernels, compile, splitting)   loss rel 1e-5, grad rel 2e-5   reordered fp32 sums only (seen: 4e-7)
    bf16 autocast                        loss rel 5e-3, grad rel 3e-2   8-bit mantissa in every matmul (7e-3)
    fp16 autocast                        loss rel 1e-3, grad rel 5e-3   11-bit mantissa (9e-4)
    fp8 (GPU)                            loss rel 5e-2, grad rel 1.5e-1 3-bit mantissa e4m3 forward
The GPU-only kernels (flash-attn, Liger, fp8) are tested only where a CUDA GPU and the library exist. The fp8 test
uses FP8_CFG, whose every decoder Linear has dims that are multiples of 16, and checks which modules torchao
swapped: CFG's ffn_dim 172 would leave the MLPs in bf16 (systems.precision.fp8_selection).
"""
from __future__ import annotations

import random

import pytest
import torch

from systems import capabilities as caps
from systems.fusion import FusionConfig
from systems.model import ModelConfig, build_model
from systems.precision import Precision, fp8_selection
from systems.splitting import SplittingConfig
from systems.transforms import transform_model

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=172, vocab_size=512, max_seq_len=32)
FP8_CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=176, vocab_size=512, max_seq_len=32)  # dims % 16 == 0
TOL = {"fp32": (1e-5, 2e-5), "bf16": (5e-3, 3e-2), "fp16": (1e-3, 5e-3), "fp8": (5e-2, 1.5e-1)}
EAGER = dict(attention="eager", rmsnorm="eager", swiglu="eager", rope="eager", loss="eager")


def _run(fusion: FusionConfig, splitting: SplittingConfig, precision: Precision, idx: torch.Tensor,
         device: str = "cpu", cfg: ModelConfig = CFG):
    torch.manual_seed(0)  # same weights for reference and variant
    model = build_model(cfg, device)
    transform_model(model, fusion=fusion, splitting=splitting, precision=precision, device_type=device)
    with precision.autocast(device):
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def assert_parity(fusion: FusionConfig, splitting: SplittingConfig = SplittingConfig(),
                  precision: Precision = Precision(), device: str = "cpu", cfg: ModelConfig = CFG) -> None:
    seed = random.randrange(2**31)  # fresh inputs every run; the seed is in the failure message
    # (2, 33): 64 tokens after the shift, a multiple of 16 as fp8's weight-gradient GEMM needs.
    idx = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed)).to(device)
    ref_loss, ref_grads = _run(FusionConfig(**EAGER), SplittingConfig(), Precision(), idx, device, cfg)
    loss, grads = _run(fusion, splitting, precision, idx, device, cfg)
    loss_tol, grad_tol = TOL[precision.compute_dtype]
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), f"seed {seed}: loss {loss} vs {ref_loss}"
    for name, g_ref in ref_grads.items():
        err = ((grads[name] - g_ref).norm() / g_ref.norm()).item()
        assert err <= grad_tol, f"seed {seed}: {name} grad relative error {err:.2e} > {grad_tol:.0e}"


def fusion(**kw) -> FusionConfig:
    return FusionConfig(**{**EAGER, **kw})


@pytest.mark.parametrize("kw", [dict(attention="sdpa"), dict(rmsnorm="compiled", swiglu="compiled",
                                                             rope="compiled", loss="compiled"),
                                dict(attention="sdpa", compile_layers=True)],
                         ids=["sdpa", "compiled_ops", "compiled_layers"])
def test_fusion_variants_match_reference(kw):
    assert_parity(fusion(**kw))


@pytest.mark.parametrize("kw", [dict(chunked_ce=True, ce_chunk_tokens=24), dict(tiled_mlp=True, mlp_tile_tokens=20),
                                dict(recompute_attention=True), dict(recompute_mlp=True),
                                dict(recompute_layers=True),
                                dict(chunked_ce=True, ce_chunk_tokens=24, tiled_mlp=True, mlp_tile_tokens=20,
                                     recompute_attention=True)],
                         ids=["chunked_ce", "tiled_mlp", "recompute_attention", "recompute_mlp", "recompute_layers",
                              "all"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_splitting_variants_match_reference(kw, attention):
    assert_parity(fusion(attention=attention), SplittingConfig(**kw))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_matches_fp32_within_dtype_tolerance(dtype):
    assert_parity(fusion(), precision=Precision(compute_dtype=dtype, loss_scaling="dynamic" if dtype == "fp16"
                                                else "none"))


def test_parity_check_catches_a_plausible_bug(monkeypatch):
    # Attention that forgets the causal mask is a classic kernel-swap bug; parity must reject it.
    import systems.fusion as fusion_module

    leaky = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    monkeypatch.setitem(fusion_module.IMPLEMENTATIONS["attention"], "sdpa", (lambda: leaky, lambda d: None))
    with pytest.raises(AssertionError, match="seed"):
        assert_parity(fusion(attention="sdpa"))


def test_composition_sdpa_chunked_ce_selective_recompute_bf16():
    assert_parity(fusion(attention="sdpa", rmsnorm="compiled", swiglu="compiled"),
                  SplittingConfig(chunked_ce=True, ce_chunk_tokens=24, recompute_attention=True),
                  Precision(compute_dtype="bf16"))


gpu = pytest.mark.skipif(not caps.HAS_CUDA, reason="needs a CUDA GPU (skipped, never faked)")


@gpu
@pytest.mark.skipif(not caps.HAS_FLASH_ATTN, reason="flash-attn not installed")
def test_flash_attention_matches_reference_on_gpu():
    assert_parity(fusion(attention="flash"), precision=Precision(compute_dtype="bf16"), device="cuda")


@gpu
@pytest.mark.skipif(not caps.HAS_LIGER, reason="liger-kernel not installed")
def test_liger_kernels_match_reference_on_gpu():
    assert_parity(fusion(rmsnorm="liger", swiglu="liger", rope="liger", loss="liger"), device="cuda")


@gpu
@pytest.mark.skipif(not caps.HAS_LIGER, reason="liger-kernel not installed")
def test_liger_fused_loss_runs_the_lm_head_matmuls_once_on_gpu():
    """FLOPs, not parity, but the same kernel: Liger's fused linear-cross-entropy (reduction="mean", as
    systems.kernels calls it) runs the LM head's three matmuls (logits, dL/dhidden, dL/dW) inside its forward and
    only rescales them in backward, so FlopCounterMode must see 6Vh per token, the analytic count of an unchunked
    loss: not 8Vh (counted twice, as a recomputed head) and not 2Vh (backward dropped). Chunked CE with Liger is
    refused (tests/unit/test_flops.py), so no other combination exists."""
    from torch.utils.flop_counter import FlopCounterMode

    from analysis.flops import Recompute, flops_per_token

    split = SplittingConfig()
    torch.manual_seed(0)
    model = build_model(CFG, "cuda")
    kernels = transform_model(model, fusion=fusion(loss="liger"), splitting=split, precision=Precision(),
                              device_type="cuda")
    idx = torch.randint(0, CFG.vocab_size, (2, 33), device="cuda")
    with FlopCounterMode(display=False) as counter:
        model(idx[:, :-1], idx[:, 1:]).backward()
    analytic = flops_per_token(n_layers=CFG.n_layers, dim=CFG.dim, ffn_dim=CFG.ffn_dim, vocab_size=CFG.vocab_size,
                               seq_len=32, recompute=Recompute(**split.recomputed(kernels)))
    assert counter.get_total_flops() == pytest.approx(analytic["hfu"] * 2 * 32, rel=1e-6)
    assert analytic["hfu"] == analytic["palm"]  # nothing recomputed: the LM head counted once, 6Vh


@gpu
@pytest.mark.skipif(not caps.HAS_FP8, reason="needs torchao and an fp8-capable GPU (SM 8.9+)")
def test_fp8_swaps_the_selected_linears_and_matches_reference_on_gpu():
    from torchao.float8.float8_linear import Float8Linear

    model = build_model(FP8_CFG, "cuda")
    expected = fp8_selection(model).converted
    assert len(expected) == 5 * FP8_CFG.n_layers  # W_pack, o_proj, gate, up, down of every layer
    transform_model(model, fusion=fusion(attention="sdpa"), splitting=SplittingConfig(),
                    precision=Precision(compute_dtype="fp8"), device_type="cuda")
    swapped = tuple(fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear))
    assert swapped == expected  # exactly the selection, in module order: nothing more, nothing less
    for i in range(FP8_CFG.n_layers):
        assert any(fqn.startswith(f"model.layers.{i}.") for fqn in swapped), f"layer {i} has no Float8Linear"
    assert not isinstance(model.lm_head, Float8Linear)
    assert_parity(fusion(attention="sdpa"), precision=Precision(compute_dtype="fp8"), device="cuda", cfg=FP8_CFG)


@gpu
def test_sdpa_and_bf16_on_gpu_match_reference():
    assert_parity(fusion(attention="sdpa"), device="cuda")
    assert_parity(fusion(attention="sdpa"), precision=Precision(compute_dtype="bf16"), device="cuda")

"""Which nn.Linear modules precision=fp8 turns into torchao Float8Linear, checked on CPU without torchao.

fp8 GEMMs (torch._scaled_mm) need a Linear's in and out features to be multiples of 16; the LM head stays in bf16
by design. A shape that breaks the rule must show up as a named skip with its reason, not as a silent bf16 run
measured against the fp8 peak. The GPU side (what torchao actually swaps, and parity) is in test_parity.py.
"""
import logging
import sys
import types

import pytest
import torch.nn as nn

from systems.model import ModelConfig, build_model
from systems.precision import Precision, fp8_selection


def _layer_linears(i: int, names: tuple[str, ...]) -> list[str]:
    return [f"model.layers.{i}.{n}" for n in names]


ATTN = ("self_attn.W_pack", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_every_decoder_linear_is_selected_when_dims_are_multiples_of_16():
    model = build_model(ModelConfig(n_layers=3, dim=64, n_heads=4, ffn_dim=176, vocab_size=512), "meta")
    sel = fp8_selection(model)
    assert sel.converted == tuple(n for i in range(3) for n in _layer_linears(i, ATTN + MLP))
    assert list(sel.skipped) == ["lm_head"]  # even with vocab 512 (a multiple of 16): by design
    assert "LM head" in sel.skipped["lm_head"] and "loss_fn" in sel.skipped["lm_head"]


def test_an_ffn_width_off_the_16_grid_skips_the_mlp_with_the_reason():
    model = build_model(ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=172, vocab_size=500), "meta")
    sel = fp8_selection(model)
    assert sel.converted == tuple(n for i in range(2) for n in _layer_linears(i, ATTN))
    assert set(sel.skipped) == {"lm_head", *(n for i in range(2) for n in _layer_linears(i, MLP))}
    assert sel.skipped["model.layers.0.mlp.gate_proj"].startswith("out_features=172 not a multiple of 16")
    assert sel.skipped["model.layers.1.mlp.up_proj"].startswith("out_features=172 not a multiple of 16")
    assert sel.skipped["model.layers.0.mlp.down_proj"].startswith("in_features=172 not a multiple of 16")


def test_the_lm_head_is_kept_out_under_a_wrapper_prefix():
    wrapped = nn.ModuleDict({"module": build_model(ModelConfig(dim=64, ffn_dim=176, vocab_size=512), "meta")})
    sel = fp8_selection(wrapped)
    assert "module.lm_head" in sel.skipped and not any(n.endswith("lm_head") for n in sel.converted)


def test_fp8_refuses_a_model_with_no_eligible_linear():
    # dim 36 and ffn 100: no decoder Linear has both dims on the 16 grid. Refused before torchao is imported.
    model = build_model(ModelConfig(n_layers=1, dim=36, n_heads=2, ffn_dim=100, vocab_size=500), "meta")
    assert fp8_selection(model).converted == ()
    with pytest.raises(ValueError, match=r"precision=fp8 found no nn.Linear it can run in fp8.*"
                                         r"model.layers.0.self_attn.W_pack: in_features=36, out_features=108"
                                         r".*multiples of 16 or use precision=bf16"):
        Precision(compute_dtype="fp8").apply(model)


def test_apply_hands_torchao_exactly_the_selection_and_logs_it(monkeypatch, caplog):
    # torchao is a GPU-machine dependency; this checks our side of the call only: the filter torchao receives
    # accepts the selected names and nothing else (torchao's swap is checked in test_parity on a GPU).
    seen: dict[str, bool] = {}

    def convert_to_float8_training(module, *, module_filter_fn):
        for fqn, m in module.named_modules():
            if isinstance(m, nn.Linear):
                seen[fqn] = module_filter_fn(m, fqn)
        return module

    float8 = types.ModuleType("torchao.float8")
    float8.convert_to_float8_training = convert_to_float8_training
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    model = build_model(ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=172, vocab_size=512), "meta")
    with caplog.at_level(logging.INFO, logger="systems.precision"):
        sel = Precision(compute_dtype="fp8").apply(model)
    assert sel == fp8_selection(model)
    assert {fqn for fqn, keep in seen.items() if keep} == set(sel.converted) == {
        n for i in range(2) for n in _layer_linears(i, ATTN)}
    assert "4 Linear modules converted to Float8Linear, 7 left in bf16" in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 6 and all("mlp" in w and "not a multiple of 16" in w for w in warned)  # not lm_head


def test_other_precisions_leave_the_model_alone():
    model = build_model(ModelConfig(dim=64, ffn_dim=176, vocab_size=512), "meta")
    assert Precision(compute_dtype="bf16").apply(model) is None
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))

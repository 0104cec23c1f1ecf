import pytest
import torch

from analysis.flops import total_params
from systems.attention import eager_attention, sdpa_attention
from systems.fusion import FusionConfig, apply_fusion
from systems.model import ModelConfig, build_model, count_parameters

TINY = ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=172, vocab_size=256, max_seq_len=32)
BAICHUAN_7B = ModelConfig(name="baichuan_7b", n_layers=32, dim=4096, n_heads=32, ffn_dim=11008, vocab_size=64000,
                          max_seq_len=4096)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(attention):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    apply_fusion(model, FusionConfig(attention=attention), device="cpu", compute_dtype="fp32")
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4  # and the change is seen from position 10 on


def test_shapes_and_loss():
    model = build_model(TINY)
    idx = torch.randint(0, 256, (3, 20))
    assert model(idx).shape == (3, 20, 256)
    loss = model(idx, idx)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_baichuan_7b_builds_on_meta_with_published_parameter_count():
    model = build_model(BAICHUAN_7B, device="meta")
    assert count_parameters(model) == 7_000_559_616
    assert all(p.is_meta for p in model.parameters())
    names = {n for n, _ in model.named_parameters()}
    # Baichuan-7B's own parameter names (its Hugging Face checkpoint maps one to one).
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.W_pack.weight", "model.layers.31.mlp.down_proj.weight",
            "model.norm.weight", "lm_head.weight"} <= names
    assert model.model.layers[0].self_attn.W_pack.weight.shape == (3 * 4096, 4096)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied


@pytest.mark.parametrize("cfg", [TINY, BAICHUAN_7B, ModelConfig(n_layers=3, dim=96, n_heads=6, ffn_dim=258,
                                                                 vocab_size=1000, max_seq_len=8)])
def test_analytic_parameter_count_matches_the_module(cfg):
    n = count_parameters(build_model(cfg, device="meta"))
    assert n == total_params(n_layers=cfg.n_layers, dim=cfg.dim, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size)


def test_eager_and_sdpa_attention_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, requires_grad=True) for _ in range(3))
    out_e = eager_attention(q, k, v)
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    out_s = sdpa_attention(q, k, v)
    grads_s = torch.autograd.grad(out_s.sum(), (q, k, v))
    torch.testing.assert_close(out_e, out_s, rtol=1e-5, atol=1e-5)
    for ge, gs in zip(grads_e, grads_s):
        torch.testing.assert_close(ge, gs, rtol=1e-4, atol=1e-5)


def test_rms_norm_eps_and_bad_shapes():
    assert BAICHUAN_7B.norm_eps == 1e-6
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="fusion.attention"):
        FusionConfig(attention="magic")
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(TINY)(torch.zeros(1, 64, dtype=torch.long))

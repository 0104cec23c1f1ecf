import pytest

from systems.model import ModelConfig, build_model
from systems.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_to_min_lr():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone decay after warm-up


def test_adamw_baichuan_hyperparameters_and_no_decay_on_norms():
    model = build_model(ModelConfig(n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=50, max_seq_len=8))
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    assert opt.defaults["betas"] == (0.9, 0.95)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3  # 2 layer norms + final
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, warmup_steps=2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)


def test_bad_optimizer_values_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2)

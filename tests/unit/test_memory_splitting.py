"""Activation memory (saved-tensor meter), what splitting saves, fp16 overflow skipping, and HFU accounting."""
import pytest
import torch

from analysis.flops import Recompute, flops_per_token
from comm.engines.ddp import DDPConfig
from comm.engines.engine import EngineInputs
from systems.fusion import FusionConfig, apply_fusion
from systems.memory import SavedTensorMeter
from systems.model import ModelConfig, build_model, cross_entropy_loss
from systems.optim import OptimConfig, build_optimizer, build_scheduler
from systems.precision import Precision
from systems.splitting import SplittingConfig, apply_splitting, chunked_loss

CFG = ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=172, vocab_size=1024, max_seq_len=64)


def activation_bytes(splitting: SplittingConfig, attention: str = "eager") -> int:
    torch.manual_seed(0)
    model = build_model(CFG)
    apply_fusion(model, FusionConfig(attention=attention), device="cpu", compute_dtype="fp32")
    apply_splitting(model, splitting)
    idx = torch.randint(0, CFG.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    meter = SavedTensorMeter(model.parameters())
    with meter:
        loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return meter.last_bytes


def test_meter_counts_saved_activations_not_parameters():
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    meter = SavedTensorMeter(lin.parameters())
    with meter:
        y = torch.relu(lin(x))
    y.sum().backward()
    # addmm saves its input x (8x32 fp32); relu saves its output (8x16); the weight is a parameter.
    assert meter.last_bytes == 8 * 32 * 4 + 8 * 16 * 4
    assert activation_bytes(SplittingConfig()) == activation_bytes(SplittingConfig())  # deterministic


def test_chunked_cross_entropy_cuts_loss_activations_at_least_4x():
    n, c, v = 512, 64, 8192
    hidden = torch.randn(n, c, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(v, c) * 0.02)
    targets = torch.randint(0, v, (n,))

    def saved(loss_fn) -> int:
        meter = SavedTensorMeter([weight])
        with meter:
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        return meter.last_bytes

    full, chunked = saved(cross_entropy_loss), saved(chunked_loss(cross_entropy_loss, 64))
    assert full >= n * v * 4  # the (tokens x vocab) fp32 logits (at least) are saved whole
    assert full / chunked >= 4, (full, chunked)


def test_each_splitting_saves_less_than_none():
    none = activation_bytes(SplittingConfig())
    for kw in (dict(chunked_ce=True, ce_chunk_tokens=32), dict(tiled_mlp=True, mlp_tile_tokens=32),
               dict(recompute_attention=True), dict(recompute_mlp=True), dict(recompute_layers=True)):
        assert activation_bytes(SplittingConfig(**kw)) < none, kw
    # Full recomputation keeps only layer inputs: less than recomputing the attention core alone.
    assert activation_bytes(SplittingConfig(recompute_layers=True)) < \
        activation_bytes(SplittingConfig(recompute_attention=True))


def test_bad_splitting_combinations_are_refused():
    with pytest.raises(ValueError, match="recompute twice"):
        SplittingConfig(recompute_layers=True, recompute_attention=True)
    with pytest.raises(ValueError, match="drop splitting.recompute_mlp"):
        SplittingConfig(tiled_mlp=True, recompute_mlp=True)
    with pytest.raises(ValueError, match="loss_scaling=dynamic"):
        Precision(compute_dtype="fp16", loss_scaling="none")


def test_fp16_overflow_skips_the_step_and_counts_it():
    torch.manual_seed(0)
    model = build_model(CFG)
    precision = Precision(compute_dtype="fp16", loss_scaling="dynamic", init_scale=1e38)  # overflows for sure
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    opt = build_optimizer(model, optim_cfg)
    engine = DDPConfig().build(EngineInputs(model=model, optimizer=opt, scheduler=build_scheduler(opt, optim_cfg, 10),
                                            grad_clip=1.0, device=torch.device("cpu"),
                                            scaler=precision.make_scaler("cpu"), compute_dtype="fp16"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, CFG.vocab_size, (2, 65))
    engine.forward_backward([(idx[:, :-1], idx[:, 1:])], 1, lambda: precision.autocast("cpu"))
    stats = engine.step()
    assert stats["skipped_steps"] == 1 and stats["loss_scale"] == pytest.approx(1e38, rel=1e-6)
    assert engine.scaler.get_scale() == pytest.approx(0.5e38, rel=1e-6)  # backed off
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was applied
    engine.scaler.update(1024.0)  # a sane scale: the next step applies
    engine.forward_backward([(idx[:, :-1], idx[:, 1:])], 1, lambda: precision.autocast("cpu"))
    assert engine.step()["skipped_steps"] == 1
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hfu_counts_chunked_ce_and_tiled_mlp_recomputation():
    shape = dict(n_layers=2, dim=64, ffn_dim=172, vocab_size=1024, seq_len=64)
    base = flops_per_token(**shape)["palm"]
    rec = Recompute(**SplittingConfig(chunked_ce=True, tiled_mlp=True).recomputed())
    # the LM head again, and the tiles' gate/up projections (not down_proj, the last op of each tile)
    assert flops_per_token(**shape, recompute=rec)["hfu"] == base + 2 * 1024 * 64 + 2 * 2 * 2 * 64 * 172


def test_compiled_operators_with_splitting_under_the_meter():
    # Regression: a compiled loss called inside chunked CE's checkpoints, with the meter's saved-tensor hooks
    # active, saved different tensors in forward and recomputation (CheckpointError). The loss is now compiled
    # around the chunked loss (systems.fusion.apply_compile).
    from systems.precision import Precision
    from systems.transforms import transform_model

    compiled = FusionConfig(attention="sdpa", rmsnorm="compiled", swiglu="compiled", rope="compiled", loss="compiled")
    saved = {}
    for name, splitting in {"none": SplittingConfig(), "all": SplittingConfig(
            chunked_ce=True, ce_chunk_tokens=48, tiled_mlp=True, mlp_tile_tokens=48, recompute_attention=True)}.items():
        torch.manual_seed(0)
        model = build_model(CFG)
        transform_model(model, fusion=compiled, splitting=splitting, precision=Precision(), device_type="cpu")
        meter = SavedTensorMeter(model.parameters())
        for _ in range(2):
            idx = torch.randint(0, CFG.vocab_size, (2, 65))
            with meter:
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        saved[name] = meter.last_bytes
    assert 0 < saved["all"] < saved["none"]

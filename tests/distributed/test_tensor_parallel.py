"""Tensor parallelism (comm/parallel): layout refusals (no processes), then fp32 parity against the unsharded model
in one process, trained side by side for 10 AdamW steps on the same data: losses within 1e-5, every parameter's
full gradient, the clipped global gradient norm, parameter names, the gathered state dict and its reload.

One gloo job per world size runs every variant (spawning costs seconds, the checks milliseconds):
2 ranks (tp=2): plain, sequence parallel with sdpa and counted operator slots, sequence parallel with every layer
recomputed (torch.utils.checkpoint), and the refusals that need a mesh; 4 ranks: tp=2 x dp=2 without and with SP
(gradients all-reduced over the dp dim, as the DDP engine does), and tp=2 x FSDP2 over dp (2-D DTensors).
"""
from __future__ import annotations

import collections
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from comm.parallel.mesh import ParallelConfig, describe_groups
from tests.helpers import free_port, spawn

STEPS = 10

# ---------------------------------------------------------------- no processes


def test_layout_gives_dp_from_the_rest():
    assert ParallelConfig(tp=2, pp=2).layout(8, n_heads=4, n_layers=4) == {"world": 8, "dp": 2, "pp": 2, "tp": 2}
    assert ParallelConfig().layout(3)["dp"] == 3


@pytest.mark.parametrize("cfg,args,words", [
    (ParallelConfig(tp=4), (6,), ["world size 6", "tp*pp = 4*1 = 4", "parallel.tp/parallel.pp"]),
    (ParallelConfig(tp=2, pp=2), (6,), ["world size 6", "2*2 = 4"]),
    (ParallelConfig(tp=3), (6, 4), ["parallel.tp=3", "model.n_heads=4", "divisors of 4"]),
    (ParallelConfig(pp=2, pp_virtual_stages=2), (4, None, 6), ["2*2 = 4", "model.n_layers=6",
                                                               "parallel.pp_virtual_stages"]),
    (ParallelConfig(tp=0), (2,), ["parallel.tp=0"]),
])
def test_layout_refusals_name_the_numbers(cfg, args, words):
    with pytest.raises(ValueError) as e:
        cfg.layout(*args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_groups_put_tp_innermost():
    g = describe_groups((2, 2, 2), rank=5)
    assert g["tp_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp_groups"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp_groups"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["coords"] == {"dp": 1, "pp": 0, "tp": 1}


def test_build_mesh_refuses_tp_across_nodes():
    from comm.parallel.mesh import build_mesh

    with pytest.raises(ValueError, match="exceeds the 2 ranks per node"):
        build_mesh(ParallelConfig(tp=4), 4, "cpu", ranks_per_node=2)
    with pytest.raises(ValueError, match="does not divide the 6 ranks per node"):
        build_mesh(ParallelConfig(tp=4), 8, "cpu", ranks_per_node=6)

# ---------------------------------------------------------------- gloo workers


def _model_cfg():
    from systems.model import ModelConfig

    # vocab 251: uneven vocabulary shards under tp=2 (126 + 125 rows, torch.chunk-style), the harder case
    return ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=96, vocab_size=251, max_seq_len=32)


def _close(got: torch.Tensor, want: torch.Tensor, *, atol: float, rtol: float = 0.0, what: str) -> None:
    """assert_close that reports the largest differences, not only that they were too large."""
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    assert torch.allclose(got, want, rtol=rtol, atol=atol), (
        f"{what}: max |diff| {diff:.3g} (atol {atol:g}, rtol {rtol:g}; max |want| {want.abs().max().item():.3g})")


def _counted(calls: collections.Counter, name: str, fn):
    """fn, counting its calls and the kinds of its first argument (plain tensor or DTensor)."""
    def wrapper(*args):
        calls[name] += 1
        calls[f"{name}:{type(args[0]).__name__}"] += 1
        return fn(*args)
    return wrapper


def _set_slots(model, calls: collections.Counter, core_fn) -> None:
    """Every operator slot of ``model`` wrapped in a counter, the attention core set to ``core_fn``."""
    for m in model.modules():
        if hasattr(m, "norm_fn"):
            m.norm_fn = _counted(calls, "norm_fn", m.norm_fn)
    for layer in model.model.layers:
        layer.self_attn.rope_fn = _counted(calls, "rope_fn", layer.self_attn.rope_fn)
        layer.self_attn.core_fn = _counted(calls, "core_fn", core_fn)
        layer.mlp.act_fn = _counted(calls, "act_fn", layer.mlp.act_fn)


def _train_side_by_side(ref, tpm, *, dp_mesh, sp: bool, where: str, micro: int, fsdp: bool, batch: int = 2) -> None:
    """STEPS AdamW steps of ``ref`` (unsharded, the whole batch) and ``tpm`` (this dp rank's rows, in ``micro``
    accumulated micro-batches), gradients averaged over dp (here, or by FSDP2) and clipped to a global norm of
    0.5; losses, full gradients and norms compared each step."""
    from comm.parallel.tensor import clip_grad_norm_, full_grads

    cfg = ref.config
    dp, dp_rank = (1, 0) if dp_mesh is None else (dp_mesh.size(), dp_mesh.get_local_rank())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt_tp = torch.optim.AdamW(tpm.parameters(), lr=1e-3, weight_decay=0.1)
    shapes = []  # the residual stream: (B, T/2, C) under sequence parallelism, else (B, T, C)
    hook = tpm.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randint(0, cfg.vocab_size, (batch * dp, 16), generator=g)  # the same on every rank
        y = torch.randint(0, cfg.vocab_size, (batch * dp, 16), generator=g)
        y[:, :3] = -100  # ignored positions, as many in every row (so the mean of per-rank means is the mean)
        loss_ref = ref(x, y)
        loss_ref.backward()
        loss = torch.zeros(())
        for rows in torch.arange(dp_rank * batch, (dp_rank + 1) * batch).chunk(micro):
            loss_tp = tpm(x[rows], y[rows]) / micro
            assert shapes.pop() == ((len(rows), 8, cfg.dim) if sp else (len(rows), 16, cfg.dim)), where
            loss_tp.backward()
            loss += loss_tp.detach()
        if dp > 1:
            dist.all_reduce(loss, group=dp_mesh.get_group())
        if dp > 1 and not fsdp:  # what the DDP engine does: average the (local shards of the) gradients over dp
            for p in tpm.parameters():
                local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(local, group=dp_mesh.get_group())
            for p in tpm.parameters():
                (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).div_(dp)
        loss /= dp
        assert abs(loss_ref.item() - loss.item()) < 1e-5, (where, step, loss_ref.item(), loss.item())
        grads = full_grads(tpm)
        assert set(grads) == {n for n, _ in ref.named_parameters()}, where
        for n, p in ref.named_parameters():
            # relative to the tensor's largest entry. Step 0: the same weights, only the order of sums differs
            # (seen: <= 7e-7). Later the weights differ by what AdamW made of that (below; seen: <= 6e-5).
            _close(grads[n], p.grad, atol=(1e-5 if step == 0 else 3e-4) * p.grad.abs().max().item(),
                   what=f"{where} step {step} grad {n}")
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        norm_tp = clip_grad_norm_(tpm.parameters(), 0.5)
        assert norm_ref > 0.5 and abs(norm_ref.item() - norm_tp.item()) < 1e-5 * norm_ref.item(), (where, step)
        opt_ref.step(), opt_tp.step()
        opt_ref.zero_grad(), opt_tp.zero_grad()
    hook.remove()


def _check_model(ref, tpm, *, sp: bool, where: str) -> None:
    """Names unchanged, W_pack holding this rank's [q_r; k_r; v_r], local head count, SP norms as DTensors."""
    from torch.distributed.tensor import DTensor

    assert [n for n, _ in tpm.named_parameters()] == [n for n, _ in ref.named_parameters()], where
    assert list(tpm.state_dict()) == list(ref.state_dict()), where
    attn = tpm.model.layers[0].self_attn
    dim = ref.config.dim
    assert attn.W_pack.weight.to_local().shape == (3 * dim // 2, dim), where
    assert attn.n_heads == ref.config.n_heads // 2, where
    assert isinstance(tpm.model.layers[0].input_layernorm.weight, DTensor) == sp, where


def _check_state_dict(ref, tpm, fresh, *, where: str) -> None:
    """The gathered state dict equals the reference's; loaded into a freshly sharded model it gives the same
    logits (the no-targets path: full logits gathered by lm_head's ColwiseParallel)."""
    from comm.parallel.tensor import full_state_dict, load_full_state_dict

    full = full_state_dict(tpm)
    assert list(full) == list(ref.state_dict()), where
    for n, v in ref.state_dict().items():
        # AdamW divides by sqrt(v), so an element whose gradient is near zero turns fp32 rounding into a visible
        # part of an lr=1e-3 step: after 10 steps, seen <= 8e-5 of the tensor's largest entry
        _close(full[n], v, atol=3e-4 * v.abs().max().item(), what=f"{where} param {n}")
    load_full_state_dict(fresh, ref.state_dict())
    x = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(x)
        _close(tpm(x), want, atol=1e-4, what=f"{where} logits")
        _close(fresh(x), want, atol=1e-5, what=f"{where} logits after reload")


def _variant(tp_mesh, dp_mesh, *, sp: bool, core: str = "eager", recompute: bool = False, micro: int = 1,
             fsdp: bool = False) -> None:
    from comm.parallel.tensor import apply_tensor_parallel
    from systems.attention import eager_attention, sdpa_attention
    from systems.model import build_model
    from systems.splitting import recompute_forward

    dp = 1 if dp_mesh is None else dp_mesh.size()
    where = f"sp={sp} core={core} recompute={recompute} micro={micro} dp={dp} fsdp={fsdp}"
    core_fn = {"eager": eager_attention, "sdpa": sdpa_attention}[core]
    torch.manual_seed(0)
    ref = build_model(_model_cfg())
    for layer in ref.model.layers:
        layer.self_attn.core_fn = core_fn
    calls = collections.Counter()
    tpm = copy.deepcopy(ref)
    _set_slots(tpm, calls, core_fn)  # fusion's place: before tensor parallelism (experiments/trainer.py)
    if recompute:  # splitting's place, as recompute_layers does it
        for layer in tpm.model.layers:
            recompute_forward(layer)
    fresh = apply_tensor_parallel(copy.deepcopy(tpm), tp_mesh, sequence_parallel=sp)
    apply_tensor_parallel(tpm, tp_mesh, sequence_parallel=sp)
    _check_model(ref, tpm, sp=sp, where=where)
    if fsdp:  # 2-D: FSDP2 shards the tensor-parallel DTensors again over dp (torchtitan's order: TP, then FSDP)
        from torch.distributed.fsdp import fully_shard

        for layer in tpm.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(tpm, mesh=dp_mesh)
    _train_side_by_side(ref, tpm, dp_mesh=dp_mesh, sp=sp, where=where, micro=micro, fsdp=fsdp)
    layers = ref.config.n_layers
    # every slot ran: norms twice per layer + the final one; recomputation re-runs each layer's core once more
    assert calls["core_fn"] == STEPS * micro * layers * (2 if recompute else 1), (where, calls)
    assert calls["norm_fn"] >= STEPS * micro * (2 * layers + 1) and calls["rope_fn"] and calls["act_fn"], (where, calls)
    assert calls["norm_fn:DTensor"] == (calls["norm_fn"] if sp else 0), (where, calls)  # SP norms see DTensors
    assert calls["core_fn:Tensor"] == calls["core_fn"], (where, calls)  # the core sees local heads only
    _check_state_dict(ref, tpm, fresh, where=where)


def _refusals(tp_mesh) -> None:
    from comm.parallel.tensor import apply_tensor_parallel
    from systems.model import ModelConfig, build_model
    from systems.splitting import chunked_loss, recompute_forward

    odd = build_model(ModelConfig(n_layers=1, dim=48, n_heads=3, ffn_dim=64, vocab_size=64, max_seq_len=16))
    with pytest.raises(ValueError, match=r"parallel.tp=2 does not divide model.n_heads=3"):
        apply_tensor_parallel(odd, tp_mesh)
    model = build_model(_model_cfg())
    model.loss_fn = chunked_loss(model.loss_fn, 8)
    with pytest.raises(ValueError, match="not the reference cross_entropy_loss"):
        apply_tensor_parallel(model, tp_mesh)
    model = build_model(_model_cfg())
    recompute_forward(model.model.layers[1].self_attn)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.forward is already replaced"):
        apply_tensor_parallel(model, tp_mesh)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _worker_tp2(rank: int, world: int, port: int) -> None:
    from comm.parallel.mesh import ParallelConfig, build_mesh

    _init(rank, world, port)
    try:
        mesh, groups = build_mesh(ParallelConfig(tp=2), world, "cpu", ranks_per_node=2, n_heads=4, n_layers=2)
        assert groups["tp_groups"] == [[0, 1]] and groups["coords"]["tp"] == rank
        _variant(mesh["tp"], None, sp=False)
        _variant(mesh["tp"], None, sp=True, core="sdpa", micro=2)  # accumulation: settled grads add up
        _variant(mesh["tp"], None, sp=True, recompute=True)
        _refusals(mesh["tp"])
    finally:
        dist.destroy_process_group()


def _worker_tp2_dp2(rank: int, world: int, port: int) -> None:
    from comm.parallel.mesh import ParallelConfig, build_mesh

    _init(rank, world, port)
    try:
        mesh, groups = build_mesh(ParallelConfig(tp=2), world, "cpu", ranks_per_node=2, n_heads=4, n_layers=2)
        assert groups["tp_groups"] == [[0, 1], [2, 3]] and groups["dp_groups"] == [[0, 2], [1, 3]]
        assert groups["coords"] == {"dp": rank // 2, "pp": 0, "tp": rank % 2}
        _variant(mesh["tp"], mesh["dp"], sp=False)
        _variant(mesh["tp"], mesh["dp"], sp=True, core="sdpa")
        _variant(mesh["tp"], mesh["dp"], sp=True, fsdp=True)
    finally:
        dist.destroy_process_group()


def test_tp2_matches_unsharded_model():
    spawn(_worker_tp2, (2, free_port()), 2, timeout_s=90)


def test_tp2_dp2_matches_unsharded_model():
    spawn(_worker_tp2_dp2, (4, free_port()), 4, timeout_s=90)

"""Tensor parallelism (comm/parallel): layout refusals (no processes) and fp32 parity of tp=2, with and without
sequence parallelism, against the unsharded model in one process: losses over 5 AdamW steps, every parameter's
full gradient, parameter names, and the gathered state dict. One gloo job runs both variants (spawning costs
seconds, the checks milliseconds)."""
from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from comm.parallel.mesh import ParallelConfig, describe_groups
from tests.helpers import free_port, spawn

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

# ---------------------------------------------------------------- gloo, tp=2


def _parity(tp_mesh, sequence_parallel: bool, steps: int = 5) -> None:
    from comm.parallel.tensor import apply_tensor_parallel, full_grads, full_state_dict
    from systems.model import ModelConfig, build_model

    cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, ffn_dim=96, vocab_size=256, max_seq_len=32)
    torch.manual_seed(0)
    ref = build_model(cfg)
    tpm = apply_tensor_parallel(copy.deepcopy(ref), tp_mesh, sequence_parallel=sequence_parallel)
    where = f"sequence_parallel={sequence_parallel}"
    assert [n for n, _ in tpm.named_parameters()] == [n for n, _ in ref.named_parameters()], where
    assert list(tpm.state_dict()) == list(ref.state_dict()), where
    from torch.distributed.tensor import DTensor

    layer = tpm.model.layers[0]
    assert layer.self_attn.W_pack.weight.to_local().shape == (3 * cfg.dim // 2, cfg.dim), where
    assert layer.self_attn.n_heads == cfg.n_heads // 2
    assert isinstance(layer.input_layernorm.weight, DTensor) == sequence_parallel, where
    shapes = []  # the residual stream between layers: (B, T/2, C) under sequence parallelism, else (B, T, C)
    layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt_tp = torch.optim.AdamW(tpm.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        y = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        loss_ref, loss_tp = ref(x, y), tpm(x, y)
        assert shapes.pop() == ((2, 8, cfg.dim) if sequence_parallel else (2, 16, cfg.dim)), where
        loss_ref.backward()
        loss_tp.backward()
        assert abs(loss_ref.item() - loss_tp.item()) < 1e-5, (where, step, loss_ref.item(), loss_tp.item())
        grads = full_grads(tpm)
        assert set(grads) == {n for n, _ in ref.named_parameters()}, where
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-5, msg=f"{where} step {step} grad {n}")
        opt_ref.step(), opt_tp.step()
        opt_ref.zero_grad(), opt_tp.zero_grad()
    full = full_state_dict(tpm)
    for n, v in ref.state_dict().items():
        assert full[n].shape == v.shape, (where, n)
        torch.testing.assert_close(full[n], v, rtol=0, atol=1e-5, msg=f"{where} param {n}")
    # Without targets the model returns full logits (lm_head's own forward under ColwiseParallel).
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(tpm(x), ref(x), rtol=0, atol=1e-5, msg=f"{where} logits")


def _worker(rank: int, world: int, port: int) -> None:
    from comm.parallel.mesh import ParallelConfig, build_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        mesh, groups = build_mesh(ParallelConfig(tp=2), world, "cpu", ranks_per_node=2, n_heads=4, n_layers=2)
        assert groups["tp_groups"] == [[0, 1]] and groups["coords"]["tp"] == rank
        for sp in (False, True):
            _parity(mesh["tp"], sp)
    finally:
        dist.destroy_process_group()


def test_tp2_matches_unsharded_model_with_and_without_sequence_parallel():
    spawn(_worker, (2, free_port()), 2, timeout_s=90)

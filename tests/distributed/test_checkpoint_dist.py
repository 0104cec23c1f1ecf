"""fault.checkpoint across two real processes (gloo): save on two ranks, load on two fresh ones."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers import free_port, spawn

WORLD = 2
FP = {"model": "tiny", "world_size": WORLD}


def _setup(rank: int, port: int, mode: str):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fault.checkpoint import CheckpointConfig, CheckpointManager
    from fault.events import EventLog

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0 if mode.endswith("save") else 1)  # the load phase starts from other weights
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    run_dir = os.environ["CKPT_TEST_RUN_DIR"]
    mgr = CheckpointManager(CheckpointConfig(mode=mode.split("-")[0]), run_dir=run_dir, rank=rank,
                            world_size=WORLD, fingerprint=FP, events=EventLog(run_dir, rank))

    def state():
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd}

    return model, opt, mgr, state


def _save_worker(rank: int, port: int, mode: str, out: str) -> None:
    os.environ["CKPT_TEST_RUN_DIR"] = out
    model, opt, mgr, state = _setup(rank, port, f"{mode}-save")
    torch.manual_seed(10 + rank)  # each rank its own data; DDP averages the gradients

    def train_step():
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    train_step()
    train_step()
    torch.save(state(), f"{out}/expected{rank}.pt")
    mgr.save(2, sharded=state(), per_rank={"rank": rank})
    train_step()  # async: DDP's all-reduce runs while the checkpoint is written; the weights change under it
    mgr.wait()

    def fail_on_rank1():  # a rank that dies after writing its files: nobody commits, and nobody hangs
        if rank == 1:
            raise RuntimeError("rank 1 dies before the commit")

    try:
        mgr.save(4, sharded=state(), per_rank={"rank": rank}, before_commit=fail_on_rank1)
        mgr.wait()
        error = None
    except RuntimeError as e:
        error = str(e)
    torch.save(error, f"{out}/error{rank}.pt")
    mgr.close()
    dist.destroy_process_group()


def _load_worker(rank: int, port: int, mode: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    os.environ["CKPT_TEST_RUN_DIR"] = out
    model, opt, mgr, state = _setup(rank, port, f"{mode}-load")
    sd = state()
    loaded = mgr.load(sd)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    torch.save({"step": loaded.step, "per_rank": loaded.per_rank, "state": state()}, f"{out}/loaded{rank}.pt")
    mgr.close()
    dist.destroy_process_group()


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_ranks_save_then_two_fresh_ranks_load(tmp_path, mode):
    from fault.checkpoint import newest_committed

    spawn(_save_worker, (free_port(), mode, str(tmp_path)), WORLD, timeout_s=90)
    errors = [torch.load(tmp_path / f"error{r}.pt") for r in range(WORLD)]
    assert "rank 1 dies" in errors[1] and "a rank failed" in errors[0]
    assert [p.name for p in newest_committed(tmp_path / "checkpoints")] == ["step_000002"]

    spawn(_load_worker, (free_port(), mode, str(tmp_path)), WORLD, timeout_s=90)
    expected = torch.load(tmp_path / "expected0.pt")
    _assert_same(expected, torch.load(tmp_path / "expected1.pt"), "replicas")
    for r in range(WORLD):
        loaded = torch.load(tmp_path / f"loaded{r}.pt")
        assert loaded["step"] == 2 and loaded["per_rank"] == {"rank": r}
        _assert_same(expected, loaded["state"], f"rank{r}")
    assert not (tmp_path / "checkpoints" / ".tmp-step_000004").exists()  # removed by the second start

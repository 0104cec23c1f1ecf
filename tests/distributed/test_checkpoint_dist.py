"""fault.checkpoint across two real processes (gloo): save on two ranks, load on two fresh ones."""
import datetime
import os
from pathlib import Path

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
    assert all("step 4 was not committed" in e and "rank 1" in e and "rank 1 dies" in e for e in errors)
    assert [p.name for p in newest_committed(tmp_path / "checkpoints")] == ["step_000002"]

    spawn(_load_worker, (free_port(), mode, str(tmp_path)), WORLD, timeout_s=90)
    expected = torch.load(tmp_path / "expected0.pt")
    _assert_same(expected, torch.load(tmp_path / "expected1.pt"), "replicas")
    for r in range(WORLD):
        loaded = torch.load(tmp_path / f"loaded{r}.pt")
        assert loaded["step"] == 2 and loaded["per_rank"] == {"rank": r}
        _assert_same(expected, loaded["state"], f"rank{r}")
    # The failed save's directory is removed by its own job when it ends (another job never removes it).
    assert not list((tmp_path / "checkpoints").glob(".tmp-step_000004*"))


def _failure_worker(rank: int, port: int, scenario: str, out: str) -> None:
    """One rank's write fails (a full disk), or each rank writes into a directory the other cannot see."""
    import errno
    import time

    from fault import checkpoint

    os.environ["CKPT_TEST_RUN_DIR"] = f"{out}/rank{rank}" if scenario == "not_shared" else out
    if scenario == "not_shared":  # found when the manager starts, before any training
        try:
            _setup(rank, port, "sync-save")
            error = None
        except checkpoint.CheckpointError as e:
            error = str(e)
        flag = torch.ones(1)
        dist.all_reduce(flag)
        torch.save({"error": error, "sum": flag.item()}, f"{out}/result{rank}.pt")
        dist.destroy_process_group()
        return
    model, opt, mgr, state = _setup(rank, port, "sync-save")
    real_write_file, real_write = checkpoint.SaveIO.write_file, checkpoint._HashingStream.write

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if rank == 1 and scenario == "own_write_full":
        checkpoint.SaveIO.write_file = full  # its rank00001.pt
    if rank == 1 and scenario == "dcp_write_full":
        checkpoint._HashingStream.write = lambda self, data: full() if self.name.endswith(".distcp") \
            else real_write(self, data)
    t0 = time.monotonic()
    try:
        mgr.save(1, sharded=state(), per_rank={"rank": rank})
        error = None
    except (checkpoint.CheckpointError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - t0
    checkpoint.SaveIO.write_file, checkpoint._HashingStream.write = real_write_file, real_write
    # The ranks' collectives still match: a training all-reduce and the next save go through.
    flag = torch.ones(1)
    dist.all_reduce(flag)
    mgr.save(2, sharded=state(), per_rank={"rank": rank})
    committed = [p.name for p in checkpoint.newest_committed(mgr.dir)]
    torch.save({"error": error, "elapsed": elapsed, "sum": flag.item(), "committed": committed},
               f"{out}/result{rank}.pt")
    mgr.close()
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scenario", ["own_write_full", "dcp_write_full"])
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_without_a_hang(tmp_path, scenario):
    spawn(_failure_worker, (free_port(), scenario, str(tmp_path)), WORLD, timeout_s=90)
    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(WORLD)]
    for r in results:
        assert r["error"] and "step 1 was not committed" in r["error"] and "rank 1" in r["error"]
        assert "No space left on device" in r["error"] and "rank 0 (" not in r["error"]
        assert r["elapsed"] < 30 and r["sum"] == WORLD  # no rank waited out a timeout; collectives still match
        assert r["committed"] == ["step_000002"]  # the failed step left nothing; the next save committed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_checkpoint_dir_that_is_not_shared_is_reported_before_training(tmp_path):
    spawn(_failure_worker, (free_port(), "not_shared", str(tmp_path)), WORLD, timeout_s=90)
    for r in range(WORLD):
        result = torch.load(tmp_path / f"result{r}.pt")
        assert "not shared between the ranks" in result["error"] and "probe of rank 1" in result["error"]
        assert "NFS" in result["error"] and result["sum"] == WORLD
    assert not list((tmp_path / "rank0" / "checkpoints").glob(".probe*"))  # probes cleaned up


def _commit_check_worker(rank: int, port: int, out: str) -> None:
    """The directory was shared at start-up but rank 1's files do not reach rank 0 (a mount that changed)."""
    from fault import checkpoint

    os.environ["CKPT_TEST_RUN_DIR"] = out
    model, opt, mgr, state = _setup(rank, port, "sync-save")
    if rank == 1:
        mgr.dir = Path(out) / "elsewhere"
    try:
        mgr.save(1, sharded=state(), per_rank={"rank": rank})
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    torch.save({"error": error}, f"{out}/result{rank}.pt")
    dist.destroy_process_group()


def test_the_commit_checks_that_rank_0_sees_every_file(tmp_path):
    spawn(_commit_check_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=90)
    for r in range(WORLD):
        error = torch.load(tmp_path / f"result{r}.pt")["error"]
        assert "not shared between the ranks" in error and "from rank 1" in error and "Nothing was committed" in error
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def _recorder_worker(rank: int, port: int, out: str) -> None:
    """What the watchdog reads while rank 0 waits in a collective rank 1 has not entered yet."""
    import json
    import threading
    import time

    from fault.progress import collectives, enable_flight_recorder

    enable_flight_recorder()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    group = dist.new_group(backend="gloo", group_desc="checkpoint")
    for _ in range(3):
        dist.all_reduce(torch.ones(4))
    seen = {}
    reader = threading.Timer(1.0, lambda: seen.update(collectives()))
    reader.start()
    if rank == 1:
        time.sleep(2.0)
    dist.all_reduce(torch.ones(1000))
    reader.join()
    dist.barrier(group=group)
    Path(f"{out}/seen{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_flight_recorder_shows_who_entered_which_collective(tmp_path):
    import json

    spawn(_recorder_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=60)
    waiting, late = (json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(WORLD))
    assert waiting["0"]["enqueued"] == 4 and waiting["0"]["completed"] == 3
    assert waiting["0"]["pending"] == {"seq": 4, "op": "gloo:all_reduce", "bytes": 4000}
    assert late["0"]["enqueued"] == 3 and late["0"]["completed"] == 3 and late["0"]["pending"] is None
    ckpt = next(g for g in waiting.values() if g["desc"] == "checkpoint")
    assert ckpt["ranks"] == [0, 1] and ckpt["enqueued"] == 0  # a member that never used the group is listed


def _verify_split_worker(rank: int, port: int, out: str) -> None:
    """Load with both ranks hashing a share: which files each hashed, and what was loaded."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fault import checkpoint

    os.environ["CKPT_TEST_RUN_DIR"] = out
    hashed: list[str] = []
    real = checkpoint.hash_confined

    def counting(root, name, progress):
        hashed.append(f"{Path(root).name}/{name}")
        return real(root, name, progress)
    checkpoint.hash_confined = counting
    model, opt, mgr, state = _setup(rank, port, "sync-load")
    sd = state()
    loaded = mgr.load(sd)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    torch.save({"step": loaded.step, "hashed": hashed, "state": state()}, f"{out}/verified{rank}.pt")
    mgr.close()
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_verification_is_split_across_ranks_and_a_corruption_any_rank_finds_falls_back_on_all(tmp_path):
    import json

    from fault.checkpoint import MANIFEST, fair_shares, newest_committed

    spawn(_save_worker, (free_port(), "sync", str(tmp_path)), WORLD, timeout_s=90)  # commits step 2 only
    ckpts = tmp_path / "checkpoints"
    step2 = ckpts / "step_000002"
    (step3 := ckpts / "step_000003").mkdir()  # a newer copy, corrupted in a file rank 1 verifies
    for p in step2.iterdir():
        (step3 / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((step3 / MANIFEST).read_text())
    manifest["step"] = 3
    (step3 / MANIFEST).write_text(json.dumps(manifest))
    shares = fair_shares({n: i["bytes"] for n, i in manifest["files"].items()}, WORLD)
    assert all(shares) and sorted(n for share in shares for n in share) == sorted(manifest["files"])
    victim = step3 / shares[1][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    spawn(_verify_split_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=90)
    results = [torch.load(tmp_path / f"verified{r}.pt") for r in range(WORLD)]
    for res in results:
        assert res["step"] == 2  # every rank fell back to the same checkpoint
    seen = [sorted(h.split("/", 1)[1] for h in res["hashed"] if h.startswith("step_000003/")) for res in results]
    assert seen[0] == sorted(shares[0])  # rank 0 hashed its whole share of the corrupted checkpoint, no more
    assert seen[1] == [victim.name]  # rank 1 found the corruption in its first file and stopped there
    _assert_same(torch.load(tmp_path / "expected0.pt"), results[0]["state"], "rank0")
    [fallback] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()
                  if '"checkpoint_fallback"' in line]
    assert f"{victim.name} fails its sha256 check (seen by rank 1)" in fallback["reason"]
    assert [p.name for p in newest_committed(ckpts)] == ["step_000002"]

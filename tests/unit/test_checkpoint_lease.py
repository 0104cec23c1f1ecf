"""One writer per checkpoint directory (fault.lease) and saves that fail without ending the job (SaveFailed)."""
from __future__ import annotations

import errno
import json
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from fault import checkpoint as ckpt_mod
from fault.checkpoint import CheckpointConfig, CheckpointManager, SaveFailed, newest_committed
from fault.events import EventLog, read_events
from fault.lease import LEASE, LeaseHeld

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FP = {"model": {"dim": 8}}


def state() -> dict:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def manager(run: Path, job: str, **cfg) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(mode="sync", **cfg), run_dir=run, rank=0, world_size=1,
                             fingerprint=FP, events=EventLog(run, 0), job=job)


def test_a_second_job_refuses_naming_the_holder_and_the_first_keeps_its_checkpoints(tmp_path):
    first = manager(tmp_path, "job-A")
    first.save(1, sharded=state(), per_rank={"step": 1})
    with pytest.raises(LeaseHeld, match=r"in use by job 'job-A' \(host .*, pid \d+, last heartbeat \d+ s ago\).*"
                                        r"fault\.checkpoint\.dir"):
        manager(tmp_path, "job-B")
    first.save(2, sharded=state(), per_rank={"step": 2})  # the refused job touched nothing
    assert [p.name for p in newest_committed(first.dir)] == ["step_000002", "step_000001"]
    first.close()
    assert not (first.dir / LEASE).exists()
    manager(tmp_path, "job-B").close()  # released: the next job may write


def test_a_restarted_job_takes_its_own_lease_back(tmp_path):
    manager(tmp_path, "slurm-42")  # killed without close: the lease stays
    manager(tmp_path, "slurm-42").close()  # the same job id (a launcher restart) takes it back


def _stale_lease(d: Path, **fields) -> None:
    d.mkdir(parents=True, exist_ok=True)
    held = {"job": "job-Z", "host": "elsewhere", "pid": 1, "launcher_id": True, "token": "t",
            "heartbeat": time.time(), **fields}
    (d / LEASE).write_text(json.dumps(held))


def test_a_stale_lease_is_taken_over_with_an_event_and_only_its_own_leftovers_removed(tmp_path):
    d = tmp_path / "checkpoints"
    _stale_lease(d, heartbeat=time.time() - 120)
    (d / ".tmp-step_000005.job-Z").mkdir()  # the dead holder's unfinished save
    (d / ".tmp-step_000007.job-Y").mkdir()  # a third job's: not ours to remove
    mgr = manager(tmp_path, "job-A", lease_s=60)
    assert not (d / ".tmp-step_000005.job-Z").exists() and (d / ".tmp-step_000007.job-Y").exists()
    [event] = [e for e in read_events(tmp_path) if e["kind"] == "checkpoint_lease_takeover"]
    assert event["previous"]["job"] == "job-Z"
    mgr.close()


def test_a_fresh_lease_on_another_host_is_not_stale(tmp_path):
    _stale_lease(tmp_path / "checkpoints", heartbeat=time.time() - 10)
    with pytest.raises(LeaseHeld, match="job 'job-Z' .*host elsewhere"):
        manager(tmp_path, "job-A", lease_s=60)


def test_a_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    _stale_lease(tmp_path / "checkpoints", host=socket.gethostname(), pid=2 ** 22 + 7)  # no such pid
    manager(tmp_path, "job-A").close()


def test_a_job_that_lost_its_lease_does_not_commit(tmp_path):
    mgr = manager(tmp_path, "job-A")
    _stale_lease(mgr.dir, job="job-B", token="other")  # taken over while this job was stopped
    with pytest.raises(LeaseHeld, match="lost its lease .* job 'job-B'"):
        mgr.save(1, sharded=state(), per_rank={"step": 1})
    assert newest_committed(mgr.dir) == []


def test_pruning_keeps_another_jobs_checkpoints_and_follows_the_lineage(tmp_path):
    a = manager(tmp_path, "job-A", keep=1)
    a.save(1, sharded=state(), per_rank={"step": 1})
    a.close()
    b = manager(tmp_path, "job-B", keep=1)
    b.save(2, sharded=state(), per_rank={"step": 2})  # B never resumed from A: A's step 1 is not B's to prune
    assert [p.name for p in newest_committed(b.dir)] == ["step_000002", "step_000001"]
    b.close()
    c = manager(tmp_path, "job-C", keep=1)
    assert c.load(state()).step == 2  # C continues B's run: B's checkpoints are its lineage's
    c.save(3, sharded=state(), per_rank={"step": 3})
    assert [p.name for p in newest_committed(c.dir)] == ["step_000003", "step_000001"]
    c.close()


def test_a_full_disk_at_the_commit_raises_save_failed_and_the_next_save_commits(tmp_path, monkeypatch):
    mgr = manager(tmp_path, "job-A")
    mgr.save(1, sharded=state(), per_rank={"step": 1})
    real = ckpt_mod._write_file

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(ckpt_mod, "_write_file", full)
    with pytest.raises(SaveFailed, match="step 2 was not committed.*No space left.*next save tries again") as e:
        mgr.save(2, sharded=state(), per_rank={"step": 2})
    assert e.value.step == 2
    monkeypatch.setattr(ckpt_mod, "_write_file", real)
    mgr.save(3, sharded=state(), per_rank={"step": 3})
    assert [p.name for p in newest_committed(mgr.dir)] == ["step_000003", "step_000001"]
    mgr.close()
    assert not list(mgr.dir.glob(".tmp-*"))


def test_an_async_failure_is_raised_at_the_next_save_which_still_runs(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(mode="async"), run_dir=tmp_path, rank=0, world_size=1, fingerprint=FP,
                            job="job-A")

    def boom():
        raise OSError(errno.EIO, "Input/output error")
    mgr.save(1, sharded=state(), per_rank={"step": 1}, before_commit=boom)
    with pytest.raises(SaveFailed, match="step 1 was not committed") as e:
        mgr.save(2, sharded=state(), per_rank={"step": 2})
    assert e.value.step == 1
    mgr.wait()
    assert [p.name for p in newest_committed(mgr.dir)] == ["step_000002"]
    mgr.close()

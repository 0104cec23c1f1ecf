"""fault.checkpoint in one process: round trips, async staging, atomic commit, fallback, bad input, exact resume."""
from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fault.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    newest_committed,
    rng_state,
    set_rng_state,
)
from fault.events import EventLog, read_events

# DCP warns on every single-process save/load even when no_dist=True is passed explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FP = {"model": {"dim": 8, "n_layers": 2}, "seq_len": 16}


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_step(model, opt, sched) -> torch.Tensor:
    loss = model(torch.randn(4, 8)).pow(2).mean()  # fresh random data: the RNG state matters on resume
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.detach()


def state(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def manager(tmp_path: Path, fingerprint: dict = FP, **cfg) -> CheckpointManager:
    cfg = {"mode": "sync", **cfg}
    return CheckpointManager(CheckpointConfig(**cfg), run_dir=tmp_path, rank=0, world_size=1,
                             fingerprint=fingerprint, events=EventLog(tmp_path, 0))


def save_steps(tmp_path: Path, steps, **cfg) -> CheckpointManager:
    model, opt, sched = build()
    mgr = manager(tmp_path, **cfg)
    for step in steps:
        train_step(model, opt, sched)
        mgr.save(step, sharded=state(model, opt), per_rank={"step": step})
    mgr.close()
    return mgr


def load_fresh(tmp_path: Path, **cfg):
    model, opt, _ = build(seed=123)
    sd = state(model, opt)
    loaded = manager(tmp_path, **cfg).load(sd)
    if loaded is not None:
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return loaded, model, opt


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def flip_byte(ckpt: Path) -> None:
    target = max((p for p in ckpt.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_round_trip_restores_model_optimizer_and_per_rank_state(tmp_path, mode):
    model, opt, sched = build()
    for _ in range(2):
        train_step(model, opt, sched)
    mgr = manager(tmp_path, mode=mode)
    block_s = mgr.save(2, sharded=state(model, opt), per_rank={"loader": {"pos": 7}, "sched": sched.state_dict()})
    mgr.close()
    assert block_s >= 0
    [ckpt] = newest_committed(tmp_path / "checkpoints")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert ckpt.name == "step_000002" and manifest["format"] == "chuanliu-checkpoint/1"
    assert manifest["fingerprint"] == FP and {".metadata", "rank00000.pt"} <= manifest["files"].keys()
    [commit] = [e for e in read_events(tmp_path) if e["kind"] == "checkpoint_commit"]
    assert commit["step"] == 2 and commit["path"] == str(ckpt) and commit["bytes"] > 0

    loaded, model2, opt2 = load_fresh(tmp_path, mode=mode)
    assert loaded.step == 2 and loaded.path == ckpt
    assert loaded.per_rank == {"loader": {"pos": 7}, "sched": sched.state_dict()}
    assert_same(state(model, opt), state(model2, opt2))


def test_async_writes_the_state_as_of_save_even_if_tensors_change_after(tmp_path, monkeypatch):
    gate = threading.Event()
    original = FileSystemWriter.write_data

    def gated_write(self, plan, planner):  # hold the background write until the test has mutated the weights
        assert gate.wait(timeout=30)
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", gated_write)
    model, opt, sched = build()
    train_step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = manager(tmp_path, mode="async")
    mgr.save(1, sharded=state(model, opt), per_rank={})
    assert newest_committed(mgr.dir) == []  # save() returned before the write
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)
    gate.set()
    mgr.close()
    _, model2, _ = load_fresh(tmp_path)
    assert_same(expected, model2.state_dict())


def test_async_error_is_reraised_and_previous_checkpoint_stays_newest(tmp_path):
    model, opt, _ = build()
    mgr = manager(tmp_path, mode="async")
    mgr.save(1, sharded=state(model, opt), per_rank={})

    def boom():
        raise OSError("disk vanished")

    mgr.save(2, sharded=state(model, opt), per_rank={}, before_commit=boom)  # waits for step 1 first
    with pytest.raises(RuntimeError, match=r"step 2 was not committed.*rank 0 .*OSError: disk vanished"):
        mgr.wait()
    mgr.close()
    assert [p.name for p in newest_committed(mgr.dir)] == ["step_000001"]


def test_failure_before_commit_leaves_previous_checkpoint_and_tmp_is_ignored_then_removed(tmp_path):
    model, opt, _ = build()
    mgr = manager(tmp_path)
    mgr.save(1, sharded=state(model, opt), per_rank={"step": 1})

    def killed():  # stands in for the SIGKILL of fault.chaos kill_mid_save, after this rank's files are written
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        mgr.save(2, sharded=state(model, opt), per_rank={"step": 2}, before_commit=killed)
    [tmp] = mgr.dir.glob(".tmp-step_000002.*")  # named by the job (fault.lease): another job's is never removed
    assert (tmp / "rank00000.pt").exists() and not (tmp / "manifest.json").exists()
    assert [p.name for p in newest_committed(mgr.dir)] == ["step_000001"]
    loaded, _, _ = load_fresh(tmp_path)  # the new manager also removes the stale tmp dir
    assert loaded.step == 1 and loaded.per_rank == {"step": 1}
    assert not tmp.exists()


def test_keep_prunes_oldest_but_never_another_configuration(tmp_path):
    save_steps(tmp_path, [1], fingerprint={"other": 1})
    save_steps(tmp_path, [2, 3, 4], keep=2)
    assert [p.name for p in newest_committed(tmp_path / "checkpoints")] == \
        ["step_000004", "step_000003", "step_000001"]


def test_corrupt_newest_falls_back_with_warning_event_and_is_renamed_aside(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    ckpt_dir = tmp_path / "checkpoints"
    flip_byte(ckpt_dir / "step_000002")
    loaded, _, _ = load_fresh(tmp_path)
    assert loaded.step == 1
    assert "step_000002 refused" in caplog.text and "sha256" in caplog.text
    [event] = [e for e in read_events(tmp_path) if e["kind"] == "checkpoint_fallback"]
    assert event["skipped"] == str(ckpt_dir / "step_000002") and event["used"] == str(ckpt_dir / "step_000001")
    assert not (ckpt_dir / "step_000002").exists()
    assert len(list(ckpt_dir.glob("step_000002.corrupt-*"))) == 1
    assert load_fresh(tmp_path)[0].step == 1  # the renamed one is not picked again


def test_missing_manifest_falls_back(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").unlink()
    assert load_fresh(tmp_path)[0].step == 1
    assert "manifest.json is missing" in caplog.text


def test_truncated_file_falls_back_even_without_sha256(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    target = tmp_path / "checkpoints" / "step_000002" / "rank00000.pt"
    target.write_bytes(target.read_bytes()[:-1])
    assert load_fresh(tmp_path, verify=False)[0].step == 1
    assert "rank00000.pt has" in caplog.text and "the manifest says" in caplog.text


def test_all_corrupt_raises_instead_of_starting_fresh(tmp_path):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").unlink()
    (tmp_path / "checkpoints" / "step_000001" / "manifest.json").write_text('{"format": "chuanliu-checkpoint/1"')
    with pytest.raises(CheckpointError, match="all 2 committed checkpoints .* are corrupt.*new directory"):
        load_fresh(tmp_path)
    events = [e for e in read_events(tmp_path) if e["kind"] == "checkpoint_fallback"]
    assert len(events) == 2 and all(e["used"] is None for e in events)


def test_nothing_to_resume(tmp_path):
    assert load_fresh(tmp_path)[0] is None
    save_steps(tmp_path, [1])
    assert load_fresh(tmp_path, mode="off")[0] is None  # off does nothing at all


def test_explicit_resume_paths(tmp_path):
    save_steps(tmp_path, [1, 2])
    ckpt_dir = tmp_path / "checkpoints"
    other = tmp_path / "other_run"
    assert load_fresh(other, resume=str(ckpt_dir / "step_000001"))[0].step == 1
    assert load_fresh(other, resume=str(ckpt_dir))[0].step == 2
    with pytest.raises(CheckpointError, match="does not exist: expected a directory holding manifest.json"):
        load_fresh(other, resume=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_fresh(other, resume=str(tmp_path / "empty"))
    flip_byte(ckpt_dir / "step_000002")
    with pytest.raises(CheckpointError, match="step_000002 is refused .*sha256"):  # named: no silent fallback
        load_fresh(other, resume=str(ckpt_dir / "step_000002"))
    assert (ckpt_dir / "step_000002").exists()


def test_fingerprint_mismatch_names_the_keys_and_deletes_nothing(tmp_path):
    save_steps(tmp_path, [1])
    ckpt = tmp_path / "checkpoints" / "step_000001"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    changed = {"model": {"dim": 16, "n_layers": 2}, "seq_len": 16}
    mgr = manager(tmp_path, fingerprint=changed)
    with pytest.raises(CheckpointError, match=r"model\.dim: checkpoint 8, this run 16.*fault\.checkpoint\.dir"):
        mgr.load(state(*build()[:2]))
    with pytest.raises(CheckpointError, match="resume=never but .* already holds checkpoints"):
        manager(tmp_path, fingerprint=changed, resume="never")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_never_overwrites_an_existing_checkpoint(tmp_path):
    save_steps(tmp_path, [1])
    model, opt, _ = build(seed=5)
    with pytest.raises(CheckpointError, match="already exists"):
        manager(tmp_path).save(1, sharded=state(model, opt), per_rank={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_dir_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoints to .*locked.*set fault.checkpoint.dir"):
            manager(tmp_path, dir=str(locked))
    finally:
        locked.chmod(0o700)


def test_probe_failure_is_a_clear_error(tmp_path, monkeypatch):  # the chmod test's check, also run as root
    def denied(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(CheckpointError, match=r"ckpts \(Permission denied\); set fault.checkpoint.dir to a writable"):
        manager(tmp_path, dir=str(tmp_path / "ckpts"))


def test_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("data")
    with pytest.raises(CheckpointError, match=r"afile \(it exists and is not a directory\); set fault"):
        manager(tmp_path, dir=str(tmp_path / "afile"))
    with pytest.raises(CheckpointError, match=r"afile/sub \(Not a directory\); set fault.checkpoint.dir"):
        manager(tmp_path, dir=str(tmp_path / "afile" / "sub"))
    assert (tmp_path / "afile").read_text() == "data"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_is_bit_exact(tmp_path, mode):
    total, cut = 6, 3
    model, opt, sched = build()
    reference = [train_step(model, opt, sched) for _ in range(total)]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = build()
    losses = [train_step(model, opt, sched) for _ in range(cut)]
    mgr = manager(tmp_path, mode=mode)
    mgr.save(cut, sharded=state(model, opt), per_rank={"sched": sched.state_dict(), "rng": rng_state()})
    mgr.close()
    torch.randn(100)  # move the generator on: only a restored RNG state gives the same data

    model, opt, sched = build(seed=99)
    sd = state(model, opt)
    loaded = manager(tmp_path, mode=mode).load(sd)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched.load_state_dict(loaded.per_rank["sched"])
    set_rng_state(loaded.per_rank["rng"])
    losses += [train_step(model, opt, sched) for _ in range(total - loaded.step)]
    assert all(torch.equal(a, b) for a, b in zip(reference, losses))
    assert_same(final, model.state_dict())


def test_rng_state_round_trip():
    saved = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(saved)
    assert_same(draws, (random.random(), np.random.rand(), torch.rand(3)))


def test_due():
    cfg = CheckpointConfig(mode="sync", every=5)
    mgr = CheckpointManager.__new__(CheckpointManager)  # due() needs only the config
    mgr.cfg = cfg
    assert [s for s in range(1, 13) if mgr.due(s, 12)] == [5, 10, 12]
    mgr.cfg = CheckpointConfig(mode="off", every=5)
    assert not any(mgr.due(s, 12) for s in range(1, 13))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "maybe"}, "use one of off, sync, async"),
    ({"mode": "sync", "every": 0}, "must be >= 1"),
    ({"mode": "sync", "keep": 0}, "must be >= 1"),
    ({"mode": "sync", "resume": ""}, "resume is empty"),
    ({"mode": "off", "resume": "/some/ckpt"}, "needs fault.checkpoint.mode=sync or async"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointConfig(**kwargs)
    assert CheckpointConfig(mode="async").enabled and not CheckpointConfig().enabled


# ---- checkpoints that cannot run code: tests/unit/test_checkpoint_attacks.py ----------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_per_rank_state_that_cannot_load_safely_is_refused_at_save(tmp_path):
    model, opt, _ = build()
    mgr = manager(tmp_path)
    with pytest.raises(CheckpointError, match="rank 0 .*WeightsUnpickler|rank 0 .*Unsupported|rank 0 .*weights_only"):
        mgr.save(1, sharded=state(model, opt), per_rank={"obj": _RunsCode()})
    assert newest_committed(mgr.dir) == []


def test_rng_state_is_tensors_and_plain_types():
    import io

    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    np.random.seed(3)
    expected = np.random.rand(4)
    np.random.seed(5)
    set_rng_state(restored)  # back to the state captured above, whatever it was
    np.random.seed(3)
    assert np.array_equal(np.random.rand(4), expected)


# ---- checksums, progress and slow I/O -----------------------------------------------------------------------


def test_checksums_computed_while_writing_match_the_files(tmp_path):
    from fault.checkpoint import MANIFEST, file_sha256

    save_steps(tmp_path, [1])
    ckpt = newest_committed(tmp_path / "checkpoints")[0]
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {".metadata", "rank00000.pt", "__0_0.distcp"} <= set(files)
    for name, info in files.items():
        assert info["sha256"] == file_sha256(ckpt / name) and info["bytes"] == (ckpt / name).stat().st_size


def test_a_slow_save_reports_progress_all_along_and_commits(tmp_path):
    from fault.progress import Progress

    model, opt, _ = build()
    progress = Progress()
    mgr = CheckpointManager(CheckpointConfig(mode="sync"), run_dir=tmp_path, rank=0, world_size=1,
                            fingerprint=FP, events=EventLog(tmp_path, 0), progress=progress)
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch():  # what the watchdog thread sees: the progress counter, every 20 ms
        while not stop.wait(0.02):
            seen.append((time.monotonic(), progress.changes))
    threading.Thread(target=watch, daemon=True).start()

    def throttle(nbytes, moving):  # 2 MB/s, sliced like chaos' slow_io
        remaining = nbytes / 2e6
        while remaining > 0:
            time.sleep(min(remaining, 0.01))
            remaining -= 0.01
            moving()
    t0 = time.monotonic()
    mgr.save(1, sharded=state(model, opt), per_rank={"step": 1}, throttle=throttle)
    stop.set()
    assert time.monotonic() - t0 > 0.05  # the throttle really slowed the save
    longest_still, changed_at = 0.0, seen[0][0]
    for (t, c), (_, before) in zip(seen[1:], seen):
        if c != before:
            changed_at = t
        longest_still = max(longest_still, t - changed_at)
    assert len(seen) > 3 and longest_still < 0.5, longest_still
    assert newest_committed(mgr.dir)[0].name == "step_000001"


def test_a_failed_local_write_commits_nothing_and_names_the_rank(tmp_path, monkeypatch):
    from fault import checkpoint

    model, opt, _ = build()
    mgr = manager(tmp_path)
    mgr.save(1, sharded=state(model, opt), per_rank={"step": 1})

    def full(self, path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.SaveIO, "write_file", full)
    with pytest.raises(CheckpointError, match=r"step 2 was not committed: .*rank 0 .*No space left"):
        mgr.save(2, sharded=state(model, opt), per_rank={"step": 2})
    monkeypatch.undo()
    mgr.save(3, sharded=state(model, opt), per_rank={"step": 3})  # the next save goes through
    assert [p.name for p in newest_committed(mgr.dir)] == ["step_000003", "step_000001"]


# ---- the loop's Checkpointer: Stateful parts ----------------------------------------------------------------------
class _Position:
    """A data loader's stand-in: a position it saves and restores (torch's Stateful shape)."""

    def __init__(self, at: int = 0):
        self.at = at

    def state_dict(self) -> dict:
        return {"at": self.at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.at = state_dict["at"]


def _parts(model, opt, sched, position, primed: list):
    from fault.checkpoint import CheckpointParts, FnState

    def load_sharded(sd):
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def prime():  # draws from the generators, as an engine's priming step may: the RNG must be restored after it
        primed.append(torch.rand(1).item())
    return CheckpointParts(sharded=lambda: state(model, opt), load_sharded=load_sharded,
                           local={"engine": FnState(sched.state_dict, sched.load_state_dict), "loader": position},
                           after_load=prime)


def test_the_checkpointer_saves_when_due_and_puts_every_part_back_rng_last(tmp_path):
    from fault.checkpoint import Checkpointer

    model, opt, sched = build()
    position, primed = _Position(), []
    ckpt = Checkpointer(manager(tmp_path, every=2), _parts(model, opt, sched, position, primed))
    blocked = []
    for step in (1, 2, 3):
        train_step(model, opt, sched)
        position.at = 10 * step
        blocked.append(ckpt.save(step, total_steps=3))
        if step == 2:
            expected = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "rng": torch.get_rng_state(),
                        "lr": sched.get_last_lr()}
    ckpt.close()
    assert blocked[0] is None and blocked[1] is not None and blocked[2] is not None  # step 3 is the last: saved
    model2, opt2, sched2 = build(seed=7)
    position2, primed2 = _Position(), []
    loaded = Checkpointer(manager(tmp_path, resume=str(tmp_path / "checkpoints" / "step_000002")),
                          _parts(model2, opt2, sched2, position2, primed2)).load()
    assert loaded.step == 2 and position2.at == 20 and sched2.get_last_lr() == expected["lr"] and len(primed2) == 1
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected["weights"][k])
    assert torch.equal(torch.get_rng_state(), expected["rng"])  # restored after the priming step drew from it

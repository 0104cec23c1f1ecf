"""Fault tolerance without processes: chaos schedules, the watchdog's blame and loss checks, the drill arithmetic."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from experiments.drill import merge_overrides, split_args
from fault.chaos import Chaos, ChaosConfig, FaultSpec, corrupt_newest
from fault.drill import compare_losses, drill_report, final_losses
from fault.events import EventLog, read_events
from fault.watchdog import NonFiniteLoss, Watchdog, WatchdogConfig, check_losses, lagging_rank


def test_schedule_is_seeded_and_resolves_ranks():
    cfg = ChaosConfig(mtbf_steps=5, kinds=["kill", "nan_loss"], max_faults=3, seed=7)
    a = cfg.schedule(total_steps=40, world_size=4)
    b = cfg.schedule(total_steps=40, world_size=4)
    assert [f.__dict__ for f in a] == [f.__dict__ for f in b] and len(a) == 3
    assert all(0 <= f.rank < 4 and 2 <= f.step < 40 for f in a)
    assert [f.step for f in a] == sorted(f.step for f in a)
    other = ChaosConfig(mtbf_steps=5, kinds=["kill", "nan_loss"], max_faults=3, seed=8).schedule(total_steps=40,
                                                                                             world_size=4)
    assert [f.__dict__ for f in other] != [f.__dict__ for f in a]


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        FaultSpec(kind="meteor", step=3)
    with pytest.raises(ValueError, match="targets rank 3 but the job has 2"):
        ChaosConfig(faults=[FaultSpec(kind="kill", step=3, rank=3)]).schedule(total_steps=10, world_size=2)
    with pytest.raises(ValueError, match="mtbf_steps"):
        ChaosConfig(mtbf_steps=0)


def test_a_fault_fires_once_across_restarts(tmp_path):
    events = EventLog(tmp_path, rank=0)
    cfg = ChaosConfig(faults=[FaultSpec(kind="exception", step=3, rank=0)])
    chaos = Chaos(cfg, rank=0, world_size=1, total_steps=10, events=events, checkpoint_dir=None)
    chaos.step_start(2)
    with pytest.raises(RuntimeError, match="injected exception on rank 0 at step 3"):
        chaos.step_start(3)
    assert [e["kind"] for e in read_events(tmp_path)] == ["fault_injected"]
    again = Chaos(cfg, rank=0, world_size=1, total_steps=10, events=events, checkpoint_dir=None)  # a restart
    again.step_start(3)  # does not raise again
    assert again.pending == []


def test_nan_fault_poisons_only_its_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    chaos = Chaos(ChaosConfig(faults=[FaultSpec(kind="nan_loss", step=2, rank=0)]), rank=0, world_size=1,
                  total_steps=5, events=EventLog(tmp_path, 0), checkpoint_dir=None)
    chaos.attach(model)
    x = torch.ones(1, 2)
    chaos.step_start(1)
    assert torch.isfinite(model(x)).all()
    chaos.step_start(2)
    assert torch.isnan(model(x)).all()
    chaos.step_start(3)
    assert torch.isfinite(model(x)).all()


def test_slow_fault_stretches_forward(tmp_path):
    chaos = Chaos(ChaosConfig(faults=[FaultSpec(kind="slow", step=1, rank=0, slow_factor=3.0, slow_steps=1)]),
                  rank=0, world_size=1, total_steps=5, events=EventLog(tmp_path, 0), checkpoint_dir=None)
    chaos.step_start(1)
    t0 = time.perf_counter()
    with chaos.forward():
        time.sleep(0.05)
    assert time.perf_counter() - t0 >= 0.14  # 0.05 s of work + 2 x 0.05 s injected
    chaos.step_start(2)  # slow_steps=1: over
    t0 = time.perf_counter()
    with chaos.forward():
        time.sleep(0.05)
    assert time.perf_counter() - t0 < 0.1


def test_corrupt_newest_flips_bytes_of_the_newest_committed(tmp_path):
    for step in (5, 10):
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        (d / "manifest.json").write_text("{}")
        (d / "data.bin").write_bytes(bytes(1000))
    (tmp_path / ".tmp-step_000015").mkdir()  # uncommitted: never the target
    target = corrupt_newest(tmp_path)
    assert target == tmp_path / "step_000010" / "data.bin"
    assert target.read_bytes() != bytes(1000)
    assert (tmp_path / "step_000005" / "data.bin").read_bytes() == bytes(1000)
    assert corrupt_newest(tmp_path / "missing") is None


def test_lagging_rank_is_furthest_behind():
    beats = {0: {"step": 7, "phase": "forward_backward", "time": 10.0},
             1: {"step": 7, "phase": "start", "time": 9.0},  # never got past the start of step 7
             2: {"step": 7, "phase": "forward_backward", "time": 10.1}}
    assert lagging_rank(beats) == 1
    beats[3] = {"step": 6, "phase": "done", "time": 8.0}
    assert lagging_rank(beats) == 3
    assert lagging_rank({}) is None


def test_check_losses_names_the_rank(tmp_path):
    events = EventLog(tmp_path, rank=0)
    check_losses(4, [1.0, 2.0], events, rank=0)
    with pytest.raises(NonFiniteLoss, match=r"rank\(s\) \[1\]"):
        check_losses(5, [1.0, math.nan], events, rank=0)
    (e,) = read_events(tmp_path)
    assert e["cause"] == "nan_loss" and e["blamed_rank"] == 1 and e["step"] == 5


def test_watchdog_finds_a_straggler(tmp_path):
    events = EventLog(tmp_path, rank=0)
    cfg = WatchdogConfig(straggler_factor=1.5, straggler_window=3)
    dogs = [Watchdog(cfg, run_dir=tmp_path, rank=r, world_size=3, events=EventLog(tmp_path, r)) for r in range(3)]
    for step in range(1, 4):
        for r, dog in enumerate(dogs):
            dog.beat(step, "done", forward_s=0.30 if r == 2 else 0.10)
    dogs[0]._check_stragglers()
    dogs[0]._check_stragglers()  # reported once
    found = [e for e in read_events(tmp_path) if e["kind"] == "detected"]
    assert len(found) == 1 and found[0]["blamed_rank"] == 2 and found[0]["ratio"] == pytest.approx(3.0)
    assert events.path.exists()


def test_watchdog_config_validation():
    with pytest.raises(ValueError, match="straggler_factor"):
        WatchdogConfig(straggler_factor=1.0)
    with pytest.raises(ValueError, match="hang_timeout_s"):
        WatchdogConfig(hang_timeout_s=0)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_drill_report_from_files(tmp_path):
    """A kill at step 7 after a checkpoint at step 5: 1 step lost (6), none of them committed."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    losses = {s: 10.0 / s for s in range(1, 11)}
    _write(ref / "metrics.jsonl", [{"step": s, "time": s, "train/loss": v, "perf/step_s": 1.0}
                                   for s, v in losses.items()])
    rows = [{"step": s, "time": 100 + s, "train/loss": losses[s], "perf/step_s": 1.0} for s in range(1, 7)]
    rows += [{"step": s, "time": 200 + s, "train/loss": losses[s], "perf/step_s": 1.0} for s in range(6, 11)]
    _write(run / "metrics.jsonl", rows)
    ev = [{"time": 100.0, "kind": "start", "restart": 0, "step": 0, "rank": 0},
          {"time": 105.5, "kind": "checkpoint_commit", "restart": 0, "step": 5, "rank": 0},
          {"time": 107.0, "kind": "fault_injected", "restart": 0, "fault": "kill", "fault_id": 0, "step": 7,
           "target_rank": 1, "rank": 1, "iso": "t"},
          {"time": 107.4, "kind": "detected", "restart": 0, "cause": "terminated", "rank": 0, "blamed_rank": None},
          {"time": 199.0, "kind": "start", "restart": 1, "step": 5, "rank": 0, "resumed_from": "x/step_000005"},
          {"time": 206.0, "kind": "step_done", "restart": 1, "step": 6, "rank": 0},
          {"time": 211.0, "kind": "finish", "restart": 1, "step": 10, "rank": 0}]
    _write(run / "events.jsonl", ev)
    report = drill_report(run, reference_dir=ref, wall_s=120.0)
    (f,) = report["faults"]
    assert f["detect_s"] == pytest.approx(0.4) and f["detected_cause"] == "terminated"
    assert f["recover_s"] == pytest.approx(206.0 - 107.4)
    assert f["steps_lost"] == 1 and f["committed_steps_lost"] == 0 and f["resumed_from_step"] == 5
    assert report["loss"]["bit_exact"] and report["completed"] and report["restarts"] == 1
    assert report["ettr"] == pytest.approx(10 / 120)
    assert all(report["goals"].values())


def test_compare_losses_flags_any_difference():
    ref = {1: 2.0, 2: 1.5, 3: 1.25}
    assert compare_losses(dict(ref), ref)["bit_exact"]
    off = compare_losses({1: 2.0, 2: 1.5 + 1e-7, 3: 1.25}, ref)
    assert not off["bit_exact"] and off["mismatched_steps"] == [2]
    assert not compare_losses({1: 2.0}, ref)["bit_exact"]  # a missing step is not a match
    assert final_losses([{"step": 1, "time": 2, "train/loss": 3.0}, {"step": 1, "time": 1, "train/loss": 4.0}]) \
        == {1: 3.0}


def test_drill_arguments_split_and_user_overrides_win():
    cfg, overrides = split_args(["drill.nproc=4", "fault/chaos=kill_rank", "train.steps=12"])
    assert cfg.nproc == 4
    assert "train.steps=12" in overrides and "train.steps=30" not in overrides
    assert "fault/checkpoint=sync" in overrides
    assert merge_overrides(["a=1", "b=2"], ["+b=3"]) == ["a=1", "+b=3"]
    with pytest.raises(SystemExit, match="drill.nprocs is not a known key"):
        split_args(["drill.nprocs=4"])


def test_drill_report_is_logged_to_wandb_offline(tmp_path):
    from experiments.drill import log_to_wandb

    report = {"faults": [{"fault": "kill", "step": 8, "target_rank": 1, "detected_cause": "terminated",
                          "detect_s": 0.1, "recover_s": 4.0, "steps_lost": 1, "committed_steps_lost": 0}],
              "ettr": 0.2, "restarts": 1, "wall_s": 13.0, "completed": True, "loss": {"bit_exact": True}}
    log_to_wandb(report, tmp_path, "offline", "kill_rank")
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))

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
from fault.watchdog import NonFiniteLoss, Watchdog, WatchdogConfig, blame, check_losses


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


def _beat(step=8, phase="forward_backward", micro=1, state="running", **groups):
    """A heartbeat; groups: name=(enqueued, completed) collective counts."""
    return {"step": step, "phase": phase, "micro": micro, "state": state, "host": "h", "pid": 1, "time": 0.0,
            "collectives": {name: {"desc": "default_pg" if name == "g0" else name, "enqueued": e, "completed": c,
                                   "started": -1, "pending": {"op": "gloo:all_reduce", "bytes": 4 << 20}
                                   if e > c else None}
                            for name, (e, c) in groups.items()}}


def test_blame_a_rank_that_never_entered_the_collective_not_the_first_to_start_the_step():
    # The case the old (step, phase, heartbeat time) rule got wrong: every rank is at step 8 forward_backward;
    # ranks 0, 1, 3 wait in collective 57, rank 2 never entered it (it hung inside its forward).
    beats = {r: _beat(g0=(57, 56)) for r in (0, 1, 3)}
    beats[2] = _beat(g0=(56, 56))
    v = blame(beats, frozen=set())
    assert v.blamed == [2] and v.rule == "not_in_collective"
    assert v.waiting_in["seq"] == 57 and v.waiting_in["op"] == "gloo:all_reduce" and v.waiting_ranks == [0, 1, 3]
    # DDP issues several buckets asynchronously: healthy ranks may be further ahead than one collective
    beats[0] = _beat(g0=(59, 56))
    assert blame(beats, frozen=set()).blamed == [2]


def test_blame_a_frozen_rank_first_but_never_one_that_left_on_purpose():
    beats = {r: _beat(g0=(57, 56)) for r in range(4)}  # all entered: the counters alone cannot tell
    assert blame(beats, frozen=set()).blamed == [] and blame(beats, frozen=set()).rule == "unknown"
    v = blame(beats, frozen={1})
    assert v.blamed == [1] and v.rule == "frozen"
    beats[3]["state"] = "exiting"  # a watchdog that fired first stops beating: not a frozen process
    assert blame(beats, frozen={1, 3}).blamed == [1]


def test_blame_follows_the_waits_for_chain_to_its_end():
    # Hierarchical all-reduce on 2 nodes {0,1} {2,3}: rank 1 hangs; rank 0 waits for it in the intra-node group
    # and so never enters the leaders' all-reduce, where rank 2 waits for rank 0. Rank 0 is not to blame.
    beats = {0: _beat(g0=(10, 10), intra0=(5, 4), leaders=(2, 2)), 1: _beat(g0=(10, 10), intra0=(4, 4)),
             2: _beat(g0=(10, 10), intra1=(5, 5), leaders=(3, 2)), 3: _beat(g0=(10, 10), intra1=(5, 5))}
    v = blame(beats, frozen=set())
    assert v.blamed == [1] and v.waiting_in["group"] == "intra0"


def test_blame_the_rank_furthest_behind_when_no_collective_is_pending():
    beats = {r: _beat(step=9, phase="optimizer", g0=(60, 60)) for r in range(3)}
    beats[1] = _beat(step=9, phase="forward_backward", g0=(60, 60))
    assert blame(beats, frozen=set()).blamed == [1] and blame(beats, frozen=set()).rule == "behind"


def test_a_stuck_checkpoint_group_blames_the_rank_stuck_in_io():
    beats = {r: _beat(step=10, phase="checkpoint", g0=(80, 80), checkpoint=(31, 30)) for r in (0, 2)}
    beats[1] = _beat(step=10, phase="checkpoint", g0=(80, 80), checkpoint=(30, 30))
    v = blame(beats, frozen=set())
    assert v.blamed == [1] and v.waiting_in["desc"] == "checkpoint"


def test_check_losses_names_the_rank(tmp_path):
    events = EventLog(tmp_path, rank=0)
    check_losses(4, [1.0, 2.0], events, rank=0)
    with pytest.raises(NonFiniteLoss, match=r"rank\(s\) \[1\]"):
        check_losses(5, [1.0, math.nan], events, rank=0)
    (e,) = read_events(tmp_path)
    assert e["cause"] == "nan_loss" and e["blamed_rank"] == 1 and e["step"] == 5


def test_check_losses_blames_where_a_pipeline_nan_began(tmp_path):
    """A pipeline replica shares one loss (ranks 0-3 all NaN); the stage whose output first went non-finite from
    finite input (rank 1, and rank 3 downstream of it in tp) is blamed, not the replica's first rank."""
    events = EventLog(tmp_path, rank=0)
    with pytest.raises(NonFiniteLoss, match=r"from finite input on rank\(s\) \[1, 3\]"):
        check_losses(2, [math.nan] * 4, events, rank=0, origins=[False, True, False, True])
    (e,) = read_events(tmp_path)
    assert e["blamed_rank"] == 1 and e["blamed_ranks"] == [1, 3]


def _straggler_run(tmp_path, times_of_rank, steps):
    cfg = WatchdogConfig(straggler_factor=1.5, straggler_window=3, straggler_windows=2)
    dogs = [Watchdog(cfg, run_dir=tmp_path, rank=r, world_size=3, events=EventLog(tmp_path, r)) for r in range(3)]
    found_at = None
    for step in range(1, steps + 1):
        for r, dog in enumerate(dogs):
            dog.beat(step, "done", compute_s=times_of_rank(r, step))
        dogs[0]._check_stragglers()
        if found_at is None and any(e["kind"] == "detected" for e in read_events(tmp_path)):
            found_at = step
    return found_at, [e for e in read_events(tmp_path) if e["kind"] == "detected"]


def test_a_persistent_slowdown_is_a_straggler_within_three_windows(tmp_path):
    # Rank 2 runs 2x slower from step 5 (mid-window 1); windows are steps 1-3 (first step skipped), 4-6, 7-9, ...
    found_at, found = _straggler_run(tmp_path, lambda r, s: 0.2 if r == 2 and s >= 5 else 0.1, steps=15)
    assert len(found) == 1 and found[0]["blamed_rank"] == 2 and found[0]["cause"] == "straggler"
    assert found[0]["ratio"] == pytest.approx(2.0) and "2.00x" in found[0]["detail"]
    assert found_at <= 4 + 3 * 3  # within three windows of the onset


def test_one_noisy_window_is_not_a_straggler(tmp_path):
    # A loaded host: rank 1 gets 2.5x slower for one window, rank 0 for another; neither persists.
    noisy = {(1, 5), (1, 6), (0, 10), (0, 11), (0, 12)}
    found_at, found = _straggler_run(tmp_path, lambda r, s: 0.25 if (r, s) in noisy else 0.1, steps=18)
    assert found == [] and found_at is None


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


def test_compute_timer_leaves_out_the_engines_parameter_gathers():
    """FSDP2 and ZeRO-3 wait for all-gathers in forward pre-hooks: time there is waiting on peers, not compute."""
    from fault.watchdog import ComputeTimer

    class Block(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)  # compute
            return x

    model = torch.nn.Sequential(Block(), Block())
    for block in model:  # what an engine installs: a pre-hook that waits for a gather
        block.register_forward_pre_hook(lambda m, args: time.sleep(0.1))
    timer = ComputeTimer(torch.device("cpu"))
    timer.exclude_engine_hooks(model)
    assert timer.hooked_modules == 2
    with timer():
        model(torch.zeros(1))
    measured = timer.take()
    assert 0.09 <= measured < 0.2, measured  # ~0.1 s of compute; the 0.2 s of waiting is left out
    model(torch.zeros(1))  # outside a timed forward the hooks record nothing
    assert timer.take() == 0.0


def test_random_hang_places_and_steps_are_drawn_from_the_seed():
    cfg = ChaosConfig(faults=[FaultSpec(kind="hang", step=None, rank=None, where="random") for _ in range(12)],
                      seed=11)
    a, b = cfg.schedule(total_steps=20, world_size=4), cfg.schedule(total_steps=20, world_size=4)
    assert [f.__dict__ for f in a] == [f.__dict__ for f in b]
    assert all(2 <= f.step < 20 and 0 <= f.rank < 4 and f.where != "random" for f in a)
    assert len({f.where for f in a}) >= 3  # the places vary
    with pytest.raises(ValueError, match="where='inside'"):
        FaultSpec(kind="hang", step=3, where="inside")
    with pytest.raises(ValueError, match="io_mb_s"):
        FaultSpec(kind="slow_io", step=3, io_mb_s=-1)


def test_a_peer_failure_wrapped_by_the_pipeline_is_still_a_peer_failure():
    """torch's pipelining re-raises a broken gloo p2p as RuntimeError("[Stage 0] failed to run forward ...") from
    the gloo error: the cause chain is read, so the rank is not blamed for its dead peer."""
    from experiments.trainer import peer_failure

    try:
        try:
            raise RuntimeError("[/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
        except RuntimeError as inner:
            raise RuntimeError("[Stage 0] failed to run forward: args=('Tensor(...)',)") from inner
    except RuntimeError as e:
        assert peer_failure(e)
    loop = ValueError("bad shape")
    loop.__context__ = loop  # a cycle ends the walk
    assert not peer_failure(loop)

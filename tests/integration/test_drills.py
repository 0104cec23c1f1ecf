"""Fault drills through the real entry points: torchrun (its elastic agent restarts the workers), 2 CPU ranks, the
tiny model, a checkpoint every 3 steps, one fault at step 8 on rank 1. Every drill must finish, detect its fault
with the right cause and rank, and reproduce the uninterrupted reference run's loss at every step, bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fault.drill import drill_report
from tests.helpers import REPO, free_port, read_jsonl, run_entry

HANG_TIMEOUT_S = 4.0
COMMON = ["train.steps=12", "fault/checkpoint=sync", "fault.checkpoint.every=3", "logging.wandb_mode=disabled",
          "logging.progress_bar=false", f"fault.watchdog.hang_timeout_s={HANG_TIMEOUT_S}",
          "fault.watchdog.poll_s=0.2", "fault.watchdog.straggler_window=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("drills") / "reference"
    proc = run_entry([*COMMON, f"hydra.run.dir={run_dir}"], torchrun_nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


AT_STEP_8_ON_RANK_1 = ("fault.chaos.faults.0.step=8", "fault.chaos.faults.0.rank=1")


def drill(tmp_path, reference, chaos: str, *extra: str, schedule=AT_STEP_8_ON_RANK_1) -> dict:
    out = tmp_path / chaos
    cmd = [sys.executable, "-m", "experiments.drill", f"fault/chaos={chaos}", *COMMON, *schedule, *extra,
           f"drill.reference_dir={reference}", f"drill.out={out}", "drill.wandb_mode=disabled",
           "drill.timeout_s=150", "drill.max_restarts=2"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert (out / "drill_report.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "drill_report.json").read_text())
    launcher = (out / "faulty" / "launcher.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + launcher[-4000:]
    assert report["loss"]["bit_exact"], (report["loss"], launcher[-3000:])
    assert report["completed"] and report["ettr"] > 0
    return report


def only_fault(report: dict) -> dict:
    (fault,) = report["faults"]
    return fault


def test_kill_rank_is_detected_and_resumed(tmp_path, reference):
    report = drill(tmp_path, reference, "kill_rank")
    f = only_fault(report)
    assert f["fault"] == "kill" and f["target_rank"] == 1 and f["restarted"]
    assert f["blamed_rank"] == 1  # a survivor saw rank 1's process gone
    assert f["detect_s"] < 10 and f["recover_s"] is not None
    assert f["resumed_from_step"] == 6 and f["steps_lost"] == 1 and f["committed_steps_lost"] == 0
    assert report["restarts"] == 1


def test_exception_is_detected_on_its_rank(tmp_path, reference):
    f = only_fault(drill(tmp_path, reference, "exception"))
    assert f["detected_cause"] == "exception" and f["blamed_rank"] == 1 and f["detect_s"] < 10
    assert f["resumed_from_step"] == 6


def test_nan_loss_is_caught_before_the_optimizer_step(tmp_path, reference):
    f = only_fault(drill(tmp_path, reference, "nan_loss"))
    assert f["detected_cause"] == "nan_loss" and f["blamed_rank"] == 1
    assert f["resumed_from_step"] == 6 and f["steps_lost"] == 1


def test_hang_is_found_by_the_watchdog_not_the_collective_timeout(tmp_path, reference):
    f = only_fault(drill(tmp_path, reference, "hang_rank"))
    assert f["detected_cause"] == "hang" and f["blamed_rank"] == 1
    assert HANG_TIMEOUT_S <= f["detect_s"] < 2 * HANG_TIMEOUT_S


def test_slow_rank_is_reported_as_a_straggler_without_restart(tmp_path, reference):
    # A 3x slowdown from step 5 (windows of 3 steps: 4-6, 7-9, 10-12); it must persist over 2 windows to count.
    # With 2 ranks the "median of the others" is one rank whose own speed moves 10-20% on a loaded 2-core host
    # (a 2x fault measured 1.6-1.9x here and fell under the 1.5 factor in a CI window); 2x slowdowns on 4 ranks are
    # measured in experiments/bench_localisation.py (5 of 5 named, 0 false detections in 10 clean runs).
    report = drill(tmp_path, reference, "slow_rank", "fault.chaos.faults.0.slow_factor=3.0",
                   "fault.chaos.faults.0.step=5", "fault.watchdog.straggler_window=3", schedule=("fault.chaos.faults.0.rank=1",))
    f = only_fault(report)
    assert f["detected_cause"] == "straggler" and f["blamed_rank"] == 1 and not f["restarted"], f
    assert report["restarts"] == 0
    events = read_jsonl(tmp_path / "slow_rank" / "faulty" / "events.jsonl")
    (found,) = [e for e in events if e["cause" if "cause" in e else "kind"] == "straggler"]
    assert found["window"] <= (5 - 1) // 3 + 2  # within 3 windows of the onset


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    report = drill(tmp_path, reference, "corrupt_checkpoint")
    f = only_fault(report)
    assert f["resumed_from_step"] == 3 and f["committed_steps_lost"] == 3  # step 6 was corrupt
    assert report["fallbacks"] and "step_000006" in report["fallbacks"][0]["skipped"]
    ckpts = {p.name.split(".")[0] for p in (tmp_path / "corrupt_checkpoint" / "faulty" / "checkpoints").iterdir()}
    assert "step_000006" in ckpts  # renamed aside, kept for inspection, never deleted


def test_kill_mid_save_never_exposes_a_partial_checkpoint(tmp_path, reference):
    report = drill(tmp_path, reference, "kill_mid_save")
    f = only_fault(report)
    assert f["step"] == 9 and f["resumed_from_step"] == 6  # the step-9 save died before its commit
    assert f["detected_cause"] in ("terminated", "collective_failure") and f["blamed_rank"] == 1
    run = tmp_path / "kill_mid_save" / "faulty"
    commits = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["kind"] == "checkpoint_commit"]
    assert commits.count(9) == 1  # committed once, by the restarted job


def test_mtbf_schedule_survives_several_faults(tmp_path, reference):
    report = drill(tmp_path, reference, "mtbf", "fault.chaos.mtbf_steps=4", "fault.chaos.max_faults=2",
                   "fault.chaos.kinds=[kill,exception]", "fault.chaos.seed=3", "drill.max_restarts=3",
                   schedule=())
    assert len(report["faults"]) == 2 and report["restarts"] == 2
    assert all(f["committed_steps_lost"] == 0 for f in report["faults"])


def test_four_ranks_async_checkpoints_resume_bit_exact(tmp_path):
    """With 3+ ranks a float all-reduce depends on the bucket layout: the resumed job must reduce its first step in
    the layout an uninterrupted run has by then (DDPEngine.prime), and async saves must commit and load."""
    out = tmp_path / "four"
    cmd = [sys.executable, "-m", "experiments.drill", "fault/chaos=kill_rank", *COMMON, "fault/checkpoint=async",
           "fault.chaos.faults.0.step=8", "fault.chaos.faults.0.rank=2", "drill.nproc=4", f"drill.out={out}",
           "drill.wandb_mode=disabled", "drill.timeout_s=200"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=450)
    report = json.loads((out / "drill_report.json").read_text())
    assert proc.returncode == 0 and report["completed"], proc.stdout[-3000:]
    assert report["loss"]["bit_exact"], report["loss"]
    f = only_fault(report)
    events = read_jsonl(out / "faulty" / "events.jsonl")
    # Resumed from the newest checkpoint the first attempt committed: step 6 when its async write finished before
    # the kill at step 8 (a quiet host), step 3 when it was still in flight (seen under load).
    committed = [e["step"] for e in events if e["kind"] == "checkpoint_commit" and e["restart"] == 0]
    assert committed and f["resumed_from_step"] == max(committed) and f["target_rank"] == 2, (committed, f)
    assert all(e["block_s"] < e["write_s"] for e in events if e["kind"] == "checkpoint_commit")


def test_two_agents_as_two_nodes_restart_together(tmp_path, reference):
    """Multi-node as far as one machine allows: two torchrun agents (c10d rendezvous, one worker each) stand for
    two nodes. A rank killed on one "node" makes both agents restart and the job resumes bit-exact."""
    run_dir, port = tmp_path / "two_nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}", "--max-restarts=2",
           "-m", "experiments.train", *COMMON, "fault/chaos=kill_rank", *AT_STEP_8_ON_RANK_1,
           f"hydra.run.dir={run_dir}"]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=180)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert all(a.returncode == 0 for a in agents), outputs[0][-3000:] + outputs[1][-3000:]
    report = drill_report(run_dir, reference_dir=reference)
    f = only_fault(report)
    assert f["restarted"] and f["resumed_from_step"] == 6 and f["detect_s"] < 10
    assert report["restarts"] == 1 and report["loss"]["bit_exact"], report["loss"]


# ---- blame on 4 ranks: a hang anywhere names the rank at fault ------------------------------------------------

FOUR = [*COMMON, "fault.watchdog.poll_s=0.25"]


@pytest.fixture(scope="module")
def reference4(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("drills4") / "reference"
    proc = run_entry([*FOUR, f"hydra.run.dir={run_dir}"], torchrun_nproc=4, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def drill4(tmp_path, reference4, chaos: str, *schedule: str) -> tuple[dict, list[dict]]:
    out = tmp_path / chaos
    cmd = [sys.executable, "-m", "experiments.drill", f"fault/chaos={chaos}", *FOUR, *schedule, "drill.nproc=4",
           f"drill.reference_dir={reference4}", f"drill.out={out}", "drill.wandb_mode=disabled",
           "drill.timeout_s=200", "drill.max_restarts=2"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=260)
    launcher = (out / "faulty" / "launcher.log").read_text() if (out / "faulty" / "launcher.log").exists() else ""
    assert (out / "drill_report.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "drill_report.json").read_text())
    assert proc.returncode == 0 and report["completed"], proc.stdout[-3000:] + launcher[-4000:]
    assert report["loss"]["bit_exact"], report["loss"]
    detections = [e for e in read_jsonl(out / "faulty" / "events.jsonl") if e["kind"] == "detected"]
    return report, detections


def assert_blamed(report: dict, detections: list[dict], target: int, cause: str = "hang") -> dict:
    f = only_fault(report)
    assert f["target_rank"] == target and f["detected_cause"] == cause and f["blamed_rank"] == target, f
    # Peers may stop progressing before the culprit's strike is recorded (they wait for it in a collective).
    assert 0 < f["detect_s"] < 1.5 * HANG_TIMEOUT_S, f
    hangs = [e for e in detections if e["cause"] == cause]
    # Every rank whose watchdog fired reached the same verdict (the culprit's own watchdog included).
    assert hangs and all(e["blamed_ranks"] == [target] for e in hangs), [e["detail"] for e in hangs]
    assert not [e for e in detections if e["cause"] == "straggler"], "a healthy rank was called a straggler"
    return f


@pytest.mark.parametrize("where,rank", [("forward", 2), ("allreduce", 1), ("optimizer", 3), ("sigstop", 0)])
def test_a_hang_is_blamed_on_its_rank_wherever_it_happens(tmp_path, reference4, where, rank):
    report, detections = drill4(tmp_path, reference4, "hang_rank", f"fault.chaos.faults.0.where={where}",
                                "fault.chaos.faults.0.step=8", f"fault.chaos.faults.0.rank={rank}")
    f = assert_blamed(report, detections, rank)
    hang = next(e for e in detections if e["cause"] == "hang")
    assert hang["rule"] == ("frozen" if where == "sigstop" else "not_in_collective")
    if where != "sigstop":  # the healthy ranks wait in a training collective the culprit never entered
        assert hang["waiting_in"]["desc"] == "default_pg" and hang["waiting_in"]["op"].endswith("all_reduce")
    assert f["resumed_from_step"] == 6


def test_a_randomised_hang_on_four_ranks_is_blamed_on_its_rank(tmp_path, reference4):
    seed = int.from_bytes(os.urandom(2), "little")  # a new drill every run; the seed reproduces it
    report, detections = drill4(tmp_path, reference4, "hang_rank", f"fault.chaos.seed={seed}",
                                "fault.chaos.faults.0.where=random", "fault.chaos.faults.0.step=null",
                                "fault.chaos.faults.0.rank=null")
    f = only_fault(report)
    assert f["blamed_rank"] == f["target_rank"], (seed, f)
    assert_blamed(report, detections, f["target_rank"])


def test_a_stuck_checkpoint_write_is_reported_as_a_stuck_checkpoint_with_its_rank(tmp_path, reference4):
    report, detections = drill4(tmp_path, reference4, "slow_io", "fault.chaos.faults.0.io_mb_s=0",
                                "fault.chaos.faults.0.step=6", "fault.chaos.faults.0.rank=2")
    assert_blamed(report, detections, 2, cause="checkpoint_hang")
    hang = next(e for e in detections if e["cause"] == "checkpoint_hang")
    assert hang["waiting_in"]["desc"] == "checkpoint"


def test_a_slow_save_longer_than_the_hang_timeout_is_not_a_hang(tmp_path, reference):
    # Rank 1 writes its share of the step-6 checkpoint as if it were 300x bigger at 200 MB/s (about 13 s, three
    # hang timeouts); rank 0 finishes early and waits for it in the save's gather, seeing rank 1 still progress.
    report = drill(tmp_path, reference, "slow_io", "fault.chaos.faults.0.io_mb_s=200",
                   "fault.chaos.faults.0.io_size_factor=300", schedule=("fault.chaos.faults.0.step=6",
                                                                         "fault.chaos.faults.0.rank=1"))
    events = read_jsonl(tmp_path / "slow_io" / "faulty" / "events.jsonl")
    assert not [e for e in events if e["kind"] == "detected"], [e.get("detail") for e in events]
    assert report["restarts"] == 0
    (save,) = [e for e in events if e["kind"] == "checkpoint_commit" and e["step"] == 6]
    assert save["write_s"] > 2 * HANG_TIMEOUT_S

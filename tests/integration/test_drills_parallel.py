"""A fault drill on a model-parallel job, through the real entry point: tp=2 x pp=2 on 4 CPU ranks (the tiny model
with 4 layers, 1F1B), rank 3 (second pipeline stage, second tensor shard) hangs inside its forward pass.

The most informative drill there: the hang's hook must find a block in a pipeline stage (its layers are a
ModuleDict of the ones it holds), the watchdog must blame rank 3 although its tensor-parallel peer waits in a
collective and the first stage waits in the schedule's p2p receives (which the flight recorder does not keep), and
the restarted job must resume from the pp/tp checkpoint and reproduce the reference's loss at every step.
8-rank tp x pp x dp drills of every kind are in docs/benchmarks/parallel_drills.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, read_jsonl

HANG_TIMEOUT_S = 4.0
PARALLEL = ["parallel.tp=2", "parallel.pp=2", "model.n_layers=4", "train.micro_batch_size=2",
            "train.grad_accum_steps=4"]
COMMON = [*PARALLEL, "train.steps=8", "fault/checkpoint=sync", "fault.checkpoint.every=3",
          "logging.wandb_mode=disabled", "logging.progress_bar=false",
          f"fault.watchdog.hang_timeout_s={HANG_TIMEOUT_S}", "fault.watchdog.poll_s=0.2"]


@pytest.mark.slow
def test_a_hang_inside_a_pipeline_stage_is_blamed_on_its_rank_and_resumed(tmp_path):
    out = tmp_path / "hang_forward"
    cmd = [sys.executable, "-m", "experiments.drill", "fault/chaos=hang_rank", *COMMON,
           "fault.chaos.faults.0.where=forward", "fault.chaos.faults.0.step=5", "fault.chaos.faults.0.rank=3",
           "drill.nproc=4", f"drill.out={out}", "drill.wandb_mode=disabled", "drill.timeout_s=100",
           "drill.max_restarts=1"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    launcher = (out / "faulty" / "launcher.log").read_text() if (out / "faulty" / "launcher.log").exists() else ""
    assert (out / "drill_report.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "drill_report.json").read_text())
    assert proc.returncode == 0 and report["completed"], proc.stdout[-3000:] + launcher[-4000:]
    (f,) = report["faults"]
    assert f["fault"] == "hang" and f["target_rank"] == 3 and f["detected_cause"] == "hang", f
    assert f["blamed_rank"] == 3, f["detail"]
    # Peers may stop progressing a little before the culprit's strike is recorded (they wait for it already).
    assert 0 < f["detect_s"] < 2 * HANG_TIMEOUT_S, f
    assert f["resumed_from_step"] == 3 and f["committed_steps_lost"] == 0, f
    hangs = [e for e in read_jsonl(out / "faulty" / "events.jsonl") if e["kind"] == "detected"
             and e["cause"] == "hang"]
    assert hangs and all(e["blamed_ranks"] == [3] for e in hangs), [e["detail"] for e in hangs]
    # The same layout resumed: the loss continues bit for bit (the reference ran without faults).
    assert report["loss"]["bit_exact"], report["loss"]

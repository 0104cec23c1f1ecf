"""Each engine through the real entry points under torchrun (2 CPU ranks): it logs the knobs it used and ends
with identical replicas, and a fault drill (rank 1 killed at step 5, torchrun restarts the job, it resumes from the
step-4 checkpoint) continues with the same losses, bit for bit, as the uninterrupted reference run."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

ENGINES = ["fsdp2"]
COMMON = ["train.steps=6", "fault/checkpoint=sync", "fault.checkpoint.every=2", "logging.wandb_mode=disabled",
          "logging.progress_bar=false", "fault.chaos.faults.0.step=5", "fault.chaos.faults.0.rank=1"]


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_survives_a_killed_rank_bit_exact(tmp_path, engine):
    out = tmp_path / "drill"
    cmd = [sys.executable, "-m", "experiments.drill", "fault/chaos=kill_rank", f"engine={engine}", *COMMON,
           f"drill.out={out}", "drill.wandb_mode=disabled", "drill.timeout_s=200", "drill.max_restarts=1"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=260)
    assert (out / "drill_report.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "drill_report.json").read_text())
    launcher = (out / "faulty" / "launcher.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + launcher[-4000:]
    assert report["restarts"] == 1 and report["faults"][0]["resumed_from_step"] == 4
    assert report["loss"]["bit_exact"], (report["loss"], launcher[-3000:])
    for run in ("reference", "faulty"):
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["environment"]["engine"]["engine"] == engine
        assert summary["replicas"]["identical"]

"""Hydra multiruns through the real entry point: each job lands in its own directory with its own metrics, a
distributed sweep runs in lockstep on every rank, and the jobs of one sweep share a wandb group."""
import json
import subprocess
import sys

import yaml

from tests.helpers import REPO, run_entry


def _job_dirs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_a_preset_sweep_on_two_ranks_gives_each_job_its_own_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entry(["-m", "experiment=smoke", "train.steps=3", "train.summary_warmup_steps=1",
                      "comm/algorithm=flat", "comm/overlap=on,off", "logging=offline", f"hydra.sweep.dir={sweep}"],
                     torchrun_nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    for job, overlap in zip(jobs, ("on", "off")):
        assert f"comm/overlap={overlap}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["environment"]["world_size"] == 2
        assert summary["environment"]["overlap"] is (overlap == "on")
        assert "comm/exposed_s" in summary["median"]  # a hook ran, so exposed communication was measured
        assert (job / "train_rank1.log").exists() and (job / "checkpoints").is_dir()  # experiment=smoke: sync
        # Rank 0 alone runs wandb; the offline run carries the sweep's group name.
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1
        assert f"sweep-{sweep.name}" in (offline[0] / "logs" / "debug.log").read_text()

    # The report over this distributed sweep: exposed communication is measured, and overlap on vs off is the one
    # setting that differs, compared one-at-a-time.
    report_proc = subprocess.run([sys.executable, "-m", "analysis.report", str(sweep), "--wandb", "disabled"],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report_proc.returncode == 0, report_proc.stderr[-3000:]
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["comm/overlap=on", "comm/overlap=off"]
    assert all(row["exposed_comm_ms"] is not None and row["exposed_comm_ms"] >= 0 for row in report["rows"])
    assert [c["method"] for c in report["contributions"]] == ["one-at-a-time"]

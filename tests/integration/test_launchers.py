"""The same entry point under the other launchers (one machine, 2 CPU processes): Hydra's submitit launcher (the
Slurm path, run locally with submitit's local executor) and the DeepSpeed launcher."""
import json
import os
import shutil
import subprocess
import sys

from tests.helpers import REPO, free_port

STEPS = ["train.steps=3", "train.summary_warmup_steps=1", "logging=disabled", "logging.progress_bar=false"]


def _two_identical_replicas(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2 and summary["replicas"]["identical"]
    return summary


def test_hydra_submitit_launcher_runs_two_tasks_as_one_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=4", *STEPS, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _two_identical_replicas(sweep / "0")
    assert (sweep / "0" / "train_rank1.log").exists()  # the second task was rank 1 of the same process group


def test_deepspeed_launcher_runs_the_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [launcher, "--num_gpus=2", "--no_local_rank", f"--master_port={free_port()}", "--module", "experiments.train",
           "engine=deepspeed", *STEPS, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = _two_identical_replicas(run_dir)
    assert summary["environment"]["engine"]["engine"] == "deepspeed"

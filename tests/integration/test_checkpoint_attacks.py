"""Tampered checkpoints and shared directories through the real entry points (experiments.train, experiments.quality).

The unit tests (tests/unit/test_checkpoint_attacks.py) cover every attack on the manager; these check that a user's
resume and a model-only reader get the same protection: no code runs, the job resumes from the last good
checkpoint (its next step's loss equal to the uninterrupted run's), and a second job on one directory refuses.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from fault.checkpoint import MANIFEST, file_sha256, newest_committed, verify_checkpoint
from tests.helpers import REPO, read_jsonl, run_entry

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FAST = ["logging.wandb_mode=disabled", "logging.progress_bar=false", "fault/checkpoint=sync",
        "fault.checkpoint.every=2"]


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(ckpt: Path, change) -> None:
    """Rewrite a checkpoint's DCP part with DCP's own writer after ``change(state)``, and re-seal its manifest, as
    an attacker who can write the directory can."""
    whole = ckpt.parent / f"{ckpt.name}.whole.pt"
    dcp_to_torch_save(ckpt, whole)  # test code: it trusts this file
    state = torch.load(whole, weights_only=False)
    whole.unlink()
    for p in [*ckpt.glob("*.distcp"), ckpt / ".metadata"]:
        p.unlink()
    change(state)
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 4 steps with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("attack") / "run"
    proc = run_entry([*FAST, "train.steps=4", f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in newest_committed(run / "checkpoints")] == ["step_000004", "step_000002"]
    return run


def test_a_poisoned_optimizer_value_is_refused_and_the_job_resumes_from_the_last_good_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    marker = tmp_path / "pwned"
    def lr_of_first_group(sd):  # DCP's flattened keys: optim -> "param_groups.<first param>.lr"
        sd["optim"][next(k for k in sd["optim"] if k.startswith("param_groups.") and k.endswith(".lr"))] = \
            RunsCode(marker)
    poison(run / "checkpoints" / "step_000004", lr_of_first_group)
    reference = {r["step"]: r["train/loss"] for r in read_jsonl(run / "metrics.jsonl")}
    proc = run_entry([*FAST, "train.steps=4", f"hydra.run.dir={run}"])  # resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists(), "code in the checkpoint ran"
    refused = [line for line in (proc.stdout + proc.stderr).splitlines() if "step_000004 refused" in line]
    assert len(refused) == 1 and "optim.param_groups." in refused[0] and "could run code" in refused[0], refused
    events = read_jsonl(run / "events.jsonl")
    [fallback] = [e for e in events if e["kind"] == "checkpoint_fallback"]
    assert fallback["used"].endswith("step_000002")
    assert [e for e in events if e["kind"] == "start"][-1]["step"] == 2
    resumed = [r for r in read_jsonl(run / "metrics.jsonl")][len(reference):]
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed[0]["train/loss"] == pytest.approx(reference[3], abs=1e-6)  # step 2's state, exactly


def test_a_model_only_reader_refuses_a_weight_stored_as_a_pickle(trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step_000004"
    poison(ckpt, lambda sd: sd["model"].update({next(iter(sd["model"])): RunsCode(marker)}))
    proc = subprocess.run([sys.executable, "-m", "experiments.quality", str(run), str(run), "--per-category", "1",
                           "--out", str(tmp_path / "q")], cwd=REPO, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("chuanliu: error:") and "step_000004 is refused" in line and "could run code" in line
    assert not marker.exists() and not (tmp_path / "q").exists()


def test_a_second_job_on_one_checkpoint_directory_refuses_and_the_first_keeps_its_checkpoints(tmp_path):
    shared = tmp_path / "shared_ckpts"
    cmd = [sys.executable, "-m", "experiments.train", *FAST, "train.steps=100000",
           f"fault.checkpoint.dir={shared}", f"hydra.run.dir={tmp_path / 'a'}"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "CHUANLIU_JOB_ID": "job-first"})
    try:
        deadline = time.monotonic() + 180
        while not newest_committed(shared) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert newest_committed(shared), "the first job committed no checkpoint in time"
        second = run_entry([*FAST, "train.steps=4", f"fault.checkpoint.dir={shared}",
                            f"hydra.run.dir={tmp_path / 'b'}"])
        assert first.poll() is None, "the first job must still be running"
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait(timeout=30)
    assert second.returncode != 0
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("chuanliu: error:") and "in use by job 'job-first'" in line, line
    assert not (tmp_path / "b" / "metrics.jsonl").exists() or not read_jsonl(tmp_path / "b" / "metrics.jsonl")
    for ckpt in newest_committed(shared):
        verify_checkpoint(ckpt)  # every committed checkpoint of the first job is whole
        assert json.loads((ckpt / MANIFEST).read_text())["job"] == "job-first"

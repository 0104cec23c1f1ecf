"""Bad checkpoint input through the real entry point: one clear line on stderr, a failed exit, and no data lost."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers import run_entry

FAST = ["train.steps=3", "logging.wandb_mode=disabled", "logging.progress_bar=false", "fault/checkpoint=sync",
        "fault.checkpoint.every=3"]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails_with(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("chuanliu: error:"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A finished tiny run's checkpoints directory (step 3)."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = run_entry([*FAST, f"fault.checkpoint.dir={root / 'checkpoints'}", f"hydra.run.dir={root / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "checkpoints" / "step_000003" / "manifest.json").exists()
    return root / "checkpoints"


def test_resume_from_a_directory_that_is_not_a_checkpoint(tmp_path):
    not_ckpt = tmp_path / "notes"
    not_ckpt.mkdir()
    (not_ckpt / "readme.txt").write_text("my notes")
    proc = run_entry([*FAST, f"fault.checkpoint.resume={not_ckpt}", f"hydra.run.dir={tmp_path / 'run'}"])
    fails_with(proc, str(not_ckpt), "manifest.json")
    assert (not_ckpt / "readme.txt").read_text() == "my notes"


def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path, checkpoints):
    before = tree_digest(checkpoints)
    proc = run_entry([*FAST, "model.dim=96", f"fault.checkpoint.dir={checkpoints}",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    fails_with(proc, "model.dim", "another configuration")
    assert tree_digest(checkpoints) == before


def test_checkpoint_of_another_world_size_is_refused(tmp_path, checkpoints):
    before = tree_digest(checkpoints)
    proc = run_entry([*FAST, f"fault.checkpoint.resume={checkpoints}", f"hydra.run.dir={tmp_path / 'run'}"],
                     torchrun_nproc=2)
    assert proc.returncode != 0
    assert "written with 1 data-parallel replicas (1 ranks), this job has 2 (2 ranks)" in proc.stderr
    assert tree_digest(checkpoints) == before


def test_unwritable_checkpoint_directory(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("precious")
    proc = run_entry([*FAST, f"fault.checkpoint.dir={a_file}", f"hydra.run.dir={tmp_path / 'run'}"])
    fails_with(proc, "cannot write checkpoints", "fault.checkpoint.dir")
    assert a_file.read_text() == "precious"


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path, checkpoints):
    before = tree_digest(checkpoints)
    proc = run_entry([*FAST, "fault.checkpoint.resume=never", f"fault.checkpoint.dir={checkpoints}",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    fails_with(proc, "resume=never", "new directory")
    assert tree_digest(checkpoints) == before


def test_a_finished_run_resumed_has_nothing_left_and_keeps_its_metrics(tmp_path):
    run = tmp_path / "run"
    first = run_entry([*FAST, f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    rows = (run / "metrics.jsonl").read_text()
    again = run_entry([*FAST, "train.steps=5", f"hydra.run.dir={run}"])  # resume=auto: continues at step 4
    assert again.returncode == 0, again.stderr[-3000:]
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(rows)  # appended, never truncated
    assert "resumed from" in again.stdout + again.stderr
    summary = (run / "summary.json").read_text()
    third = run_entry([*FAST, "train.steps=5", f"hydra.run.dir={run}"])  # finished: nothing left to train
    assert third.returncode == 0 and "nothing left to train" in third.stdout + third.stderr
    assert (run / "summary.json").read_text() == summary and (run / "metrics.jsonl").read_text() == text

"""Quality parity through the real entry points: train tiny runs with `experiments.train`, compare their
checkpoints with `experiments.quality` (a numerically equivalent technique ties, a less-trained run loses)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from experiments.quality import main as quality_main
from systems.corpus import _TEMPLATES, category_name
from tests.helpers import REPO, run_entry

STEPS = 8
PER_CATEGORY = "5"  # 70 documents: enough for the assertions, quick to score on a shared CPU
CATEGORIES = {category_name(t) for t, _ in _TEMPLATES}


def _train(run_dir, *extra: str) -> None:
    proc = run_entry([f"hydra.run.dir={run_dir}", "model=tiny", "train.micro_batch_size=4", "fault/checkpoint=sync",
                      f"fault.checkpoint.every={STEPS}", "logging=disabled", *extra], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    _train(root / "base", f"train.steps={STEPS}")
    # The same math in another order: LM head + loss over 96-token chunks (of 512 per step; 1024 would be one chunk).
    _train(root / "chunked", f"train.steps={STEPS}", "splitting=chunked_ce", "splitting.ce_chunk_tokens=96")
    _train(root / "short", "train.steps=2")
    return root


def _report(out) -> dict:
    assert (out / "quality.md").is_file()
    return json.loads((out / "quality.json").read_text())


def test_cli_finds_parity_between_a_run_and_a_numerically_equivalent_technique(runs):
    cmd = [sys.executable, "-m", "experiments.quality", str(runs / "base"), str(runs / "chunked"),
           "--per-category", PER_CATEGORY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| **overall** |" in proc.stdout and "Verdict: **parity**" in proc.stdout
    r = _report(runs / "chunked" / "quality_vs_base")
    assert set(r["categories"]) == CATEGORIES and r["verdict"] == "parity"
    assert r["runs"]["a"]["step"] == r["runs"]["b"]["step"] == STEPS
    o = r["overall"]
    assert o["documents"] == 5 * len(CATEGORIES) and o["rate_a"] >= 90 and o["rate_b"] >= 90
    assert o["loss_a"] != o["loss_b"] and abs(o["loss_a"] - o["loss_b"]) < 1e-3  # two runs, nearly one result


def test_a_run_against_itself_ties_every_document(runs, tmp_path, capsys):
    quality_main([str(runs / "base"), str(runs / "base"), "--per-category", PER_CATEGORY, "--out", str(tmp_path)])
    o = _report(tmp_path)["overall"]
    assert o["ties"] == o["documents"] and o["rate_a"] == o["rate_b"] == 100.0 and o["loss_a"] == o["loss_b"]
    assert "| **overall** |" in capsys.readouterr().out


def test_a_less_trained_run_loses(runs, tmp_path):
    quality_main([str(runs / "short"), str(runs / "base"), "--per-category", PER_CATEGORY, "--out", str(tmp_path)])
    r = _report(tmp_path)
    assert r["verdict"] == "A behind" and r["overall"]["loss_b"] < r["overall"]["loss_a"] - 0.3
    assert r["overall"]["wins_b"] >= 0.9 * r["overall"]["documents"]
    assert sum(c["wins_b"] > c["wins_a"] + c["ties"] for c in r["categories"].values()) >= len(CATEGORIES) - 2


def _listing(path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.mark.parametrize("case", ["missing", "no_checkpoint", "other_shape", "other_tokenizer", "no_such_step"])
def test_bad_input_exits_2_with_a_clear_message_and_changes_nothing(runs, tmp_path, capsys, case):
    base, other = runs / "base", tmp_path / "other"
    before = _listing(base)
    if case == "no_checkpoint":
        shutil.copytree(base, other, ignore=shutil.ignore_patterns("checkpoints"))
    elif case != "missing":
        shutil.copytree(base, other)
    if case == "other_shape":
        config = other / ".hydra" / "config.yaml"
        config.write_text(config.read_text().replace("  dim: 128\n", "  dim: 64\n", 1))
    if case == "other_tokenizer":
        with open(other / "tokenizer.model", "ab") as f:
            f.write(b"\0")
    expected = {"missing": "does not exist", "no_checkpoint": "this run saved no checkpoint; train with "
                "fault/checkpoint=sync", "other_shape": "differ in model.dim: 128 vs 64",
                "other_tokenizer": "different tokenizers", "no_such_step": "no committed checkpoint at step 99"}[case]
    extra = ["--step", "99"] if case == "no_such_step" else []
    listing = _listing(other) if other.exists() else None
    with pytest.raises(SystemExit) as exit_info:
        quality_main([str(base), str(other), *extra])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert _listing(base) == before and (_listing(other) if other.exists() else None) == listing

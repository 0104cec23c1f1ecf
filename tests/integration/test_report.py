"""The ablation report (`python -m analysis.report`) on runs made here through the real entry point: a 2-run sweep,
a single run, a mix of both, a failed run, and bad input. Three training runs in all, shared by the module."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.report import main
from tests.helpers import REPO, run_entry

REPORT_TIMEOUT_S = 120


def _report(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=REPORT_TIMEOUT_S)


def _snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run directories with its size and mtime: the report must change none of them."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in d.rglob("*") if p.is_file()}


def _tokens_per_s(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["median"]["perf/tokens_per_s_per_device"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    mr = tmp_path_factory.mktemp("report") / "mr"
    proc = run_entry(["-m", "model=tiny", "splitting=none,chunked_ce", "train.steps=6", "logging.wandb_mode=offline",
                      f"hydra.sweep.dir={mr}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return mr


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report_single") / "run"
    proc = run_entry([f"hydra.run.dir={run_dir}", "train.steps=6", "logging.wandb_mode=disabled"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def sweep_report(sweep) -> tuple[Path, dict, subprocess.CompletedProcess, bool]:
    before = _snapshot(sweep / "0", sweep / "1")
    proc = _report(sweep, "--wandb", "offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sweep / "report"
    return out, json.loads((out / "report.json").read_text()), proc, before == _snapshot(sweep / "0", sweep / "1")


def test_sweep_report_rows_are_ratios_to_the_baseline(sweep, sweep_report):
    out, rep, _, untouched = sweep_report
    assert untouched
    for name in ("report.md", "report.html", "report.json", "ablation.png", "contributions.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    rows = rep["rows"]
    assert [r["label"] for r in rows] == ["splitting=none", "splitting=chunked_ce"]
    assert [r["baseline"] for r in rows] == [True, False] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["vs_baseline"]["tokens_per_s_per_device"] == 1.0
    expected = _tokens_per_s(sweep / "1") / _tokens_per_s(sweep / "0")
    assert rows[1]["vs_baseline"]["tokens_per_s_per_device"] == pytest.approx(expected, rel=1e-9)
    assert rows[1]["vs_baseline"]["mfu"] == pytest.approx(rows[1]["mfu"] / rows[0]["mfu"], rel=1e-9)
    [c] = [c for c in rep["contributions"] if c["setting"] == "splitting"]
    assert (c["option"], c["baseline_option"], c["method"]) == ("chunked_ce", "none", "one-at-a-time")
    assert c["change_pct"] == pytest.approx(100 * (expected - 1), rel=1e-9)


def test_sweep_report_names_convention_hardware_and_distance_to_baichuan(sweep_report):
    out, rep, _, _ = sweep_report
    d = rep["distance"]
    assert d["convention"] == "palm" and d["hardware"]["device_type"] == "cpu" and d["peak_measured"]
    assert d["mfu_vs_58_3"] == pytest.approx(max(r["mfu"] for r in rep["rows"]) / 0.583)
    md = (out / "report.md").read_text()
    assert "| splitting=chunked_ce |" in md and "×1.00" in md and "TFLOPS (palm)" in md
    assert "58.3%" in md and "182" in md and "12·L·d·s" in md and "CPU" in md and "![ablation](ablation.png)" in md
    # each run's techniques on Baichuan-7B at 1024 A800s, as the predictor's interval over unpublished inputs
    preds = [r["predicted_1024_a800"] for r in rep["rows"]]
    assert preds and all(p and p["mfu_low"] <= p["mfu"] <= p["mfu_high"] for p in preds)
    assert "MFU vs 312 (palm) [interval]" in md


def test_sweep_report_html_is_self_contained(sweep_report):
    page = (sweep_report[0] / "report.html").read_text()
    assert "<table>" in page and "splitting=chunked_ce" in page
    assert page.count("data:image/png;base64,") == 4 and 'src="ablation.png"' not in page


def test_sweep_report_logs_to_wandb_in_the_sweeps_group(sweep, sweep_report):
    out, rep, proc, _ = sweep_report
    group = f"sweep-{sweep.name}"
    assert rep["wandb_group"] == group and rep["wandb"] == {"mode": "offline", "group": group, "ok": True}
    [wandb_file] = (out / "wandb").glob("offline-run-*/*.wandb")
    assert group.encode() in wandb_file.read_bytes() and b"ablation/table" in wandb_file.read_bytes()
    [train_file] = (sweep / "0" / "wandb").glob("offline-run-*/*.wandb")
    assert group.encode() in train_file.read_bytes()  # the training runs carry the same group
    assert f"wandb sync {out}/wandb/offline-run-*" in proc.stdout


def test_single_run_report_has_one_row_and_no_contributions(single, tmp_path):
    before = _snapshot(single)
    assert main([str(single), "--wandb", "disabled"]) == 0
    out = single.parent / "run-report"  # beside the run, never inside it
    rep = json.loads((out / "report.json").read_text())
    assert _snapshot(single) == before
    [row] = rep["rows"]
    assert row["baseline"] and row["vs_baseline"]["tokens_per_s_per_device"] == 1.0 and row["label"] == "run"
    assert rep["contributions"] == [] and not (out / "contributions.png").exists()
    assert "No setting differs" in (out / "report.md").read_text()


def test_mix_of_single_run_and_sweep(single, sweep, tmp_path):
    assert main([str(single), str(sweep), "--out", str(tmp_path / "mix"), "--wandb", "disabled"]) == 0
    rep = json.loads((tmp_path / "mix" / "report.json").read_text())
    labels = [r["label"] for r in rep["rows"]]
    assert len(labels) == 3 and len(set(labels)) == 3  # the single run and job 0 have equal settings
    assert [r["baseline"] for r in rep["rows"]] == [True, False, False] and len(rep["baselines"]) == 1
    [c] = rep["contributions"]
    expected = _tokens_per_s(sweep / "1") / _tokens_per_s(single)
    assert c["setting"] == "splitting" and c["method"] == "one-at-a-time"
    assert c["change_pct"] == pytest.approx(100 * (expected - 1), rel=1e-9)
    assert main([str(single), str(sweep), "--out", str(tmp_path / "b"), "--wandb", "disabled", "--baseline", "2"]) == 0
    rows = json.loads((tmp_path / "b" / "report.json").read_text())["rows"]
    assert [r["baseline"] for r in rows] == [False, False, True]


def test_failed_run_is_listed_with_its_reason(sweep, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sweep / "1" / ".hydra", broken / ".hydra")
    lines = (sweep / "1" / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed mid-write
    (broken / "train.log").write_text("[step 2] loss 8.1\nRuntimeError: boom in step 3\n")
    assert main([str(sweep), str(broken), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    row = rep["rows"][-1]
    assert row["status"] == "failed" and "RuntimeError: boom in step 3" in row["reason"] and "vs_baseline" not in row
    assert row["final_loss"] is not None  # from the two complete metrics lines
    assert sum(r["status"] == "ok" for r in rep["rows"]) == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| failed |" in md and "boom" in md


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "holds no runs"),
])
def test_bad_path_exits_2_with_a_message(tmp_path, make, message):
    proc = _report(make(tmp_path), "--wandb", "disabled")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_baseline_exits_2(single, capsys):
    assert main([str(single), "--baseline", "nope", "--wandb", "disabled"]) == 2
    assert "--baseline 'nope' matches no run" in capsys.readouterr().err


def test_runs_of_another_model_get_their_own_baseline(sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sweep / "1", other, ignore=shutil.ignore_patterns("wandb"))
    summary = json.loads((other / "summary.json").read_text())
    summary["environment"]["model"] = "small"  # as if trained with another model: not comparable with tiny
    (other / "summary.json").write_text(json.dumps(summary))
    assert main([str(sweep), str(other), "--out", str(tmp_path / "out"), "--wandb", "disabled"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["baseline"] for r in rep["rows"]] == [True, False, True] and len(rep["baselines"]) == 2
    assert "comparison groups" in rep["warnings"][0]
    assert all(c["group"].startswith("tiny") for c in rep["contributions"])

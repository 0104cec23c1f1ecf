"""The W&B dashboard (`python -m analysis.dashboard`) against a real sweep made through the real entry point: every
panel reads a key that the runs, the ablation report or a drill really log, and the definition file round-trips.
One torchrun sweep (2 ranks, flat all-reduce hook so the comm/ keys are logged, overlap on and off so the report
has a contribution), shared by the module."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from analysis import dashboard
from analysis.flops import CONVENTIONS
from analysis.metrics import PIPELINE_KEYS, TENSOR_PARALLEL_KEYS, step_keys, summary_keys
from analysis.sinks import _flatten
from tests.helpers import read_jsonl, run_entry

SWEEP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    mr = tmp_path_factory.mktemp("dashboard") / "mr"
    proc = run_entry(["-m", "comm/algorithm=flat", "comm/overlap=on,off", "train.steps=4", "logging=disabled",
                      f"hydra.sweep.dir={mr}"], torchrun_nproc=2, timeout=SWEEP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return mr


class FakeWandb(types.ModuleType):
    """Stands in for wandb in the report's and the drill's log_to_wandb and records what they log."""

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def __init__(self):
        super().__init__("wandb")
        self.history: dict = {}
        self.summary: dict = {}
        self.Settings = lambda **kw: kw
        self.Image = lambda path: path

    def init(self, **kw):
        return self

    def log(self, row, step=None):
        self.history.update(row)

    def finish(self):
        pass


@pytest.fixture(scope="module")
def logged(sweep, tmp_path_factory) -> dict[str, set[str]]:
    """Every key the sweep's runs, its ablation report and a drill report on its first run put into wandb."""
    from analysis import report
    from experiments.drill import log_to_wandb as log_drill
    from fault.drill import drill_report

    out = {"history": set(), "summary": set()}
    for run in (sweep / "0", sweep / "1"):
        for row in read_jsonl(run / "metrics.jsonl"):
            out["history"] |= row.keys() - {"step", "time"}
        out["summary"] |= _flatten(json.loads((run / "summary.json").read_text())).keys()
    fake = FakeWandb()
    real = sys.modules.get("wandb")
    sys.modules["wandb"] = fake
    try:
        runs = report.collect([str(sweep)])
        rep = report.build_report(runs)
        images = report.write_report(runs, rep, tmp_path_factory.mktemp("report"))
        assert report.log_to_wandb(rep, images, tmp_path_factory.mktemp("report_wandb"), "offline") is not None
        out["report"] = set(fake.history) | set(fake.summary)
        fake.history, fake.summary = {}, {}
        drill = drill_report(sweep / "0", reference_dir=sweep / "0")  # no fault: a report of zero faults
        log_drill(drill, tmp_path_factory.mktemp("drill"), "offline", "none")
        out["drill"] = set(fake.history) | set(fake.summary)
        out["drill_columns"] = set(fake.history[dashboard.DRILL_TABLE].columns)
    finally:
        if real is None:
            sys.modules.pop("wandb")
        else:
            sys.modules["wandb"] = real
    return out


def test_step_keys_are_exactly_what_every_step_logs(sweep):
    for run in (sweep / "0", sweep / "1"):
        rows = read_jsonl(run / "metrics.jsonl")
        assert len(rows) == 4
        for row in rows:
            assert row.keys() - {"step", "time"} == set(step_keys())


def test_summary_keys_are_in_every_summary(sweep):
    for run in (sweep / "0", sweep / "1"):
        flat = _flatten(json.loads((run / "summary.json").read_text()))
        assert set(summary_keys()) <= flat.keys()
        assert {k for k in summary_keys() if k.startswith("median.")} == {k for k in flat if k.startswith("median.")}


def test_every_panel_reads_a_key_that_is_logged(sweep, logged):
    dash = dashboard.build([str(sweep)])
    everything = set().union(*(v for k, v in logged.items() if k != "drill_columns"))
    # The pipeline keys are logged only under parallel.pp > 1: tests/integration/test_parallel.py holds a real
    # pipeline run's rows against step_keys(pipeline=True).
    everything |= set(PIPELINE_KEYS) | set(TENSOR_PARALLEL_KEYS)
    panels = dashboard.all_keys(dash)
    assert len(panels) > 40  # workspace sections, runs table and the report's panel grids
    for where, keys in panels.items():
        assert set(keys) <= everything, (where, set(keys) - everything)
    used = {k for keys in panels.values() for k in keys}
    assert {f"perf/{m}/{c}" for m in ("tflops", "mfu") for c in CONVENTIONS} <= used
    assert {"vs_baichuan_7b.reference.tflops_per_gpu", "vs_baichuan_7b.reference.mfu"} <= used  # 182 and 58.3%
    assert {"comm/total_s", "comm/exposed_s", "comm/bucket_bytes", "mem/peak_bytes", "mem/activation_bytes",
            "precision/loss_scale", "precision/skipped_steps", "drill/ettr", "ablation/table"} <= used
    assert set(dashboard.REPORT_IMAGES) <= logged["report"] and set(dashboard.DRILL_SUMMARY) <= logged["drill"]
    assert set(dashboard.DRILL_COLUMNS) <= logged["drill_columns"]


def test_sections_are_grouped_by_sweep_and_the_report_holds_the_sweep(sweep):
    dash = dashboard.build([str(sweep)])
    names = [s.name for s in dash.workspace.sections]
    for word in ("Throughput", "MFU", "Memory", "Communication", "Precision", "Fault", "Ablation"):
        assert any(word in n for n in names), (word, names)
    assert [g.name for g in dash.workspace.runset_settings.groupby] == ["Group"]
    group = f"sweep-{sweep.name}"
    assert dash.meta["group"] == group and dash.report.title.endswith(group)
    grids = [b for b in dash.report.blocks if isinstance(b, dashboard.wr.PanelGrid)]
    assert len(grids) == len(names) and all(g.runsets[0].filters == f"Metric('Group') == '{group}'" for g in grids)
    text = " ".join(str(getattr(b, "text", "")) for b in dash.report.blocks)
    assert "Distance to Baichuan-7B" in text and "overlap" in text  # the report's own text, with its contribution


def test_cli_writes_the_definition_beside_the_runs_and_it_round_trips(sweep, tmp_path):
    png = tmp_path / "layout.png"
    assert dashboard.main([str(sweep), "--layout-png", str(png)]) == 0
    path = sweep / "dashboard.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == dashboard.FORMAT and on_disk["workspace"]["entity"] == ""  # offline: entity later
    back = dashboard.read(path)
    assert dashboard.definition(back) == on_disk
    assert dashboard.definition(dashboard.build([str(sweep)])) == on_disk  # stable ids: a rebuild is the same
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_push_binds_entity_and_project_and_keeps_the_file_offline(sweep, tmp_path, monkeypatch):
    path = dashboard.write(dashboard.build([str(sweep)]), tmp_path / "dashboard.json")
    saved = []

    def save(self):
        runsets = [(rs.entity, rs.project) for b in getattr(self, "blocks", []) for rs in getattr(b, "runsets", [])]
        saved.append((type(self).__name__, self.entity, self.project, set(runsets)))
        return types.SimpleNamespace(url=f"https://wandb.test/{type(self).__name__}")

    monkeypatch.setattr(dashboard.ws.Workspace, "save", save)
    monkeypatch.setattr(dashboard.wr.Report, "save", save)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert dashboard.main(["--push", str(path), "--entity", "me", "--project", "p"]) == 0
    assert saved == [("Workspace", "me", "p", set()), ("Report", "me", "p", {("me", "p")})]
    after = json.loads(path.read_text())  # written back offline: runsets unbound, so it serialises without a server
    assert after["workspace"]["entity"] == "me" and after["report"]["project"]["entityName"] == "me"


def test_online_without_credentials_says_so_and_keeps_the_file(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "d.json"
    assert dashboard.main([str(sweep), "--out", str(out), "--entity", "me"]) == 2
    assert "WANDB_API_KEY" in capsys.readouterr().err and dashboard.read(out).workspace.sections

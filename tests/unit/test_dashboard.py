"""analysis.dashboard without runs: the workspace builds offline from the key lists alone, names no unknown key,
survives a write and a read, and draws its layout. tests/integration/test_dashboard.py holds it against a run."""
from __future__ import annotations

import json

import pytest

from analysis import dashboard
from analysis.metrics import EXTRA_KEYS, step_keys


def test_the_workspace_builds_offline_and_names_only_known_keys():
    dash = dashboard.build()
    assert dash.report is None and dash.meta["project"] == "chuanliu" and dash.workspace.entity == ""
    known = dashboard.known_keys()
    for where, keys in dashboard.all_keys(dash).items():
        assert set(keys) <= known, where
    assert set(EXTRA_KEYS) <= set(step_keys())


def test_a_key_no_run_logs_is_refused():
    dash = dashboard.build()
    dash.workspace.sections[0].panels.append(dashboard._line("typo", ["perf/tflops/PaLM"]))
    with pytest.raises(dashboard.DashboardError, match="perf/tflops/PaLM"):
        dashboard.check_keys(dash)


def test_the_definition_file_round_trips(tmp_path):
    built = dashboard.build(project="elsewhere")
    path = dashboard.write(built, tmp_path / "dashboard.json")
    back = dashboard.read(path)
    assert dashboard.definition(back) == dashboard.definition(built) == json.loads(path.read_text())
    assert [s.name for s in back.workspace.sections] == [s.name for s in built.workspace.sections]
    assert back.workspace.project == "elsewhere"
    assert dashboard.write(back, tmp_path / "again.json").read_text() == path.read_text()


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(dashboard.DashboardError, match="not a chuanliu dashboard"):
        dashboard.read(tmp_path / "x.json")


def test_push_without_credentials_is_refused_before_any_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    with pytest.raises(dashboard.DashboardError, match="WANDB_API_KEY"):
        dashboard.push(dashboard.build(), "me")


def test_the_layout_is_drawn_from_the_definition(tmp_path):
    png = dashboard.draw_layout(dashboard.build(), tmp_path / "layout.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

"""Dashboards defined in code: `python -m analysis.dashboard <multirun | run | folder of runs> [...]`.

The views a training-systems researcher opens on a sweep, built with W&B's ``wandb-workspaces``: a workspace
(throughput per device under every FLOPs convention against Baichuan-7B's 182 TFLOPS/GPU, MFU by convention
against 58.3%, memory, communication, precision, fault drills, the ablation report), its runs grouped by sweep
(the wandb group), and for one sweep a W&B Report: analysis.report's text, then the same sections on that
sweep's runs alone.

Start at ``build``. Panels name metrics only through ``known_keys`` (analysis.metrics' step and summary keys plus
what analysis.report and experiments/drill.py log), and ``check_keys`` refuses any other, so a renamed metric
fails here and in tests/integration/test_dashboard.py (which holds every list against a real run), not as an
empty panel in the browser.

Offline (the default; nothing here needs the network) the definition is written beside the runs as
``<sweep>/dashboard.json`` (``<run>-dashboard.json`` beside a single run): the workspace and the report in
wandb-workspaces' own serialised form (the view specs its ``save()`` uploads), entity left blank.
``--push FILE --entity E`` uploads it later; ``--entity E`` (with WANDB_API_KEY or a ``wandb login``) saves at once.
``--layout-png PNG`` draws the workspace's layout from the definition (docs/dashboard_layout.png).
wandb-workspaces has no public (de)serialiser: its models' ``_to_model``/``_from_model`` are used, pinned by the
version in pyproject.toml and checked by the round-trip test.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import netrc
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces.reports.v2 import internal as wr_internal
from wandb_workspaces.workspaces import internal as ws_internal

from analysis.flops import CONVENTIONS
from analysis.metrics import step_keys, summary_keys
from analysis.peaks import BAICHUAN_7B

FORMAT = "chuanliu-dashboard/1"
# What analysis.report.log_to_wandb logs into the sweep's group (job_type=report): the table and plot() images.
REPORT_TABLE = "ablation/table"
REPORT_IMAGES = [f"ablation/{name}" for name in ("ablation", "memory", "contributions", "loss")]
# What experiments/drill.py's log_to_wandb logs (group "drills"): one row per fault, and the job's totals.
DRILL_TABLE = "drill/faults"
DRILL_COLUMNS = ("fault", "detect_s", "recover_s", "steps_lost", "committed_steps_lost")
DRILL_SUMMARY = ["drill/ettr", "drill/restarts", "drill/wall_s", "drill/completed", "drill/bit_exact"]
COLUMNS = 3  # panels per row of a workspace section (W&B's flow layout); report grids are 24 units wide


class DashboardError(Exception):
    """Bad input or an unusable W&B login: the CLI prints it in one line and exits with status 2."""


def known_keys() -> set[str]:
    """Every key a panel may name: what runs, the report and drills really log (history and summary)."""
    return {*step_keys(pipeline=True, tensor_parallel=True), *summary_keys(pipeline=True, tensor_parallel=True),
            REPORT_TABLE, *REPORT_IMAGES, DRILL_TABLE, *DRILL_SUMMARY}


# ---------------------------------------------------------------- sections and panels

def _line(title: str, keys: list[str], **kw: Any) -> wr.LinePlot:
    return wr.LinePlot(title=title, x=wr.Metric("Step"), y=[wr.Metric(k) for k in keys], **kw)


def _bar(title: str, keys: list[str]) -> wr.BarPlot:
    """A bar per run of each key's summary value (W&B bar charts read the run summary)."""
    return wr.BarPlot(title=title, metrics=[wr.Metric(k) for k in keys], orientation="h")


def _note(text: str) -> wr.MarkdownPanel:
    return wr.MarkdownPanel(markdown=textwrap.dedent(text).strip())


def sections() -> list[tuple[str, list]]:
    """(name, panels) in the order a researcher reads them; every call builds new panel objects."""
    from analysis.report import CONVENTION_TEXT  # the report's own wording of each convention

    ref_tflops, ref_mfu = BAICHUAN_7B["tflops_per_gpu"], BAICHUAN_7B["mfu"]
    tflops = [f"perf/tflops/{c}" for c in CONVENTIONS]
    mfu = [f"perf/mfu/{c}" for c in CONVENTIONS]
    conventions = "\n".join(f"- **{c}**: {CONVENTION_TEXT[c]}" for c in CONVENTIONS)
    return [
        (f"Throughput against Baichuan-7B ({ref_tflops:.0f} TFLOPS/GPU)", [
            _line("TFLOPS per device, every FLOPs convention", tflops, title_y="TFLOPS/device"),
            _bar(f"steady-state TFLOPS/device vs Baichuan-7B's {ref_tflops:.0f}",
                 [f"median.{k}" for k in tflops] + ["vs_baichuan_7b.reference.tflops_per_gpu"]),
            _bar(f"ratio to Baichuan-7B (palm): TFLOPS / {ref_tflops:.0f}, MFU / {ref_mfu:.1%}",
                 ["vs_baichuan_7b.tflops_ratio_to_182", "vs_baichuan_7b.mfu_ratio_to_58_3"]),
            _line("tokens/s per device", ["perf/tokens_per_s_per_device"]),
            _line("step time, s", ["perf/step_s"]),
            _note(f"""
                **Reference**: Baichuan-7B trained at {ref_tflops:.0f} TFLOPS per GPU = {ref_mfu:.1%} MFU on
                ~{BAICHUAN_7B['gpus']} {BAICHUAN_7B['device'].upper()}s ({BAICHUAN_7B['dtype']} peak
                {BAICHUAN_7B['peak_tflops']:.0f} TFLOPS), read under the palm convention. The run summary holds
                it as `vs_baichuan_7b.reference.tflops_per_gpu` and `.mfu`, this run's ratios beside it. On a
                CPU the TFLOPS are not comparable with an A800's: compare MFU, and techniques by ratios within
                one machine."""),
        ]),
        (f"MFU by FLOPs convention (Baichuan-7B: {ref_mfu:.1%})", [
            _line("MFU, every FLOPs convention", mfu, title_y="fraction of the device peak"),
            _bar(f"steady-state MFU vs Baichuan-7B's {ref_mfu:.1%}",
                 [f"median.{k}" for k in mfu] + ["vs_baichuan_7b.reference.mfu"]),
            _note(f"MFU = achieved FLOP/s per device / the device's peak (null when the peak is unknown).\n\n"
                  f"{conventions}"),
        ]),
        ("Memory", [
            _line("peak memory, bytes (CUDA max allocated; peak RSS on CPU)", ["mem/peak_bytes"]),
            _line("activations saved for backward, bytes", ["mem/activation_bytes"]),
            _bar("peak over the run and steady-state activations, bytes",
                 ["mem/peak_bytes", "median.mem/activation_bytes"]),
        ]),
        ("Communication", [
            _line("communication per step: inside collectives and exposed, s", ["comm/total_s", "comm/exposed_s"]),
            _line("exposed fraction of communication", ["comm/exposed_frac"]),
            _bar("gradient bucket size, bytes", ["comm/bucket_bytes"]),
            _bar("steady-state communication per step, s", ["median.comm/total_s", "median.comm/exposed_s"]),
            _note("""
                Logged by runs with more than one rank and a chuanliu all-reduce hook
                (`comm/algorithm=flat|hierarchical`, engine=ddp). Exposed = from the last bucket becoming ready
                to the last reduction finishing: the part overlap did not hide. The bucket size is the
                `comm/bucket` policy's choice."""),
        ]),
        ("Model parallelism", [
            _line("tensor-parallel communication per step: its span and the exposed part, s",
                  ["tp/comm_s", "tp/exposed_s"]),
            _line("tensor-parallel collectives per step and their bytes", ["tp/collectives", "tp/comm_bytes"]),
            _line("pipeline bubble per step: measured and what the schedule should reach",
                  ["pp/bubble", "pp/bubble_simulated", "pp/bubble_formula"]),
            _line("pipeline: step and p2p wait, s", ["pp/step_s", "pp/p2p_wait_s"]),
            _note("""
                tp/ keys: runs with `parallel.tp>1` (DTensor's collectives, timed from launch to wait: on a CPU
                nearly all exposed). pp/ keys: runs with `parallel.pp>1`. Measured = idle / step per pipeline
                rank, averaged (idle = the step minus the rank's own stage compute). Simulated = torch's action
                lists for the schedule list-scheduled at equal forward, input- and weight-gradient times; formula
                = the schedule's paper form (comm/schedules.py)."""),
        ]),
        ("Precision and learning", [
            _line("loss scale (fp16; 1.0 without a scaler)", ["precision/loss_scale"], log_y=True),
            _line("optimizer steps skipped on overflow (cumulative)", ["precision/skipped_steps"]),
            _line("loss: techniques should not change learning", ["train/loss"]),
            _line("gradient norm (before clipping)", ["train/grad_norm"]),
            _line("learning rate", ["train/lr"]),
        ]),
        ("Fault drills and checkpoints", [
            wr.WeavePanelSummaryTable(table_name=DRILL_TABLE),
            _bar("effective training time ratio (ETTR)", ["drill/ettr"]),
            _bar("restarts", ["drill/restarts"]),
            _bar("drill wall time, s", ["drill/wall_s"]),
            _line("time a checkpoint save blocked training, s", ["fault/ckpt_block_s"]),
            _line("forward compute per step, s (the straggler signal)", ["fault/forward_s"]),
            _note(f"""
                `python -m experiments.drill fault/chaos=<fault>` logs one run per drill (group `drills`): the
                table `{DRILL_TABLE}` has a row per injected fault with {', '.join(f'`{c}`' for c in DRILL_COLUMNS)}
                (time to detect, time to recover, steps trained again, and of those the steps that were in a
                committed checkpoint); the summary holds ETTR (productive step time / wall time), restarts, wall
                time, whether the job completed and whether the loss matched a fault-free run bit for bit."""),
        ]),
        ("Ablation report", [
            wr.WeavePanelSummaryTable(table_name=REPORT_TABLE),
            wr.MediaBrowser(title="report plots", media_keys=list(REPORT_IMAGES), num_columns=2),
            _note("""
                `python -m analysis.report <multirun>` logs its table (ratios to the baseline, contribution of
                each technique, the predicted column at 1024 A800s) and plots into the sweep's group
                (job_type=report). The same report is in `<multirun>/report/report.html`."""),
        ]),
    ]


def panel_keys(panel: Any) -> list[str]:
    """The metric keys a panel reads, from its wandb-workspaces definition."""
    def name(m: Any) -> str:
        return m if isinstance(m, str) else m.name

    if isinstance(panel, wr.LinePlot):
        return [name(k) for k in panel.y]
    if isinstance(panel, wr.BarPlot):
        return [name(k) for k in panel.metrics]
    if isinstance(panel, wr.ScalarChart):
        return [name(panel.metric)]
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return [panel.table_name]
    if isinstance(panel, wr.MediaBrowser):
        return list(panel.media_keys)
    if isinstance(panel, wr.MarkdownPanel):
        return []
    raise TypeError(f"panel_keys does not know {type(panel).__name__}; add it")


def all_keys(dash: "Dashboard") -> dict[str, list[str]]:
    """Panel (section: kind title) -> keys, over the workspace, its runs table and the report."""
    out = {f"{s.name}: {_describe(p)}": panel_keys(p) for s in dash.workspace.sections for p in s.panels}
    out["runs table"] = [c.split(":", 1)[1] for c in dash.workspace.runset_settings.pinned_columns
                         if c.startswith("summary:")]
    for block in dash.report.blocks if dash.report else []:
        if isinstance(block, wr.PanelGrid):
            out |= {f"report: {_describe(p)}": panel_keys(p) for p in block.panels}
    return out


def check_keys(dash: "Dashboard") -> None:
    known = known_keys()
    unknown = {where: bad for where, keys in all_keys(dash).items() if (bad := [k for k in keys if k not in known])}
    if unknown:
        raise DashboardError(f"panels name keys no run logs: {unknown}; the keys are listed by analysis.metrics "
                             "(step_keys, summary_keys) and analysis.dashboard (REPORT_*, DRILL_*)")


def _describe(panel: Any) -> str:
    kind = {"LinePlot": "line", "BarPlot": "bar", "WeavePanelSummaryTable": "table", "MediaBrowser": "media",
            "MarkdownPanel": "notes", "ScalarChart": "scalar"}.get(type(panel).__name__, type(panel).__name__)
    title = getattr(panel, "title", None) or getattr(panel, "table_name", None) or ""
    return f"{kind} {title}".strip()


def _stable_id(*parts: str) -> str:
    """Ids from names, so rebuilding gives the same definition (and a re-push updates the same panels)."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:11]


def _place(panels: list, where: str, width: int) -> list:
    w = width // COLUMNS
    for i, p in enumerate(panels):  # W&B's flow layout places workspace panels the same way
        p.layout = wr.Layout(x=(i % COLUMNS) * w, y=(i // COLUMNS) * 6, w=w, h=6)
        p._id = _stable_id(where, str(i), _describe(p))
    return panels


# ---------------------------------------------------------------- workspace, report, file

@dataclass
class Dashboard:
    workspace: ws.Workspace
    report: wr.Report | None  # one sweep's report; None without runs
    meta: dict[str, Any] = field(default_factory=dict)  # source, project, group, runs


def build_workspace(project: str, entity: str = "") -> ws.Workspace:
    secs = []
    for name, panels in sections():
        rows = -(-len(panels) // COLUMNS)
        secs.append(ws.Section(name=name, panels=_place(panels, name, 24), is_open=True,
                               layout_settings=ws.SectionLayoutSettings(columns=COLUMNS, rows=rows)))
    pinned = ["summary:median.perf/tokens_per_s_per_device", "summary:median.perf/tflops/palm",
              "summary:median.perf/mfu/palm", "summary:mem/peak_bytes", "summary:median.comm/exposed_s",
              "summary:drill/ettr", "summary:drill/bit_exact"]
    return ws.Workspace(entity=entity, project=project, name="chuanliu: training systems", sections=secs,
                        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=50),
                        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group")], pinned_columns=pinned))


def _runset(group: str | None, run_names: list[str], where: str) -> wr.Runset:
    if group:
        rs = wr.Runset(name=group, filters=f"Metric('Group') == {group!r}")
    else:  # runs outside a sweep: the wandb sink names each run after its directory
        rs = wr.Runset(name="runs", filters=f"Metric('Name') in {sorted(run_names)!r}")
    rs._id = _stable_id("runset", where, group or ",".join(sorted(run_names)))  # one per panel grid
    return rs


def build_report(ablation: dict, *, project: str, entity: str = "", group: str | None,
                 run_names: list[str]) -> wr.Report:
    """analysis.report's text (its blocks, as report.md renders them), then every workspace section as a panel
    grid on this sweep's runs alone (the report run's table and plots share the group)."""
    from analysis.report import _blocks, to_markdown  # the report's own blocks: the same text as report.md

    blocks: list = [wr.P(f"Runs: {group or ', '.join(sorted(run_names))}. Each panel below shows this sweep's "
                         "runs one by one; the workspace groups every sweep of the project.")]
    for kind, x in _blocks(ablation, {}):
        if kind == "h2":
            blocks.append(wr.H2(x))
        elif kind == "p":
            blocks.append(wr.P(x))
        elif kind == "table":
            blocks.append(wr.MarkdownBlock(text=to_markdown([(kind, x)]).strip()))
    blocks.append(wr.H1("Panels"))
    for name, panels in sections():
        blocks += [wr.H2(name), wr.PanelGrid(runsets=[_runset(group, run_names, name)],
                                             panels=_place(panels, f"report/{name}", 24))]
    title = f"chuanliu ablation: {group or 'runs'}"[:128]
    return wr.Report(entity=entity, project=project, title=title, blocks=blocks, width="fluid",
                     description=f"Against Baichuan-7B: {BAICHUAN_7B['tflops_per_gpu']:.0f} TFLOPS/GPU, "
                                 f"{BAICHUAN_7B['mfu']:.1%} MFU")


def build(paths: list[str] | None = None, *, project: str | None = None, entity: str = "") -> Dashboard:
    """The workspace, and with run directories (a sweep) also its report. Reads only the runs' files."""
    meta: dict[str, Any] = {"source": [str(p) for p in paths or []]}
    report = None
    if paths:
        from analysis.report import ReportError, build_report as ablation_report, collect, wandb_group

        try:
            runs = collect(list(paths))
        except ReportError as e:
            raise DashboardError(str(e)) from None
        projects = {(r.config.get("logging") or {}).get("project") for r in runs} - {None}
        project = project or (sorted(projects)[0] if projects else None)
        group, names = wandb_group(runs), [r.path.name for r in runs]
        ablation = ablation_report(runs)
        meta |= {"group": group, "runs": [str(r.path) for r in runs]}
        report = build_report(ablation, project=project or "chuanliu", entity=entity, group=group, run_names=names)
    meta["project"] = project = project or "chuanliu"
    dash = Dashboard(build_workspace(project, entity), report, meta)
    check_keys(dash)
    return dash


def _dump(model: Any) -> dict:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def definition(dash: Dashboard) -> dict[str, Any]:
    """The file's content: wandb-workspaces' serialised view specs (what save() uploads) plus where they came from."""
    return {"format": FORMAT, "wandb_workspaces": importlib.metadata.version("wandb-workspaces"), **dash.meta,
            "workspace": _dump(dash.workspace._to_model()),
            "report": _dump(dash.report._to_model()) if dash.report else None}


def from_definition(d: dict[str, Any]) -> Dashboard:
    if d.get("format") != FORMAT:
        raise DashboardError(f"not a chuanliu dashboard file (format {d.get('format')!r}, expected {FORMAT})")
    workspace = ws.Workspace._from_model(ws_internal.View.model_validate(d["workspace"]))
    report = None
    if d["report"]:
        report = wr.Report._from_model(wr_internal.ReportViewspec.model_validate(d["report"]))
        report.width = d["report"]["spec"].get("width", report.width)  # wandb-workspaces 0.4.13 drops it on load
    meta = {k: v for k, v in d.items() if k not in ("format", "wandb_workspaces", "workspace", "report")}
    return Dashboard(workspace, report, meta)


def write(dash: Dashboard, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(definition(dash), indent=1) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path


def read(path: Path) -> Dashboard:
    try:
        return from_definition(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise DashboardError(f"cannot read {path}: {e}") from None


# ---------------------------------------------------------------- online

def _has_credentials() -> bool:
    """An API key in the environment or a `wandb login` in ~/.netrc; checked first so that nothing prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def push(dash: Dashboard, entity: str, project: str | None = None) -> list[str]:
    """Save the workspace and the report to ``entity``/``project``; returns their URLs. Ids from an earlier push
    are kept (the same views are updated) unless the destination changed."""
    if not _has_credentials():
        raise DashboardError("no W&B credentials: set WANDB_API_KEY or run `wandb login` (offline, the default, "
                             "needs neither: upload the file later with --push)")
    project = project or dash.meta.get("project") or "chuanliu"
    w = dash.workspace
    if (w.entity, w.project) != (entity, project):
        w._internal_name = w._internal_id = ""
        if dash.report:
            dash.report.id = ""
    w.entity, w.project = entity, project
    urls = [w.save().url]
    if dash.report:
        dash.report.entity, dash.report.project = entity, project
        runsets = [rs for block in dash.report.blocks for rs in getattr(block, "runsets", [])]
        try:
            for rs in runsets:
                rs.entity, rs.project = entity, project
            urls.append(dash.report.save().url)
        finally:  # a runset bound to a project looks its id up on the server when serialised: keep the file offline
            for rs in runsets:
                rs.entity = rs.project = ""
    dash.meta["project"] = project
    return urls


# ---------------------------------------------------------------- the layout as a picture

_COLORS = {"line": "#dbe9f6", "bar": "#fde7c8", "table": "#dff3df", "media": "#eadff5", "notes": "#eeeeee"}


def draw_layout(dash: Dashboard, png: Path) -> Path:
    """Sections as bands, panels as boxes in W&B's flow order (COLUMNS per row), each with its kind, title and
    keys: drawn from the definition, so the picture cannot drift from what is saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    secs = dash.workspace.sections
    rows = [-(-len(s.panels) // s.layout_settings.columns) for s in secs]
    box_h, head_h, gap = 1.75, 0.45, 0.25
    height = sum(head_h + r * (box_h + gap) for r in rows) + 0.6
    fig, ax = plt.subplots(figsize=(15, height * 0.62))
    ax.set(xlim=(0, COLUMNS), ylim=(height, 0))
    ax.axis("off")
    ax.text(0, 0.3, f"{dash.workspace.name}: W&B workspace ({dash.meta.get('project')}), runs grouped by sweep "
                    "(wandb group)", fontsize=12, weight="bold", va="center")
    y = 0.6
    for s, r in zip(secs, rows):
        ax.add_patch(FancyBboxPatch((0, y), COLUMNS, head_h - 0.08, boxstyle="round,pad=0.01", fc="#4a5d7e", ec="none"))
        ax.text(0.02, y + head_h / 2 - 0.04, s.name, color="white", fontsize=10, weight="bold", va="center")
        y += head_h
        cols = s.layout_settings.columns
        for i, p in enumerate(s.panels):
            kind, _, title = _describe(p).partition(" ")
            x0, y0 = (i % cols) * COLUMNS / cols + 0.02, y + (i // cols) * (box_h + gap)
            ax.add_patch(FancyBboxPatch((x0, y0), COLUMNS / cols - 0.04, box_h, boxstyle="round,pad=0.01",
                                        fc=_COLORS.get(kind, "white"), ec="#888888", lw=0.8))
            ax.text(x0 + 0.02, y0 + 0.18, f"[{kind}] {textwrap.shorten(title, 50, placeholder=' …')}", fontsize=8,
                    weight="bold", va="center")
            keys = panel_keys(p)
            shown = keys[:5] + ([f"+ {len(keys) - 5} more"] if len(keys) > 5 else [])
            if not keys:  # notes: their first words
                shown = textwrap.wrap(getattr(p, "markdown", "").replace("*", "").replace("`", ""), 62)[:5]
            ax.text(x0 + 0.02, y0 + 0.38, "\n".join(shown), fontsize=7, family="monospace", va="top", color="#333333")
        y += r * (box_h + gap)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png


# ---------------------------------------------------------------- CLI

def default_out(first: Path) -> Path:
    from analysis.report import _is_run

    return first.parent / f"{first.name}-dashboard.json" if _is_run(first) else first / "dashboard.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="run directories, multirun directories, or folders holding runs")
    p.add_argument("--out", help="definition file (default <multirun>/dashboard.json, <run>-dashboard.json)")
    p.add_argument("--entity", help="save to W&B now (needs WANDB_API_KEY or `wandb login`); with --push: where to")
    p.add_argument("--project", help="W&B project (default: the runs' logging.project, else chuanliu)")
    p.add_argument("--push", metavar="FILE", help="upload a definition written offline (with --entity)")
    p.add_argument("--layout-png", metavar="PNG", help="draw the workspace layout from the definition")
    a = p.parse_args(argv)
    try:
        if a.push:
            if not a.entity:
                raise DashboardError("--push needs --entity (your W&B user or team)")
            dash = read(Path(a.push))
            for url in push(dash, a.entity, a.project):
                print(url)
            write(dash, Path(a.push))  # the saved views' ids: the next push updates them
            return 0
        if not a.paths and not a.layout_png:
            raise DashboardError("give run directories (a sweep), --push FILE, or --layout-png PNG")
        dash = build(a.paths, project=a.project)
        out = None
        if a.paths:
            out = write(dash, Path(a.out) if a.out else default_out(Path(a.paths[0])))
            print(f"wrote {out}: workspace ({len(dash.workspace.sections)} sections) and the report of "
                  f"{dash.meta.get('group') or 'these runs'}")
        if a.layout_png:
            print(f"wrote {draw_layout(dash, Path(a.layout_png))}")
        if a.entity and out:
            for url in push(dash, a.entity, a.project):
                print(url)
            write(dash, out)
        elif out:
            print(f"offline: `wandb sync` the runs' wandb/offline-run-* folders, then "
                  f"`python -m analysis.dashboard --push {out} --entity <your entity>`")
    except DashboardError as e:
        print(f"chuanliu dashboard: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  W&B's network and API errors are many types
        if not a.entity:
            raise
        print(f"chuanliu dashboard: error: W&B upload failed ({type(e).__name__}: {e}); the definition is written: "
              "--push it later", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

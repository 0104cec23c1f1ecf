"""Ablation report from finished runs: `python -m analysis.report <run | multirun | parent dir> [...]`.

It reads only what runs left on disk (``.hydra/``, ``summary.json``, ``metrics.jsonl``, ``train.log``), never a
training process, and writes ``report.md``, a self-contained ``report.html``, ``report.json`` and PNG plots to
``--out`` (default ``<multirun or parent>/report/``, or ``<run>-report/`` beside a single run: never into a run).

Start at ``build_report``: runs -> settings (Hydra's chosen option per config group plus plain overrides) ->
one baseline per comparison group (same model, world size and device; ratios across groups mean nothing) ->
table rows as ratios to that baseline (absolute CPU figures are noisy; ratios measured on one machine are not)
-> per-technique contributions -> distance to Baichuan-7B's 182 TFLOPS / 58.3% MFU.
``log_to_wandb`` then puts the same table and plots in a wandb run that shares the sweep's group.
An autotune sweep (experiment=autotune) adds an Autotune section (analysis/autotune.py): every trial, infeasible
ones too, the objective over trials, the importance of each knob, and best.yaml / best_command.txt /
best_config.yaml beside the trials.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from analysis import autotune as autotune_sweep
from analysis.flops import CONVENTIONS, DEFAULT_CONVENTION
from analysis.peaks import BAICHUAN_7B

log = logging.getLogger(__name__)

IGNORED = ("hydra", "logging", "experiment")  # setting prefixes that do not change what is measured
SKIP_DIRS = {".hydra", "wandb", "checkpoints"}
CONVENTION_TEXT = {
    "6n": "6N FLOPs per token, N = every matmul weight incl. the LM head, not the input embedding (not Kaplan's "
          "non-embedding 6N); attention scores not counted",
    "palm": "6N + 12·L·d·s FLOPs per token (PaLM App. B; the convention behind Baichuan-7B's 182 TFLOPS = 58.3% "
            "of the A800's 312 bf16 TFLOPS)",
    "causal": "6N + 6·L·d·s FLOPs per token (PaLM with a causal mask: half the score matrix)",
    "hfu": "PaLM FLOPs plus what runs again: the forward work activation recomputation repeats and the QK^T a "
           "fused attention backward recomputes (hardware FLOPs, as FlopCounterMode counts them)",
}
# (key in a row's values, column title); each also gets a "vs base" ratio column.
METRICS = [("tokens_per_s_per_device", "tok/s/device"), ("tflops", "TFLOPS"), ("mfu", "MFU"),
           ("peak_mib", "peak MiB"), ("exposed_comm_ms", "exposed comm ms")]


class ReportError(Exception):
    """Bad input: the CLI prints it in one line and exits with status 2."""


@dataclass(kw_only=True)
class Run:
    """One run directory as the report sees it."""

    path: Path
    choices: dict[str, str]  # setting -> value: config group -> option, plus plain overrides (train.steps -> 6)
    overrides: list[str]  # .hydra/overrides.yaml as given on the command line
    config: dict[str, Any]  # .hydra/config.yaml (interpolations left unresolved)
    summary: dict[str, Any] | None  # summary.json; None when the run did not finish
    status: str  # "ok" or "failed"
    reason: str = ""  # why it failed
    sweep: Path | None = None  # the multirun directory holding it
    label: str = ""  # short name from the settings that differ between the report's runs
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss) from metrics.jsonl

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def env(self) -> dict[str, Any]:
        return (self.summary or {}).get("environment", {})

    @property
    def group(self) -> str:
        """Comparison group: runs are compared only with runs of the same model, world size and device."""
        e = self.env
        return (f"{e.get('model') or self.choices.get('model', '?')} · {e.get('world_size', '?')} rank(s) · "
                f"{e.get('device_name') or e.get('device_type', '?')}")

    def median(self, key: str) -> float | None:
        return (self.summary or {}).get("median", {}).get(key)


# ---------------------------------------------------------------- reading runs

def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _is_run(d: Path) -> bool:
    return (d / ".hydra").is_dir() or (d / "summary.json").is_file()


def _natural(p: Path) -> tuple:
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def discover(path: Path, depth: int = 3) -> list[Path]:
    """Run directories at or under ``path``: itself, a multirun's numbered jobs, or runs a few levels down."""
    if _is_run(path):
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    children = sorted((c for c in path.iterdir() if c.is_dir() and c.name not in SKIP_DIRS
                       and not c.name.startswith("report")), key=_natural)
    return [r for c in children for r in discover(c, depth - 1)]


def _failure_reason(path: Path) -> str:
    trial = _yaml(path / autotune_sweep.TRIAL_FILE)  # JSON is YAML
    if isinstance(trial, dict) and trial.get("status") == "infeasible":
        return f"autotune: infeasible, never launched ({trial.get('reason')})"
    lines = [ln.strip() for ln in _read_text(path / "train.log").splitlines() if ln.strip()]
    if not lines:
        return "no summary.json and no train.log: the run never started or was killed at once"
    errors = [ln for ln in lines if "error" in ln.lower() or "traceback" in ln.lower()]
    return f"no summary.json; train.log ends: {(errors or lines)[-1][:240]}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _losses(path: Path) -> list[tuple[int, float]]:
    out = []
    for line in _read_text(path / "metrics.jsonl").splitlines():
        try:  # a killed run may leave a half-written last line
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("train/loss"), (int, float)):
            out.append((row["step"], row["train/loss"]))
    return out


def load_run(path: Path) -> Run:
    overrides = [str(o) for o in _yaml(path / ".hydra" / "overrides.yaml") or []]
    hydra_cfg = _yaml(path / ".hydra" / "hydra.yaml") or {}
    choices = {k: str(v) for k, v in hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices", {}).items()
               if not k.startswith(IGNORED)}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key and not key.startswith(IGNORED):
            choices.setdefault(key, value)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):  # absent, or cut short by a kill
        summary = None
    ok = isinstance(summary, dict) and "median" in summary
    return Run(path=path, choices=choices, overrides=overrides, config=_yaml(path / ".hydra" / "config.yaml") or {},
               summary=summary if ok else None, status="ok" if ok else "failed",
               reason="" if ok else _failure_reason(path), losses=_losses(path),
               sweep=path.parent if (path.parent / "multirun.yaml").is_file() else None)


def collect(paths: list[str]) -> list[Run]:
    runs, seen = [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist")
        found = discover(p)
        if not found:
            raise ReportError(f"{p} holds no runs (no directory with .hydra/ or summary.json, at most 3 levels down)")
        for r in found:
            if r.resolve() not in seen:  # a run named twice (itself and its multirun) is reported once
                seen.add(r.resolve())
                runs.append(load_run(r))
    return runs


# ---------------------------------------------------------------- settings, labels, baselines

def _lookup(cfg: dict, dotted: str) -> str | None:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return str(cfg)


def _fill_settings(runs: list[Run]) -> None:
    """A plain override set in one run only (train.micro_batch_size=4) takes its config value in the others."""
    for key in {k for r in runs for k in r.choices}:
        for r in runs:
            if key not in r.choices:
                r.choices[key] = _lookup(r.config, key) or "default"


def _assign_labels(runs: list[Run]) -> None:
    keys = sorted({k for r in runs for k in r.choices})
    differing = [k for k in keys if len({r.choices.get(k) for r in runs}) > 1]
    for r in runs:
        short = f"{r.path.parent.name}/{r.path.name}" if r.sweep else r.path.name
        r.label = ", ".join(f"{k}={r.choices[k]}" for k in differing) or short
    counts = Counter(r.label for r in runs)
    for r in runs:
        if counts[r.label] > 1:  # same settings twice (a repeat, or a single run mixed with a sweep)
            r.label += f" ({r.path.parent.name}/{r.path.name})"


def _find(runs: list[Run], key: str) -> Run:
    if key.isdigit() and int(key) < len(runs):
        return runs[int(key)]
    for r in runs:
        if key in (r.label, str(r.path), r.path.name) or Path(key).resolve() == r.path.resolve():
            return r
    raise ReportError(f"--baseline {key!r} matches no run (give an index 0..{len(runs) - 1}, a label or a path)")


def pick_baselines(runs: list[Run], choice: str | None) -> dict[str, Run]:
    """One baseline per comparison group: --baseline where it belongs to the group, else the group's first
    finished run in the order given (a multirun's job 0, the first value of each swept list)."""
    chosen = _find(runs, choice) if choice else None
    if chosen is not None and not chosen.ok:
        raise ReportError(f"--baseline {choice!r} is a failed run ({chosen.reason})")
    bases: dict[str, Run] = {}
    for r in runs:
        if r.ok:
            bases.setdefault(r.group, r)
    if chosen is not None:
        bases[chosen.group] = chosen
    return bases


# ---------------------------------------------------------------- the numbers

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _values(r: Run, conv: str) -> dict[str, float | None]:
    peak = (r.summary or {}).get("mem/peak_bytes", r.median("mem/peak_bytes"))  # peak over the run
    exposed = r.median("comm/exposed_s")  # multi-rank runs only
    return {"tokens_per_s_per_device": r.median("perf/tokens_per_s_per_device"),
            "tflops": r.median(f"perf/tflops/{conv}"), "mfu": r.median(f"perf/mfu/{conv}"),
            "peak_mib": peak / 2**20 if peak else None,
            "exposed_comm_ms": exposed * 1e3 if exposed is not None else None}


def _row(r: Run, base: Run | None, conv: str) -> dict[str, Any]:
    row = {"label": r.label, "path": str(r.path), "status": r.status, "reason": r.reason, "group": r.group,
           "baseline": r is base, "settings": r.choices, "final_loss": r.losses[-1][1] if r.losses else None,
           "predicted_1024_a800": _predicted_column(r)}
    if r.ok:
        mine, theirs = _values(r, conv), _values(base, conv)
        row |= mine
        row["vs_baseline"] = {k: _ratio(v, theirs[k]) for k, v in mine.items()}
        row["final_loss"] = (r.summary.get("loss") or {}).get("last", row["final_loss"])
    return row


def _diff(a: Run, b: Run) -> set[str]:
    return {k for k in a.choices.keys() | b.choices.keys() if a.choices.get(k) != b.choices.get(k)}


def contributions(runs: list[Run], bases: dict[str, Run]) -> list[dict[str, Any]]:
    """% change in tokens/s/device per setting that differs from the baseline: one-at-a-time where a run differs
    from the baseline in that setting alone, else the marginal effect (mean of runs with vs without it)."""
    out = []
    for group, base in bases.items():
        members = [r for r in runs if r.ok and r.group == group]
        tps = {id(r): r.median("perf/tokens_per_s_per_device") for r in members}
        for key in sorted({k for r in members for k in _diff(r, base)}):
            for option in sorted({r.choices[key] for r in members if r.choices[key] != base.choices[key]}):
                alone = [r for r in members if _diff(r, base) == {key} and r.choices[key] == option]
                if alone:
                    change, method = statistics.mean(tps[id(r)] / tps[id(base)] for r in alone) - 1, "one-at-a-time"
                    used = alone
                else:
                    used = [r for r in members if r.choices[key] == option]
                    without = [r for r in members if r.choices[key] != option]
                    change = (statistics.mean(tps[id(r)] for r in used)
                              / statistics.mean(tps[id(r)] for r in without)) - 1
                    method = "marginal"
                out.append({"setting": key, "option": option, "baseline_option": base.choices[key],
                            "change_pct": 100 * change, "method": method, "group": group,
                            "runs": [r.label for r in used]})
    for c in out:  # settings that split the runs identically cannot be told apart by a marginal effect
        twins = [o["setting"] for o in out if o is not c and o["group"] == c["group"] and o["runs"] == c["runs"]]
        c["confounded_with"] = twins if c["method"] == "marginal" else []
    return out


def distance(runs: list[Run], conv: str) -> dict[str, Any] | None:
    """Where the best run (by MFU) stands against Baichuan-7B: MFU vs 58.3% compares; CPU TFLOPS vs 182 do not."""
    ok = [r for r in runs if r.ok and r.median(f"perf/mfu/{conv}") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: r.median(f"perf/mfu/{conv}"))
    e, mfu, tflops = best.env, best.median(f"perf/mfu/{conv}"), best.median(f"perf/tflops/{conv}")
    return {"convention": conv, "convention_text": CONVENTION_TEXT[conv], "best_run": best.label,
            "hardware": {k: e.get(k) for k in ("device_type", "device_name", "dtype", "peak_tflops", "peak_source",
                                               "world_size")},
            "peak_measured": "measure" in str(e.get("peak_source", "")),
            "mfu": mfu, "mfu_vs_58_3": mfu / BAICHUAN_7B["mfu"],
            "tflops_per_device": tflops, "tflops_vs_182": _ratio(tflops, BAICHUAN_7B["tflops_per_gpu"]),
            "reference": BAICHUAN_7B, "meaning": (best.summary.get("vs_baichuan_7b") or {}).get("meaning", ""),
            "caveat": "" if conv == "palm" else f"Baichuan-7B's figures are read under palm; this report uses {conv}."}


_HOOK_FAILURES: list[str] = []  # warn once per report, not once per run


PREDICTED_SETUP = ("Baichuan-7B, seq 4096, 1024 x A800, the interval over Baichuan's unpublished network, batch "
                   "split and NCCL algorithm (analysis.predictor)")


def _predicted_column(run: Run) -> dict[str, float] | None:
    """What this run's techniques would reach at Baichuan-7B's scale: the predictor applies the run's choices
    (fusion, splitting, precision, collectives, buckets, overlap) to the 7B shape on 1024 A800s, so a CPU
    ablation row can be read against 182 TFLOPS / 58.3%. None (column left out) if the predictor fails."""
    from analysis.predictor import techniques_from_config
    from analysis.predictor.cli import baichuan_interval

    try:
        mapped = techniques_from_config(run.config)
        iv = baichuan_interval(mapped.techniques)
        # MFU against the A800's bf16 peak whatever the run's precision, as Baichuan's 58.3% is (182 / 312).
        mfu = lambda p: p.tflops_per_gpu / BAICHUAN_7B["peak_tflops"]
        return {"tflops_per_gpu": iv.point.tflops_per_gpu, "mfu": mfu(iv.point), "mfu_low": mfu(iv.low),
                "mfu_high": mfu(iv.high), "fits_memory": iv.point.fits_memory, "notes": mapped.notes}
    except (ValueError, KeyError) as e:  # a config the predictor cannot map: say so, keep the report
        if not _HOOK_FAILURES:
            log.warning("predicted column left out for %s: %s", run.path, e)
        _HOOK_FAILURES.append(str(run.path))
        return None


def wandb_group(runs: list[Run]) -> str | None:
    """The runs' logging.group if they share one (a multirun's is sweep-<its directory>), else the first sweep's."""
    def group_of(r: Run) -> str | None:
        g = (r.config.get("logging") or {}).get("group")
        if isinstance(g, str) and "${" not in g:
            return g
        return f"sweep-{r.sweep.name}" if r.sweep else None  # what the chuanliu_sweep_group resolver gave them
    groups = {group_of(r) for r in runs}
    if len(groups) == 1 and None not in groups:
        return groups.pop()
    sweeps = [r.sweep for r in runs if r.sweep]
    return f"sweep-{sweeps[0].name}" if sweeps else None


def build_report(runs: list[Run], *, baseline: str | None = None, convention: str = DEFAULT_CONVENTION) -> dict:
    _fill_settings(runs)
    _assign_labels(runs)
    bases = pick_baselines(runs, baseline)
    warnings = [(f"{len(bases)} comparison groups (model · ranks · device): each row is compared only with its "
                f"group's baseline; ratios across groups mean nothing.")] if len(bases) > 1 else []
    warnings += [f"{r.label}: failed ({r.reason})" for r in runs if not r.ok]
    sweeps = sorted({r.path.parent for r in runs if autotune_sweep.is_trial(r.path)})  # an autotune sweep's jobs
    if len(sweeps) > 1:
        warnings.append(f"{len(sweeps)} autotune sweeps: the Autotune section shows the first, {sweeps[0]}")
    tuned = autotune_sweep.summarise(sweeps[0]) if sweeps else None
    return {"convention": convention, "rows": [_row(r, bases.get(r.group), convention) for r in runs],
            "baselines": {g: b.label for g, b in bases.items()}, "contributions": contributions(runs, bases),
            "distance": distance(runs, convention), "warnings": warnings,
            "wandb_group": wandb_group(runs) or (tuned or {}).get("wandb_group"), "autotune": tuned}


# ---------------------------------------------------------------- plots

def plot(report: dict, runs: list[Run], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in report["rows"] if row["status"] == "ok"]
    conv, made = report["convention"], {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made[name] = out / f"{name}.png"

    def bars(ax, rows, key, title, fmt, labels=True) -> None:
        groups = sorted({r["group"] for r in rows})
        colors = [f"C{groups.index(r['group'])}" for r in rows]
        y = range(len(rows))
        ax.barh(y, [r[key] or 0 for r in rows], color=colors,
                hatch=["//" if r["baseline"] else "" for r in rows], edgecolor="black")
        names = [r["label"] + (" (baseline)" if r["baseline"] else "") for r in rows]
        ax.set_yticks(list(y), names if labels else [""] * len(rows), fontsize=8)
        ax.set_xlim(0, 1.4 * max((r[key] or 0 for r in rows), default=0) or 1)  # room for the value labels
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        if len(groups) > 1 and labels:  # colours are comparison groups
            from matplotlib.patches import Patch
            ax.legend([Patch(color=f"C{i}") for i in range(len(groups))], groups, fontsize=7, loc="best")
        for i, r in enumerate(rows):
            ratio = (r.get("vs_baseline") or {}).get(key)
            ax.text(r[key] or 0, i, f" {fmt(r[key])}" + (f"  ×{ratio:.2f}" if ratio else ""), va="center", fontsize=8)

    height = 1.2 + 0.45 * len(ok)
    if ok:
        fig, axes = plt.subplots(1, 2, figsize=(12, height))
        bars(axes[0], ok, "tokens_per_s_per_device", "tokens/s per device (× baseline)", lambda v: f"{v:,.0f}")
        bars(axes[1], ok, "mfu", f"MFU ({conv})", lambda v: f"{v:.2%}" if v is not None else "—", labels=False)
        save(fig, "ablation")
        fig, ax = plt.subplots(figsize=(7, height))
        bars(ax, ok, "peak_mib", "peak memory, MiB", lambda v: f"{v:,.0f}" if v else "—")
        save(fig, "memory")
    if report["contributions"]:
        cs = report["contributions"]
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(cs)))
        ax.barh(range(len(cs)), [c["change_pct"] for c in cs], edgecolor="black",
                color=["tab:green" if c["change_pct"] >= 0 else "tab:red" for c in cs],
                hatch=["" if c["method"] == "one-at-a-time" else ".." for c in cs])
        ax.set_yticks(range(len(cs)), [f"{c['setting']}: {c['baseline_option']} → {c['option']}\n({c['method']})"
                                       for c in cs], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("% change in tokens/s per device vs baseline")
        save(fig, "contributions")
    curves = [r for r in runs if r.losses]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in curves:
            ax.plot(*zip(*r.losses), label=r.label, marker=".")
        ax.set(xlabel="step", ylabel="train/loss", title="loss: techniques should not change learning")
        ax.legend(fontsize=7)
        save(fig, "loss")
    if report.get("autotune"):
        made.update(autotune_sweep.plot(report["autotune"], out))
    return made


# ---------------------------------------------------------------- Markdown, HTML, JSON

def _fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "—"
    return {"ratio": f"×{v:.2f}", "mfu": f"{v:.2%}", "tflops": f"{v:.3g}", "loss": f"{v:.3f}",
            "exposed_comm_ms": f"{v:.1f}"}.get(kind, f"{v:,.0f}")


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    conv = report["convention"]
    heads = ["run", "status"] + [h for _, title in METRICS for h in (title.replace("TFLOPS", f"TFLOPS ({conv})")
                                                                       .replace("MFU", f"MFU ({conv})"), "vs base")]
    heads += ["final loss"]
    predicted = any(row["predicted_1024_a800"] for row in report["rows"])
    heads += ["these techniques on Baichuan-7B, 1024×A800 (predicted): TFLOPS / MFU vs 312 (palm) [interval]"
              ] if predicted else []
    if len(report["baselines"]) > 1:
        heads.insert(2, "comparison group")
    body = []
    for row in report["rows"]:
        cells = [row["label"], "baseline" if row["baseline"] else row["status"]]
        ratios = row.get("vs_baseline", {})
        cells += [c for k, _ in METRICS for c in (_fmt(row.get(k), k), _fmt(ratios.get(k), "ratio"))]
        cells += [_fmt(row["final_loss"], "loss")]
        if predicted:
            p = row["predicted_1024_a800"]
            cells += [(f"{_fmt(p['tflops_per_gpu'], 'tflops')} / {p['mfu']:.1%} "
                       f"[{p.get('mfu_low', p['mfu']):.1%}–{p.get('mfu_high', p['mfu']):.1%}]"
                       + ("" if p.get("fits_memory", True) else " (does not fit in 80 GB)")) if p else "—"]
        if len(report["baselines"]) > 1:
            cells.insert(2, row["group"])
        body.append(cells)
    return heads, body


def _blocks(report: dict, images: dict[str, Path]) -> list[tuple]:
    """The report as a list of blocks that Markdown and HTML each render: (kind, payload)."""
    heads, body = table(report)
    b: list[tuple] = [("h1", "chuanliu ablation report"), ("h2", "Ablation table")]
    b += [("p", (f"Medians over steady-state steps; ratios (×) against the baseline of each comparison group "
                f"({'; '.join(f'{g}: {lbl}' for g, lbl in report['baselines'].items()) or 'none: no run finished'}). "
                f"FLOPs convention: {report['convention']}."))]
    b += [("p", f"Warning: {w}") for w in report["warnings"]]
    b += [("table", (heads, body))] + [("img", n) for n in ("ablation", "memory") if n in images]
    b += [("h2", "Contribution of each technique")]
    cs = report["contributions"]
    if cs:
        b += [("p", ("Change in tokens/s per device against the baseline. one-at-a-time: runs that differ from the "
                    "baseline in this setting alone; marginal: mean of runs with the option over mean of runs "
                    "without."))]
        b += [("table", (["setting", "baseline → option", "tokens/s change", "method", "runs"],
                         [[c["setting"], f"{c['baseline_option']} → {c['option']}", f"{c['change_pct']:+.1f}%",
                           c["method"] + (f" (confounded with {', '.join(c['confounded_with'])})"
                                          if c["confounded_with"] else ""),
                           "; ".join(c["runs"])] for c in cs])), ("img", "contributions")]
    else:
        b += [("p", "No setting differs from a baseline (a single run, or runs that cannot be compared).")]
    b += [("h2", "Distance to Baichuan-7B (182 TFLOPS/GPU, 58.3% MFU)")]
    d = report["distance"]
    if d:
        hw, ref = d["hardware"], d["reference"]
        b += [("p", f"FLOPs convention: {d['convention']}, {d['convention_text']}. {d['caveat']}"),
              ("p", (f"Hardware: {hw['device_name']} ({hw['device_type']}, {hw['world_size']} rank(s)), {hw['dtype']} "
                    f"peak {_fmt(hw['peak_tflops'], 'tflops')} TFLOPS ({hw['peak_source'] or 'source unknown'}). "
                    f"Reference: {ref['gpus']} × {ref['device'].upper()}, {ref['dtype']} peak "
                    f"{ref['peak_tflops']:.0f} TFLOPS.")),
              ("p", (f"Best run by MFU: {d['best_run']}: MFU {d['mfu']:.2%} = ×{d['mfu_vs_58_3']:.3f} of 58.3%; "
                    f"{_fmt(d['tflops_per_device'], 'tflops')} TFLOPS/device = "
                    f"×{d['tflops_vs_182'] or 0:.2g} of 182.")),
              ("p", d["meaning"])]
        preds = [(r["label"], r["predicted_1024_a800"]) for r in report["rows"] if r.get("predicted_1024_a800")]
        if preds:
            label, p = max(preds, key=lambda lp: lp[1]["tflops_per_gpu"])
            b += [("p", (f"Predicted at scale ({PREDICTED_SETUP}; method and validation in docs/predictor.md): "
                        f"the best technique set here, {label}, would reach {p['tflops_per_gpu']:.0f} TFLOPS/GPU, "
                        f"MFU {p['mfu']:.1%} of the 312 bf16 peak (interval "
                        f"{p.get('mfu_low', p['mfu']):.1%}–{p.get('mfu_high', p['mfu']):.1%})"
                        f"{'' if p.get('fits_memory', True) else ' (but would not fit in 80 GB)'}, against "
                        f"Baichuan-7B's 182 / 58.3% (the predictor's preset `all`, every technique on, gives the "
                        f"validated figure in docs/predictor.md)."))]
    else:
        b += [("p", "No finished run reports an MFU.")]
    if report.get("autotune"):
        b += [blk for blk in autotune_sweep.blocks(report["autotune"]) if blk[0] != "img" or blk[1] in images]
    if "loss" in images:
        b += [("h2", "Loss curves"), ("img", "loss")]
    return b


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, x in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {x}")
        elif kind == "p":
            out.append(x)
        elif kind == "img":
            out.append(f"![{x}]({x}.png)")
        else:
            heads, rows = x
            lines = [heads, ["---"] * len(heads), *rows]
            out.append("\n".join("| " + " | ".join(str(c).replace("|", "/") for c in ln) + " |" for ln in lines))
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[tuple], images: dict[str, Path]) -> str:
    parts = []
    for kind, x in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(x)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(x)}</p>")
        elif kind == "img":  # embedded, so the page opens offline and can be mailed as one file
            data = base64.b64encode(images[x].read_bytes()).decode()
            parts.append(f'<img alt="{x}" src="data:image/png;base64,{data}">')
        else:
            heads, rows = x
            th = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            parts.append(f"<table><tr>{th}</tr>{trs}</table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}img{max-width:100%;display:block}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>chuanliu report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def log_to_wandb(report: dict, images: dict[str, Path], out: Path, mode: str) -> str | None:
    """One wandb run (job_type=report) in the sweep's group: the table as a wandb.Table, the plots as images.
    A wandb failure is a warning: the files are already written."""
    try:
        import wandb

        config = {"convention": report["convention"], "runs": [r["path"] for r in report["rows"]]}
        run = wandb.init(project="chuanliu", job_type="report", dir=str(out), group=report["wandb_group"],
                         mode=mode, name=f"report-{out.parent.name}", config=config)
        heads, body = table(report)
        run.log({"ablation/table": wandb.Table(columns=heads, data=body),
                 **{f"ablation/{name}": wandb.Image(str(p)) for name, p in images.items()}})
        if report.get("autotune"):  # every trial of the sweep, infeasible ones included
            heads, body = autotune_sweep.trials_table(report["autotune"])
            run.log({"autotune/trials": wandb.Table(columns=heads, data=body)})
        run.finish()
    except Exception as e:  # noqa: BLE001
        print(f"chuanliu report: warning: wandb logging failed ({type(e).__name__}: {e}); files are written",
              file=sys.stderr)
        return None
    return f"wandb sync {out}/wandb/offline-run-*" if mode == "offline" else f"logged to wandb ({mode})"


def write_report(runs: list[Run], report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = plot(report, runs, out)
    blocks = _blocks(report, images)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, images))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if report.get("autotune"):  # the sweep's best command line and YAML, beside its trials (not inside a run)
        autotune_sweep.write_best(report["autotune"])
    return images


def default_out(first: Path) -> Path:
    return first.parent / f"{first.name}-report" if _is_run(first) else first / "report"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run directories, multirun directories, or folders holding runs")
    p.add_argument("--out", help="output folder (default: <multirun>/report or <run>-report beside a run)")
    p.add_argument("--baseline", help="baseline run: index in the listed order, label, or path (default: first)")
    p.add_argument("--convention", default=DEFAULT_CONVENTION, choices=CONVENTIONS)
    p.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"))
    args = p.parse_args(argv)
    try:
        runs = collect(args.paths)
        out = Path(args.out) if args.out else default_out(Path(args.paths[0]))
        inside = [r for r in runs if out.resolve().is_relative_to(r.path.resolve())]
        if inside:
            raise ReportError(f"--out {out} is inside run {inside[0].path}; the report never writes into runs")
        report = build_report(runs, baseline=args.baseline, convention=args.convention)
    except ReportError as e:
        print(f"chuanliu report: error: {e}", file=sys.stderr)
        return 2
    images = write_report(runs, report, out)
    print(f"{len(runs)} run(s), {sum(r.ok for r in runs)} finished: wrote report.md, report.html, report.json, "
          f"{', '.join(f'{n}.png' for n in images)} to {out}")
    if args.wandb != "disabled":
        note = log_to_wandb(report, images, out, args.wandb)
        report["wandb"] = {"mode": args.wandb, "group": report["wandb_group"], "ok": note is not None}
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        if note:
            print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

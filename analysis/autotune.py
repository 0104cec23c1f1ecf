"""An autotune sweep as the report sees it: its trials, the best configuration, how much each knob mattered.

    python -m analysis.report multirun/<stamp>     # an autotune sweep's report gets an "Autotune" section

Reads only files (never a training process): each trial's ``autotune_trial.json`` (experiments/autotune.py writes
it before training, or instead of training when the memory estimate rules the trial out), ``.hydra/`` and
``summary.json``. ``summarise`` gathers them; ``write_best`` writes into the sweep directory

    best.yaml          the best trial: tokens/s, its knobs, the command line, the overrides
    best_command.txt   that command line, ready to run (the trial's choices; the default length of a run)
    best_config.yaml   its resolved config with the accumulation the trial used (no autotune node)

and analysis/report.py renders ``blocks`` and ``plot`` (objective over trials, importance per knob).
"""
from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path
from typing import Any

import yaml

TRIAL_FILE = "autotune_trial.json"
INFEASIBLE = 0.0  # what an infeasible trial returns to the sampler: below any real throughput
# Overrides that belong to the search, not to the configuration it found.
NOT_THE_CONFIG = ("experiment=", "hydra.", "autotune.", "train.grad_accum_steps=", "train.steps=",
                  "train.summary_warmup_steps=")


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def is_trial(run_dir: Path) -> bool:
    return (run_dir / TRIAL_FILE).is_file()


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _pairs(overrides: list[str]) -> dict[str, str]:
    return dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o and not o.startswith("~"))


def _primary_choices(runtime: dict) -> dict[str, str]:
    """The options the primary config (conf/config.yaml) selects, read from the trial's main config source: a
    command line then names only the groups that differ. Empty when the source cannot be read."""
    src = next((s.get("path") for s in runtime.get("config_sources") or []
                if s.get("provider") == "main" and s.get("schema") == "file"), None)
    conf = _yaml(Path(src) / f"{runtime.get('config_name') or 'config'}.yaml") if src else None
    entries = (conf or {}).get("defaults") or [] if isinstance(conf, dict) else []
    return {k: str(v) for d in entries if isinstance(d, dict) for k, v in d.items() if v is not None}


def load_trial(job: Path) -> dict[str, Any]:
    rec = json.loads((job / TRIAL_FILE).read_text()) if is_trial(job) else {
        "status": "failed", "objective": None, "reason": f"no {TRIAL_FILE}: the job died before it wrote one"}
    hydra = (_yaml(job / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    overrides = rec.get("overrides") or [str(o) for o in _yaml(job / ".hydra" / "overrides.yaml") or []]
    try:
        summary = json.loads((job / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    peak = ((summary or {}).get("median") or {}).get("mem/peak_bytes")
    return {"trial": int(job.name), "path": str(job), "status": rec["status"], "objective": rec.get("objective"),
            "reason": rec.get("reason", ""), "estimate_gib": rec.get("estimate_gib"),
            "memory_cap_gib": rec.get("memory_cap_gib"), "wall_s": rec.get("wall_s"),
            "micro_batch_size": rec.get("micro_batch_size"), "grad_accum_steps": rec.get("grad_accum_steps"),
            "overrides": overrides, "values": _pairs(overrides), "wandb_group": rec.get("wandb_group"),
            "choices": {k: str(v) for k, v in ((hydra.get("runtime") or {}).get("choices") or {}).items()},
            "primary_choices": _primary_choices(hydra.get("runtime") or {}),
            "searched": list(((hydra.get("sweeper") or {}).get("params") or {})),
            "launched": summary is not None or (job / "metrics.jsonl").exists(),
            "peak_gib": peak / 2**30 if isinstance(peak, (int, float)) else None}


def importance(trials: list[dict], knobs: list[str]) -> dict[str, float | None]:
    """Per knob, the share of the variance of tokens/s (feasible trials) that its values explain: one-way ANOVA's
    eta^2 = SS_between / SS_total. Main effects only and no correction for the sampler's uneven draws (Optuna's
    fANOVA needs scikit-learn, which is not a dependency); a knob a trial did not have counts as its own value."""
    ok = [t for t in trials if t["status"] == "ok" and t["objective"]]
    if len(ok) < 3:
        return {k: None for k in knobs}
    mean = statistics.fmean(t["objective"] for t in ok)
    total = sum((t["objective"] - mean) ** 2 for t in ok)
    out: dict[str, float | None] = {}
    for k in knobs:
        groups: dict[str, list[float]] = {}
        for t in ok:
            groups.setdefault(t["values"].get(k, "(n/a)"), []).append(t["objective"])
        between = sum(len(v) * (statistics.fmean(v) - mean) ** 2 for v in groups.values())
        out[k] = between / total if total > 0 else None
    return out


def best_command(trial: dict) -> str:
    """The trial's configuration as a plain run: each config group whose option differs from the primary config's
    (all of them when that is unknown), the plain overrides the search set (micro-batch, ZeRO stage, bucket
    size...) and the accumulation it used; not the search's own settings (trial length, sweeper, cap)."""
    default = trial.get("primary_choices") or {}
    args = [f"{g}={o}" for g, o in sorted(trial["choices"].items())
            if not g.startswith(("hydra", "experiment")) and default.get(g) != o]
    args += [o for o in trial["overrides"]
             if not o.startswith(NOT_THE_CONFIG) and o.lstrip("+").split("=", 1)[0] not in trial["choices"]]
    if trial.get("grad_accum_steps") is not None:
        args.append(f"train.grad_accum_steps={trial['grad_accum_steps']}")
    return "python -m experiments.train " + " ".join(shlex.quote(a) for a in args)


def summarise(sweep: Path | str) -> dict | None:
    """The sweep's trials, knobs, counts, best trial and importances; None when it holds no autotune trial."""
    sweep = Path(sweep)
    jobs = _job_dirs(sweep) if sweep.is_dir() else []
    if not any(is_trial(j) for j in jobs):
        return None
    trials = [load_trial(j) for j in jobs]
    searched = next((t["searched"] for t in trials if t["searched"]), [])
    # What varied: the sweeper's params plus the conditional knobs, minus those fixed on the command line.
    candidates = list(dict.fromkeys([*searched, *(k for t in trials for k in t["values"])]))
    knobs = [k for k in candidates if not k.startswith(NOT_THE_CONFIG)
             and len({t["values"].get(k) for t in trials}) > 1]
    fixed = {k: v for k, v in trials[0]["values"].items()
             if k not in knobs and not k.startswith(NOT_THE_CONFIG) and all(t["values"].get(k) == v for t in trials)}
    ok = [t for t in trials if t["status"] == "ok" and t["objective"]]
    out: dict[str, Any] = {
        "sweep_dir": str(sweep), "knobs": knobs, "fixed": fixed, "trials": trials,
        "counts": {s: sum(t["status"] == s for t in trials) for s in ("ok", "repeat", "infeasible", "failed")},
        # The promise: nothing the estimate ruled out was built or trained.
        "infeasible_launched": [t["trial"] for t in trials if t["status"] == "infeasible" and t["launched"]],
        "importance": importance(trials, knobs),
        "wandb_group": next((t["wandb_group"] for t in trials if t["wandb_group"]), f"sweep-{sweep.name}"),
        "optuna": _yaml(sweep / "optimization_results.yaml")}
    if ok:
        best = max(ok, key=lambda t: t["objective"])
        out["best"] = {"trial": best["trial"], "tokens_per_s": best["objective"],
                       "knobs": {k: best["values"].get(k) for k in knobs},
                       "micro_batch_size": best["micro_batch_size"], "grad_accum_steps": best["grad_accum_steps"],
                       "estimate_gib": best["estimate_gib"], "command": best_command(best),
                       "overrides": best["overrides"]}
    return out


def write_best(found: dict) -> list[Path]:
    """best.yaml, best_command.txt and best_config.yaml into the sweep directory (nothing without a best)."""
    if "best" not in found:
        return []
    sweep, best = Path(found["sweep_dir"]), found["best"]
    (sweep / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False, allow_unicode=True))
    (sweep / "best_command.txt").write_text(best["command"] + "\n")
    written = [sweep / "best.yaml", sweep / "best_command.txt"]
    resolved = _yaml(sweep / str(best["trial"]) / ".hydra" / "config.yaml")
    if isinstance(resolved, dict):  # Hydra saved it before the trial set its accumulation: set it here
        resolved.pop("autotune", None)
        resolved.setdefault("train", {})["grad_accum_steps"] = best["grad_accum_steps"]
        (sweep / "best_config.yaml").write_text(
            f"# autotune's best trial ({best['tokens_per_s']:,.0f} tokens/s), trial {best['trial']} of {sweep}\n"
            f"#   python -m experiments.train --config-dir {sweep} --config-name best_config\n"
            + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
        written.append(sweep / "best_config.yaml")
    return written


# ------------------------------------------------------------------------------------------ report section
def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def trials_table(found: dict) -> tuple[list[str], list[list[str]]]:
    heads = ["trial", *found["knobs"], "accum", "status", "estimate GiB", "tokens/s", "wall s"]
    rows = []
    for t in found["trials"]:
        value = _fmt(t["objective"], ",.0f") if t["status"] in ("ok", "repeat") else "—"
        status = t["status"] + (f" ({t['reason']})" if t["status"] != "ok" and t["reason"] else "")
        rows.append([str(t["trial"]), *(t["values"].get(k, "") for k in found["knobs"]),
                     _fmt(t["grad_accum_steps"], "d"), status, _fmt(t["estimate_gib"], ".3f"), value,
                     _fmt(t["wall_s"], ".1f")])
    return heads, rows


def blocks(found: dict) -> list[tuple]:
    """The report's Autotune section as (kind, payload) blocks (analysis.report renders them)."""
    c = found["counts"]
    b: list[tuple] = [("h2", "Autotune"), ("p", (
        f"{len(found['trials'])} trials: {c['ok']} trained, {c['repeat']} repeats of a trained configuration "
        f"(its measurement reused), {c['infeasible']} infeasible (the memory estimate "
        f"exceeded the cap, so nothing was built or trained; launched anyway: "
        f"{found['infeasible_launched'] or 'none'}), {c['failed']} failed. Objective: steady-state median "
        f"tokens/s of each trial's short run. Same in every trial: "
        + (" ".join(f"{k}={v}" for k, v in found["fixed"].items()) or "nothing fixed") + "."))]
    if "best" in found:
        best = found["best"]
        b += [("p", f"Best: trial {best['trial']}, {best['tokens_per_s']:,.0f} tokens/s; run it with:"),
              ("p", best["command"])]
    imp = {k: v for k, v in found["importance"].items() if v is not None}
    if imp:
        b += [("p", "Importance per knob: the share of the variance of tokens/s over the trained trials that the "
                    "knob's values explain (one-way ANOVA eta², main effects only; the sampler's uneven draws "
                    "confound knobs, so read it as a ranking): "
                    + ", ".join(f"{k} {v:.0%}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1])) + ".")]
    b += [("table", trials_table(found))]
    b += [("img", n) for n in ("autotune_objective", "autotune_importance")]
    return b


def plot(found: dict, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made[name] = out / f"{name}.png"

    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = 0.0, [], []
    for t in found["trials"]:
        if t["status"] in ("ok", "repeat") and t["objective"]:  # a repeat: an earlier trial's measurement
            ax.scatter(t["trial"], t["objective"], edgecolors="tab:blue",
                       facecolors="tab:blue" if t["status"] == "ok" else "none")
            best = max(best, t["objective"])
        else:
            ax.scatter(t["trial"], 0, marker="x", color="tab:red" if t["status"] == "infeasible" else "grey")
        xs.append(t["trial"]), ys.append(best)
    ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.set(xlabel="trial", ylabel="tokens/s (steady-state median)",
           title="Autotune objective (hollow: repeat; x at 0: red infeasible, grey failed)")
    ax.legend(fontsize=8)
    save(fig, "autotune_objective")

    imp = [(k, v) for k, v in found["importance"].items() if v is not None]
    if imp:
        imp.sort(key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(imp)))
        ax.barh(range(len(imp)), [v for _, v in imp], color="tab:green", edgecolor="black")
        ax.set_yticks(range(len(imp)), [k for k, _ in imp], fontsize=8)
        ax.set(xlim=(0, 1), xlabel="share of tokens/s variance explained (eta², main effect)",
               title="Importance per knob")
        save(fig, "autotune_importance")
    return made

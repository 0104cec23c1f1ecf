"""Autotune: an Optuna search over the technique knobs through Hydra's sweeper, and what it found.

    python -m experiments.train -m experiment=autotune      # the search (conf/experiment/autotune.yaml)
    python -m experiments.autotune multirun/<stamp>         # best command + YAML, trials table, plots (again)

Each trial is one Hydra job. ``run_trial`` (called by experiments.train under a config with an ``autotune`` node)
first estimates the run's memory per rank (experiments.memory.estimate_memory, engine-aware); over
``autotune.memory_cap_gib`` the trial is recorded as infeasible and returns 0 without building or training anything.
Otherwise it trains and returns the steady-state median tokens/s, the objective the sweeper maximises. Every job
leaves ``autotune_trial.json`` in its directory; ``report`` gathers them when the sweep ends (ReportCallback) or
from the command line, and writes into the sweep directory:

    best.yaml, best_command.txt   the best feasible trial: objective, overrides, a ready-to-run command line
    best_config.yaml              its resolved config
    trials.md, trials.json        every trial: knobs, status (ok / infeasible / failed), estimate, tokens/s
    autotune_objective.png        tokens/s per trial and the best so far
    autotune_knobs.png            per knob, the mean tokens/s of the feasible trials at each value
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

GIB = 2**30
TRIAL_FILE = "autotune_trial.json"
INFEASIBLE = 0.0  # what an infeasible trial returns: below any real throughput, so the sampler steers away


@dataclass(frozen=True)
class AutotuneConfig:
    """conf/experiment/autotune.yaml's ``autotune`` node."""

    global_batch: int | None = 8  # sequences per rank per optimizer step; None: train.grad_accum_steps as given
    memory_cap_gib: float = 64.0  # per rank, on experiments.memory's estimate; over it a trial is not launched


def _div(total, part) -> int:
    total, part = int(total), int(part)
    if part <= 0 or total % part:
        raise ValueError(f"autotune.global_batch={total} is not a multiple of train.micro_batch_size={part}")
    return total // part


def estimate_gib(cfg: DictConfig) -> float:
    """The per-rank memory estimate of this config, computed as experiments.trainer.check_memory does (before
    anything is allocated), without its refusal: the cap decides here."""
    from experiments.dist import dist_info
    from experiments.memory import estimate_memory
    from experiments.trainer import pick_device, read_settings
    from systems.fusion import resolve

    s = read_settings(cfg)
    info = dist_info()
    device = pick_device(s.train, info)
    # The data-parallel size the trainer's layout uses (world / (tp x pp)); pure, builds no mesh.
    parallel = getattr(s, "parallel", None)
    dp = (parallel.layout(info.world_size, n_heads=s.model.n_heads, n_layers=s.model.n_layers)["dp"]
          if parallel is not None else info.world_size)
    memory = estimate_memory(
        s.model, seq=s.train.seq_len, micro_batch=s.train.micro_batch_size, splitting=s.splitting,
        kernels=resolve(s.fusion, device.type, s.precision.compute_dtype, s.splitting.refused_kernels()),
        compute_dtype=s.precision.compute_dtype, engine_cfg=s.engine, dp=dp,
        bucket_bytes=int(s.bucket.bucket_cap_mb * 2**20))
    return memory.total / GIB


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.exists() else []


def run_trial(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict]) -> float:
    """One autotune trial: infeasible (never launched) over the memory cap, else train and return median tokens/s."""
    from experiments.config import typed
    from experiments.dist import dist_info

    tune: AutotuneConfig = typed(cfg.autotune, "autotune")
    if tune.global_batch is not None:  # a fixed global batch: the micro-batch knob decides the accumulation
        cfg.train.grad_accum_steps = _div(tune.global_batch, cfg.train.micro_batch_size)
    cap = float(tune.memory_cap_gib)
    record: dict[str, Any] = {"overrides": _overrides(run_dir), "memory_cap_gib": cap,
                              "micro_batch_size": int(cfg.train.micro_batch_size),
                              "grad_accum_steps": int(cfg.train.grad_accum_steps),
                              "wandb_group": OmegaConf.select(cfg, "logging.group")}  # one group per sweep
    main = dist_info().is_main
    try:
        gib = estimate_gib(cfg)
    except Exception as e:  # a config the trainer would refuse: let the trainer say why (the trial fails)
        log.warning("autotune: no memory estimate (%s); training decides", e)
        gib = None
    record["estimate_gib"] = gib
    if gib is not None and gib > cap:
        record.update(status="infeasible", objective=INFEASIBLE, wall_s=0.0,
                      reason=f"estimate {gib:.3f} GiB > cap {cap:g} GiB")
        log.warning("autotune: infeasible, not launched: %s", record["reason"])
        if main:
            (run_dir / TRIAL_FILE).write_text(json.dumps(record, indent=1) + "\n")
        return INFEASIBLE
    t0 = time.perf_counter()
    record["status"] = "failed"
    try:
        try:
            summary = train(cfg, run_dir)
        except SystemExit as e:  # a refused config: under a sweep a failed trial (max_failure_rate), not the end
            if not _multirun():
                raise
            raise RuntimeError(f"trial refused: {e.code}") from None
        value = float(summary.get("median", {}).get("perf/tokens_per_s") or INFEASIBLE)
        record.update(status="ok", objective=value)
        return value
    finally:
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        if main:
            (run_dir / TRIAL_FILE).write_text(json.dumps(record, indent=1) + "\n")


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ----------------------------------------------------------------------------------------------------- the report
def _knobs(sweep_dir: Path, jobs: list[Path]) -> list[str]:
    """The swept keys: the sweeper's params, from a job's saved Hydra config (the Optuna sweeper writes no
    multirun.yaml). A key also fixed on the command line is one value in every trial (see the table's header)."""
    for job in jobs:
        path = job / ".hydra" / "hydra.yaml"
        if path.exists():
            conf = yaml.safe_load(path.read_text()) or {}
            params = ((conf.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
            if params:
                return list(params)
    return []


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for job in _job_dirs(sweep_dir):
        overrides = _overrides(job)
        trial_path = job / TRIAL_FILE
        rec = json.loads(trial_path.read_text()) if trial_path.exists() else {
            "status": "failed", "objective": None, "overrides": overrides}
        knobs = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("~", "+")))
        rows.append({"trial": int(job.name), "status": rec["status"], "objective": rec.get("objective"),
                     "estimate_gib": rec.get("estimate_gib"), "wall_s": rec.get("wall_s"),
                     "micro_batch_size": rec.get("micro_batch_size"), "grad_accum_steps": rec.get("grad_accum_steps"),
                     "knobs": knobs, "overrides": overrides, "has_summary": (job / "summary.json").exists()})
    return rows


def best_command(row: dict) -> str:
    args = [o for o in row["overrides"] if not o.startswith("train.grad_accum_steps=")]
    args.sort(key=lambda o: not o.startswith("experiment="))  # the preset first, then the knobs as chosen
    if row.get("grad_accum_steps") is not None:
        args.append(f"train.grad_accum_steps={row['grad_accum_steps']}")
    return "python -m experiments.train " + " ".join(shlex.quote(a) for a in args)


def report(sweep_dir: Path | str) -> dict:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"chuanliu: error: {sweep_dir} has no trial directories (0/, 1/, ...)")
    searched = _knobs(sweep_dir, _job_dirs(sweep_dir)) or sorted({k for r in rows for k in r["knobs"]})
    # Knobs that took one value in every trial (fixed on the command line, or never varied) head the table instead.
    knobs = [k for k in searched if len({r["knobs"].get(k) for r in rows}) > 1]
    fixed = {k: v for k, v in rows[0]["knobs"].items() if k not in knobs and all(r["knobs"].get(k) == v for r in rows)}
    ok = [r for r in rows if r["status"] == "ok" and r["objective"]]
    best = max(ok, key=lambda r: r["objective"]) if ok else None
    out: dict[str, Any] = {"sweep_dir": str(sweep_dir), "knobs": knobs, "fixed": fixed, "trials": rows,
                           "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "infeasible", "failed")}}
    if best:
        out["best"] = {"trial": best["trial"], "tokens_per_s": best["objective"], "knobs": best["knobs"],
                       "overrides": best["overrides"], "grad_accum_steps": best["grad_accum_steps"],
                       "command": best_command(best)}
        (sweep_dir / "best.yaml").write_text(yaml.safe_dump(out["best"], sort_keys=False, allow_unicode=True))
        (sweep_dir / "best_command.txt").write_text(out["best"]["command"] + "\n")
        resolved = sweep_dir / str(best["trial"]) / ".hydra" / "config.yaml"
        if resolved.exists():  # Hydra saved it before run_trial set the accumulation: set it here too
            conf = yaml.safe_load(resolved.read_text())
            conf.setdefault("train", {})["grad_accum_steps"] = best["grad_accum_steps"]
            (sweep_dir / "best_config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False, allow_unicode=True))
    (sweep_dir / "trials.json").write_text(json.dumps(out, indent=1) + "\n")
    (sweep_dir / "trials.md").write_text(_markdown(rows, knobs, fixed, best))
    try:
        _plots(sweep_dir, rows, knobs)
    except Exception as e:  # plots are a convenience: never lose the table for them
        log.warning("autotune: plots not written: %s", e)
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _markdown(rows: list[dict], knobs: list[str], fixed: dict, best: dict | None) -> str:
    head = ["trial", *knobs, "accum", "status", "estimate GiB", "tokens/s", "wall s"]
    lines = ["# Autotune trials", ""]
    if best:
        lines += [f"Best: trial {best['trial']}, {best['objective']:,.0f} tokens/s", "", "```bash",
                  best_command(best), "```", ""]
    if fixed:
        lines += ["Same in every trial: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = _fmt(r["objective"], ",.0f") if r["status"] == "ok" else "-"
        cells = [str(r["trial"]), *(r["knobs"].get(k, "") for k in knobs), _fmt(r["grad_accum_steps"], "d"),
                 r["status"], _fmt(r["estimate_gib"], ".3f"), value, _fmt(r["wall_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(sweep_dir: Path, rows: list[dict], knobs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = 0.0, [], []
    for r in rows:
        v = r["objective"] if r["status"] == "ok" and r["objective"] else None
        if v is None:
            ax.scatter(r["trial"], 0, marker="x", color="red" if r["status"] == "infeasible" else "grey")
        else:
            ax.scatter(r["trial"], v, color="tab:blue")
            best = max(best, v)
        xs.append(r["trial"]), ys.append(best)
    ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial"), ax.set_ylabel("tokens/s (median)")
    ax.set_title("Autotune objective (x: infeasible in red, failed in grey)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(sweep_dir / "autotune_objective.png", dpi=100)
    plt.close(fig)

    ok = [r for r in rows if r["status"] == "ok" and r["objective"]]
    if not knobs:
        return
    fig, axes = plt.subplots(1, len(knobs), figsize=(3 * len(knobs), 3.2), squeeze=False)
    for ax, knob in zip(axes[0], knobs):
        values = sorted({r["knobs"].get(knob, "?") for r in rows})
        means = []
        for v in values:
            got = [r["objective"] for r in ok if r["knobs"].get(knob, "?") == v]
            means.append(sum(got) / len(got) if got else 0.0)
        ax.bar(range(len(values)), means)
        ax.set_xticks(range(len(values)), values)
        ax.set_title(knob, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0][0].set_ylabel("mean tokens/s (feasible)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "autotune_knobs.png", dpi=100)
    plt.close(fig)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class ReportCallback(Callback):  # type: ignore[misc,valid-type]
    """Writes the report into the sweep directory when an autotune multirun ends (rank 0 only)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.dist import dist_info

        if not dist_info().is_main:
            return
        out = report(Path(config.hydra.sweep.dir))
        if "best" in out:
            log.info("autotune: best %s tokens/s: %s", f"{out['best']['tokens_per_s']:,.0f}", out["best"]["command"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    out = report(args.sweep_dir)
    print(json.dumps({"counts": out["counts"], "best": out.get("best")}, indent=1))


if __name__ == "__main__":
    main()

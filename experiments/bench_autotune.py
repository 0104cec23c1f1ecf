"""The autotuner against the full grid on one small space: best tokens/s found, trials and wall time per method.

    python -m experiments.bench_autotune                       # model=small, 16-point grid vs 6 TPE trials
    python -m experiments.bench_autotune --steps 6 --seq-len 256 --trials 8 --out docs/benchmarks/autotune.json

Both methods run through the same entry point and Optuna sweeper (experiment=autotune): the grid with
hydra/sweeper/sampler=grid over every point, the autotuner with the preset's TPE sampler and fewer trials. The
space: train.micro_batch_size (1, 2, 4, 8 at a global batch of 8) x splitting (none, selective_recompute) x
precision (fp32, bf16), the other knobs fixed. Few steps make tokens/s noisy: the JSON also gives the grid's own
measurement of the configuration the autotuner picked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.autotune import report

REPO = Path(__file__).resolve().parents[1]
FIXED = ["fusion=sdpa", "engine=ddp", "comm/bucket=fixed", "comm/overlap=on", "logging=disabled"]
SPLITTING = "hydra.sweeper.params.splitting='none,selective_recompute'"
GRID_POINTS = 4 * 2 * 2


def sweep(method: str, out_dir: Path, *, model: str, steps: int, seq_len: int, trials: int) -> dict:
    sweep_dir = out_dir / method
    args = [sys.executable, "-m", "experiments.train", "-m", "experiment=autotune", f"model={model}",
            f"train.steps={steps}", f"train.summary_warmup_steps={max(1, steps // 3)}", f"train.seq_len={seq_len}",
            *FIXED, SPLITTING,
            f"hydra.sweep.dir={sweep_dir}"]
    args += (["hydra/sweeper/sampler=grid", f"hydra.sweeper.n_trials={GRID_POINTS}"] if method == "grid"
             else [f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.sampler.seed=0"])
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{method} sweep failed:\n{proc.stderr[-3000:]}")
    rep = report(sweep_dir)
    best = rep.get("best") or {}
    return {"method": method, "command": " ".join(args[1:]), "trials": len(rep["trials"]), "counts": rep["counts"],
            "wall_s": round(wall, 1), "best_tokens_per_s": best.get("tokens_per_s"),
            "best_knobs": {k: best.get("knobs", {}).get(k) for k in rep["knobs"]},
            "best_command": best.get("command"),
            "table": [{"knobs": {k: t["knobs"].get(k) for k in rep["knobs"]}, "status": t["status"],
                       "tokens_per_s": t["objective"], "wall_s": t["wall_s"]} for t in rep["trials"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trials", type=int, default=6, help="the autotuner's trials (the grid runs all 16)")
    parser.add_argument("--work", type=Path, default=REPO / "multirun" / "bench_autotune")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "autotune.json")
    args = parser.parse_args(argv)
    from analysis.peaks import cpu_name

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    work = args.work / stamp
    results = [sweep(m, work, model=args.model, steps=args.steps, seq_len=args.seq_len, trials=args.trials)
               for m in ("grid", "autotune")]
    grid, tuned = results
    same = next((row["tokens_per_s"] for row in grid["table"] if row["knobs"] == tuned["best_knobs"]), None)
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": args.model, "steps": args.steps, "seq_len": args.seq_len, "global_batch": 8,
        "space": {"train.micro_batch_size": [1, 2, 4, 8], "splitting": ["none", "selective_recompute"],
                  "precision": ["fp32", "bf16"], "fixed": FIXED},
        "methods": results,
        "autotune_vs_grid": {
            "best_ratio": (tuned["best_tokens_per_s"] / grid["best_tokens_per_s"]
                           if tuned["best_tokens_per_s"] and grid["best_tokens_per_s"] else None),
            "grid_measured_tokens_per_s_of_autotune_pick": same,
            "wall_ratio": tuned["wall_s"] / grid["wall_s"], "trial_ratio": tuned["trials"] / grid["trials"]},
        "note": "few steps on a shared CPU: tokens/s differences of a few percent are noise",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({m["method"]: {k: m[k] for k in ("trials", "wall_s", "best_tokens_per_s", "best_knobs")}
                      for m in results} | {"autotune_vs_grid": out["autotune_vs_grid"]}, indent=1))


if __name__ == "__main__":
    main()

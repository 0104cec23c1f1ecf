"""Benchmark: step time, tokens/s, TFLOPS and MFU of model sizes against the measured peak, in one process.

    python -m experiments.bench_models                                  # tiny and small, fp32, a few batch sizes
    python -m experiments.bench_models --models small --micro-batches 2 4 8 --steps 20 --precision bf16

Every configuration trains for --steps steps through the same build_run/train_loop as experiments.train; the first
--warmup steps are dropped and the median of the rest is reported. The peak is the cached (or fresh) GEMM
calibration in the run's dtype, so MFU reads as "fraction of what this CPU's GEMM reaches". Writes a JSON file
under docs/benchmarks/ and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import experiments.dist  # noqa: F401  (registers the config resolvers)
from analysis.peaks import cpu_name
from experiments.trainer import build_run, train_loop

REPO = Path(__file__).resolve().parents[1]


def run_config(overrides: list[str], steps: int, warmup: int, run_dir: Path) -> dict:
    """Train one configuration in this process (as experiments.train would) and return its summary."""
    overrides = [*overrides, f"train.steps={steps}", f"train.summary_warmup_steps={warmup}", "logging=disabled",
                 "logging.progress_bar=false", f"train.log_every={steps}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return train_loop(build_run(cfg, run_dir))


def bench_one(model: str, micro_batch: int, precision: str, steps: int, warmup: int, workdir: Path) -> dict:
    summary = run_config([f"model={model}", f"precision={precision}", f"train.micro_batch_size={micro_batch}"],
                         steps, warmup, workdir / f"{model}_{precision}_mb{micro_batch}")
    med, env = summary["median"], summary["environment"]
    return {"model": model, "precision": precision, "micro_batch_size": micro_batch,
            "tokens_per_step": env["tokens_per_step"], "step_ms": 1e3 * med["perf/step_s"],
            "tokens_per_s": med["perf/tokens_per_s"], "tflops_palm": med["perf/tflops/palm"],
            "mfu_palm": med["perf/mfu/palm"], "mfu_6n": med["perf/mfu/6n"], "peak_tflops": env["peak_tflops"],
            "peak_method": env["peak_method"], "threads": env["threads_per_rank"],
            "loss_first": summary["loss"]["first"], "loss_last": summary["loss"]["last"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for mb in args.micro_batches:
                rows.append(bench_one(model, mb, args.precision, args.steps, args.warmup, Path(tmp)))
    header = "| model | precision | micro-batch | tokens/step | step ms | tokens/s | TFLOPS (palm) | MFU palm | MFU 6N |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['micro_batch_size']} | {r['tokens_per_step']} | "
                     f"{r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | {r['tflops_palm']:.4f} | "
                     f"{100 * r['mfu_palm']:.1f}% | {100 * r['mfu_6n']:.1f}% |")
    print("\n".join(lines))
    print(f"\npeak: {rows[0]['peak_method']}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "python": platform.python_version(),
            "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"models_{args.precision}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

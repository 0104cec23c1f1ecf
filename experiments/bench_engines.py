"""Benchmark: the engines side by side (DDP, FSDP2, DeepSpeed ZeRO-2, megatron-core), on 2 and 4 processes.

    python -m experiments.bench_engines                               # small, fp32, 2 and 4 ranks
    python -m experiments.bench_engines --model tiny --ranks 2 --steps 8

For each rank count one Hydra multirun under torchrun sweeps the engines (`-m engine=ddp,fsdp2,...`: the same
model, data, seed, precision and metric definitions, each job in its own run directory; `python -m
analysis.report` reads such a sweep too). Exposed communication: the sweep sets comm/algorithm=flat, so DDP
reduces through chuanliu's hook, which times it directly (the other engines say at start-up that they do not take
the hook); the other engines' collectives are their own, so theirs is estimated as step time minus the same engine's step time on one
rank with the same threads per rank and micro-batch (compute alone). Writes docs/benchmarks/engines_<date>.json
and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis.peaks import cpu_name

REPO = Path(__file__).resolve().parents[1]
ENGINES = ["ddp", "fsdp2", "deepspeed", "megatron"]


def sweep(ranks: int, engines: list[str], common: list[str], out: Path, timeout: float) -> list[Path]:
    """One multirun over the engines on ``ranks`` processes (torchrun when ranks > 1); the jobs' run dirs."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*(launch if ranks > 1 else [sys.executable]), "-m", "experiments.train", "-m",
           f"engine={','.join(engines)}", *common, f"hydra.sweep.dir={out}"]
    # One thread per rank everywhere, so one rank's compute time is what each of N ranks computes.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep on {ranks} ranks failed:\n{proc.stderr[-4000:]}")
    return sorted((p for p in out.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def row(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    med, env = s["median"], s["environment"]
    return {"engine": env["engine"]["engine"], "ranks": env["world_size"], "step_s": med["perf/step_s"],
            "tokens_per_s_per_rank": med["perf/tokens_per_s_per_device"], "mfu_palm": med["perf/mfu/palm"],
            "tflops_palm": med["perf/tflops/palm"], "peak_mib": (s["mem/peak_bytes"] or 0) / 2**20,
            "activation_mib": (med.get("mem/activation_bytes") or 0) / 2**20,
            "exposed_comm_s_measured": med.get("comm/exposed_s"), "knobs": env["engine"],
            "unhonoured": env.get("engine_unhonoured", []), "loss_last": s["loss"]["last"],
            "identical_replicas": s["replicas"]["identical"], "run_dir": str(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    p.add_argument("--engines", nargs="+", default=ENGINES)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"))
    args = p.parse_args()
    common = [f"model={args.model}", f"precision={args.precision}", f"train.micro_batch_size={args.micro_batch}",
              f"train.steps={args.steps}", f"train.summary_warmup_steps={args.warmup}", "logging=disabled",
              "logging.progress_bar=false", f"train.log_every={args.steps}"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        compute = {row(d)["engine"]: row(d)["step_s"]
                   for d in sweep(1, args.engines, common, Path(tmp) / "one_rank", args.timeout)}
        for ranks in args.ranks:
            dirs = sweep(ranks, args.engines, [*common, "comm/algorithm=flat"], Path(tmp) / f"r{ranks}",
                         args.timeout)
            for d in dirs:
                r = row(d)
                r["compute_s_one_rank"] = compute.get(r["engine"])
                r["exposed_comm_s_estimated"] = (max(0.0, r["step_s"] - r["compute_s_one_rank"])
                                                 if r["compute_s_one_rank"] else None)
                rows.append(r)
    base = {r["ranks"]: r for r in rows if r["engine"] == "ddp"}
    lines = ["| ranks | engine | step ms | tokens/s/rank | vs DDP | MFU (palm) | peak MiB/rank | exposed comm ms "
             "(measured / step − 1-rank step) | final loss |", "|" + "---|" * 9]
    for r in rows:
        b = base.get(r["ranks"])
        ratio = r["tokens_per_s_per_rank"] / b["tokens_per_s_per_rank"] if b else None
        measured = r["exposed_comm_s_measured"]
        exposed = (f"{measured * 1e3:.0f} / " if measured is not None else "— / ") + (
            f"{r['exposed_comm_s_estimated'] * 1e3:.0f}" if r["exposed_comm_s_estimated"] is not None else "—")
        lines.append(f"| {r['ranks']} | {r['engine']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s_per_rank']:,.0f} | "
                     f"{'×%.2f' % ratio if ratio else '—'} | {100 * (r['mfu_palm'] or 0):.1f}% | "
                     f"{r['peak_mib']:.0f} | {exposed} | {r['loss_last']:.4f} |")
    print("\n".join(lines))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "args": vars(args), "load_avg_at_end": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engines_{args.precision}_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

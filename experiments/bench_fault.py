"""Fault-tolerance benchmark: time to detect and to recover from each fault, and checkpoint blocking time.

    python -m experiments.bench_fault                       # both sections, writes docs/benchmarks/fault.json
    python -m experiments.bench_fault --section checkpoint --model small

Section ``drills``: one drill per chaos preset (2 ranks under torchrun, tiny model, checkpoint every 5 steps, the
fault at step 12), all compared against one uninterrupted reference run measured in the same session.
Section ``checkpoint``: the same job with fault/checkpoint=off, sync and async; the blocking time per save
(fault/ckpt_block_s) and the whole write time (checkpoint_commit events), with off's step time as the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from analysis.peaks import cpu_name
from fault.events import read_events

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["kill_rank", "exception", "nan_loss", "hang_rank", "slow_rank", "corrupt_checkpoint", "kill_mid_save"]
HANG_TIMEOUT_S = 10.0
COMMON = ["train.steps=30", "fault/checkpoint=sync", "fault.checkpoint.every=5", "logging.wandb_mode=disabled",
          "logging.progress_bar=false", f"fault.watchdog.hang_timeout_s={HANG_TIMEOUT_S}"]


def _torchrun(nproc: int, overrides: list[str], run_dir: Path) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "experiments.train", *overrides, f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=900)
    return time.time() - t0


def drills(root: Path, nproc: int) -> dict:
    ref = root / "reference"
    ref_wall = _torchrun(nproc, COMMON, ref)
    rows = []
    for preset in PRESETS:
        out = root / preset
        cmd = [sys.executable, "-m", "experiments.drill", f"fault/chaos={preset}", *COMMON,
               "fault.chaos.faults.0.rank=1", f"drill.nproc={nproc}", f"drill.reference_dir={ref}",
               f"drill.out={out}", "drill.wandb_mode=disabled"]
        subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=900)
        report = json.loads((out / "drill_report.json").read_text())
        (f,) = report["faults"]
        rows.append({"preset": preset, "fault": f["fault"], "detected_cause": f["detected_cause"],
                     "blamed_rank": f.get("blamed_rank"), "detect_s": f["detect_s"], "recover_s": f["recover_s"],
                     "resumed_from_step": f.get("resumed_from_step"), "steps_lost": f["steps_lost"],
                     "committed_steps_lost": f["committed_steps_lost"], "wall_s": report["wall_s"],
                     "ettr": report["ettr"], "bit_exact": report["loss"]["bit_exact"], "goals": report["goals"]})
        print(f"{preset:<20} detect {f['detect_s'] or 0:6.2f} s  recover {f['recover_s'] or 0:6.2f} s  "
              f"lost {f['steps_lost']}  bit-exact {report['loss']['bit_exact']}", flush=True)
    return {"reference_wall_s": ref_wall, "hang_timeout_s": HANG_TIMEOUT_S, "nproc": nproc, "rows": rows}


def checkpoint_blocking(root: Path, nproc: int, model: str, steps: int, every: int) -> dict:
    out = {}
    for mode in ("off", "sync", "async"):
        run = root / f"ckpt_{mode}"
        _torchrun(nproc, [f"model={model}", f"train.steps={steps}", f"fault/checkpoint={mode}",
                          f"fault.checkpoint.every={every}", "logging.wandb_mode=disabled",
                          "logging.progress_bar=false"], run)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        commits = [e for e in read_events(run) if e["kind"] == "checkpoint_commit"]
        blocks = [m["fault/ckpt_block_s"] for m in metrics if m.get("fault/ckpt_block_s") is not None]
        step_s = [m["perf/step_s"] for m in metrics[3:]]
        out[mode] = {"saves": len(blocks), "block_s_median": statistics.median(blocks) if blocks else None,
                     "write_s_median": statistics.median(c["write_s"] for c in commits) if commits else None,
                     "bytes": commits[-1].get("bytes") if commits else None,
                     "step_s_median": statistics.median(step_s)}
        print(f"checkpoint {mode:<5} {out[mode]}", flush=True)
    base = out["off"]["step_s_median"]
    for mode in ("sync", "async"):
        if out[mode]["block_s_median"] is not None:
            out[mode]["block_over_step"] = out[mode]["block_s_median"] / base
    if out["sync"]["block_s_median"] and out["async"]["block_s_median"]:
        out["async_block_vs_sync"] = out["async"]["block_s_median"] / out["sync"]["block_s_median"]
    return {"model": model, "nproc": nproc, "steps": steps, "every": every, "modes": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", "drills", "checkpoint"], default="all")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="small")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "fault.json"))
    a = p.parse_args()
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}  # a section run keeps the other's figures
    result.update({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "torch": torch.__version__})
    with tempfile.TemporaryDirectory(prefix="chuanliu-bench-fault-") as tmp:
        if a.section in ("all", "drills"):
            result["drills"] = drills(Path(tmp), a.nproc)
        if a.section in ("all", "checkpoint"):
            result["checkpoint"] = checkpoint_blocking(Path(tmp), a.nproc, a.model, steps=20, every=5)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

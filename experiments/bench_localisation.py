"""Fault-localisation benchmark: does the watchdog blame the right rank, stay quiet when nothing is wrong, and let a
slow save finish? Results go to docs/benchmarks/localisation.json (with the machine and date); docs/benchmarks.md
records them.

    python -m experiments.bench_localisation                         # every section (about 45 min on 2 cores)
    python -m experiments.bench_localisation --section blame --drills 5

Section ``blame``: randomised drills on 4 ranks (tiny model, sync checkpoints every 5 steps, 14 steps), each with
a random rank, step and seed, for each kind: SIGKILL of the process, SIGSTOP of the process (frozen at a random
moment of the step), a hang inside the gradient all-reduce, a hang inside the forward. Per drill: the rank every
detector blamed, detection time over the hang timeout, and whether the losses after resume are bit-exact against
one uninterrupted reference run of the same session.
Section ``stragglers``: clean 4-rank runs (every straggler detection is a false positive), then runs where one
random rank's forward becomes 2x slower from step 16 (windows of 5 steps: onset in window 3): the window in which
it was reported.
Section ``slow_save``: one 4-rank save whose writes run at 200 MB/s per rank, each byte standing for as many as
make the checkpoint as big as Baichuan-7B's with AdamW state (7.0e9 parameters x 12 bytes: fp32 weights and two
moments, as chuanliu's DCP checkpoint holds them), with the hang timeout at 10 s: it must commit, undetected.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
NPROC = 4
KINDS = {  # kind -> chaos overrides (rank, step and seed are drawn per drill)
    "sigkill": ["fault/chaos=kill_rank"],
    "sigstop": ["fault/chaos=hang_rank", "fault.chaos.faults.0.where=sigstop"],
    "in_collective": ["fault/chaos=hang_rank", "fault.chaos.faults.0.where=allreduce"],
    "in_forward": ["fault/chaos=hang_rank", "fault.chaos.faults.0.where=forward"],
}
BAICHUAN_7B_CHECKPOINT_BYTES = 7.0e9 * 12  # fp32 weights + AdamW's two fp32 moments


def common(hang_timeout_s: float) -> list[str]:
    return ["train.steps=14", "fault/checkpoint=sync", "fault.checkpoint.every=5", "logging.wandb_mode=disabled",
            "logging.progress_bar=false", f"fault.watchdog.hang_timeout_s={hang_timeout_s}",
            "fault.watchdog.poll_s=0.25"]


def torchrun(overrides: list[str], run_dir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           "-m", "experiments.train", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def blame(root: Path, n: int, hang_timeout_s: float, rng: random.Random) -> dict:
    ref = root / "reference"
    proc = torchrun(common(hang_timeout_s), ref)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed:\n{proc.stderr[-3000:]}")
    rows = []
    for kind, chaos in KINDS.items():
        for i in range(n):
            rank, step, seed = rng.randrange(NPROC), rng.randrange(2, 14), rng.randrange(1 << 16)
            out = root / f"{kind}_{i}"
            cmd = [sys.executable, "-m", "experiments.drill", *chaos, *common(hang_timeout_s),
                   f"fault.chaos.faults.0.rank={rank}", f"fault.chaos.faults.0.step={step}",
                   f"fault.chaos.seed={seed}", f"drill.nproc={NPROC}", f"drill.reference_dir={ref}",
                   f"drill.out={out}", "drill.wandb_mode=disabled", "drill.timeout_s=300"]
            subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=400, check=False)
            rows.append(_drill_row(kind, out, rank, step, seed, hang_timeout_s))
            r = rows[-1]
            print(f"{kind:<14} #{i:<2} rank {rank} step {step:>2}: blamed {r['blamed']} by {r['detectors']} "
                  f"detector(s), detect {r['detect_s']} s ({r['detect_over_timeout']}x), bit-exact "
                  f"{r['bit_exact']}", flush=True)
    summary = {}
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        hangs = kind != "sigkill"
        summary[kind] = {
            "drills": len(mine), "blame_correct": sum(r["blame_correct"] for r in mine),
            "bit_exact": sum(bool(r["bit_exact"]) for r in mine),
            "completed": sum(bool(r["completed"]) for r in mine),
            "detect_s_max": max((r["detect_s"] for r in mine if r["detect_s"] is not None), default=None),
            "detect_over_timeout_max": max((r["detect_over_timeout"] for r in mine if hangs and
                                            r["detect_over_timeout"] is not None), default=None),
            "recover_s_median": statistics.median([r["recover_s"] for r in mine if r["recover_s"] is not None]
                                                  or [float("nan")])}
    return {"nproc": NPROC, "hang_timeout_s": hang_timeout_s, "drills_per_kind": n, "summary": summary,
            "rows": rows}


def _drill_row(kind: str, out: Path, rank: int, step: int, seed: int, hang_timeout_s: float) -> dict:
    row = {"kind": kind, "target_rank": rank, "step": step, "seed": seed, "blamed": None, "detectors": 0,
           "blame_correct": False, "detect_s": None, "detect_over_timeout": None, "recover_s": None,
           "bit_exact": None, "completed": False}
    try:
        report = json.loads((out / "drill_report.json").read_text())
    except (OSError, ValueError):
        return row
    events = read_events(out / "faulty")
    first_start = min((e["time"] for e in events if e["kind"] == "start" and e["restart"] == 0), default=None)
    injected = [e for e in events if e["kind"] == "fault_injected"]
    detections = [e for e in events if e["kind"] == "detected" and e["cause"] != "straggler"
                  and injected and e["time"] >= injected[0]["time"] and e.get("restart") == injected[0]["restart"]]
    blamed = sorted({r for e in detections for r in (e.get("blamed_ranks") or
                                                     ([e["blamed_rank"]] if e.get("blamed_rank") is not None else []))})
    f = report["faults"][0] if report["faults"] else {}
    detect_s = f.get("detect_s")
    row.update(blamed=blamed, detectors=len(detections), blame_correct=blamed == [rank],
               detect_s=None if detect_s is None else round(detect_s, 2),
               detect_over_timeout=None if detect_s is None else round(detect_s / hang_timeout_s, 2),
               recover_s=None if f.get("recover_s") is None else round(f["recover_s"], 2),
               bit_exact=report.get("loss", {}).get("bit_exact"), completed=report["completed"],
               causes=sorted({e["cause"] for e in detections}),
               stragglers=sum(e["kind"] == "detected" and e["cause"] == "straggler" for e in events),
               wall_s=round(report["wall_s"], 1), started=first_start is not None)
    return row


def stragglers(root: Path, clean: int, slow: int, rng: random.Random) -> dict:
    base = ["train.steps=45", "logging.wandb_mode=disabled", "logging.progress_bar=false"]
    clean_rows = []
    for i in range(clean):
        run = root / f"clean_{i}"
        torchrun(base, run)
        found = [e for e in read_events(run) if e["kind"] == "detected" and e["cause"] == "straggler"]
        clean_rows.append({"run": i, "false_detections": len(found), "details": [e["detail"] for e in found],
                           "completed": (run / "summary.json").exists()})
        print(f"clean #{i}: {len(found)} straggler detection(s)", flush=True)
    slow_rows = []
    for i in range(slow):
        rank = rng.randrange(NPROC)
        run = root / f"slow_{i}"
        torchrun([*base, "fault/chaos=slow_rank", "fault.chaos.faults.0.slow_factor=2.0",
                  "fault.chaos.faults.0.step=16", f"fault.chaos.faults.0.rank={rank}"], run)
        found = [e for e in read_events(run) if e["kind"] == "detected" and e["cause"] == "straggler"]
        first = found[0] if found else {}
        onset_window = (16 - 1) // 5
        slow_rows.append({"run": i, "target_rank": rank, "blamed": [e["blamed_rank"] for e in found],
                          "window": first.get("window"),
                          "windows_after_onset": None if not found else first["window"] - onset_window + 1,
                          "ratio": first.get("ratio"), "detail": first.get("detail")})
        print(f"slow #{i} rank {rank}: reported {slow_rows[-1]['blamed']} in window {first.get('window')} "
              f"(onset window {onset_window})", flush=True)
    return {"nproc": NPROC, "window_steps": 5, "clean_runs": len(clean_rows),
            "clean_false_detections": sum(r["false_detections"] for r in clean_rows), "clean": clean_rows,
            "slow_runs": len(slow_rows),
            "slow_detected_within_3_windows": sum(r["blamed"][:1] == [r["target_rank"]] and
                                                  r["windows_after_onset"] is not None and
                                                  r["windows_after_onset"] <= 3 for r in slow_rows),
            "slow": slow_rows}


def slow_save(root: Path) -> dict:
    """One real save to size the emulation, then the throttled one."""
    sizing = root / "sizing"
    torchrun(["train.steps=5", "fault/checkpoint=sync", "fault.checkpoint.every=5", "logging.wandb_mode=disabled",
              "logging.progress_bar=false"], sizing)
    (commit,) = [e for e in read_events(sizing) if e["kind"] == "checkpoint_commit"]
    factor = BAICHUAN_7B_CHECKPOINT_BYTES / commit["bytes"]
    faults = ",".join(f"{{kind:slow_io,step:5,rank:{r},io_mb_s:200.0,io_size_factor:{factor:.1f}}}"
                      for r in range(NPROC))
    run = root / "slow_save"
    t0 = time.time()
    proc = torchrun(["train.steps=6", "fault/checkpoint=sync", "fault.checkpoint.every=5",
                     "logging.wandb_mode=disabled", "logging.progress_bar=false", "fault/chaos=slow_io",
                     f"fault.chaos.faults=[{faults}]", "fault.watchdog.hang_timeout_s=10"], run, timeout=1800)
    events = read_events(run)
    commits = [e for e in events if e["kind"] == "checkpoint_commit"]
    detections = [e for e in events if e["kind"] == "detected"]
    result = {"nproc": NPROC, "real_checkpoint_bytes": commit["bytes"], "emulated_bytes": BAICHUAN_7B_CHECKPOINT_BYTES,
              "size_factor": factor, "io_mb_s_per_rank": 200.0, "hang_timeout_s": 10.0,
              "save_s": commits[0]["write_s"] if commits else None, "committed": bool(commits),
              "hang_detections": len(detections), "exit_code": proc.returncode, "wall_s": time.time() - t0,
              "detections": [e.get("detail") for e in detections]}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
    print(f"slow save: {result}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["all", "blame", "stragglers", "slow_save"], default="all")
    p.add_argument("--drills", type=int, default=20, help="randomised drills per kind")
    p.add_argument("--hang-timeout", type=float, default=5.0)
    p.add_argument("--clean", type=int, default=10)
    p.add_argument("--slow", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="draws of ranks, steps and seeds (default: random)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "localisation.json"))
    a = p.parse_args()
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(2), "little")
    rng = random.Random(seed)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}  # a section run keeps the others' figures
    result.update({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "torch": torch.__version__, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="chuanliu-bench-localisation-") as tmp:
        stamp = {"date": result["date"], "seed": seed}  # sections run at different times keep their own
        if a.section in ("all", "blame"):
            result["blame"] = {**stamp, **blame(Path(tmp), a.drills, a.hang_timeout, rng)}
        if a.section in ("all", "stragglers"):
            result["stragglers"] = {**stamp, **stragglers(Path(tmp), a.clean, a.slow, rng)}
        if a.section in ("all", "slow_save"):
            result["slow_save"] = {**stamp, **slow_save(Path(tmp))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {a.out} (seed {seed})")


if __name__ == "__main__":
    main()

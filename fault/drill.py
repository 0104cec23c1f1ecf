"""The drill report: what each injected fault cost, computed from a run's files alone.

Inputs are the faulty run's ``events.jsonl`` and ``metrics.jsonl`` (and a reference run's ``metrics.jsonl``), so
the report works the same for a drill started by ``python -m experiments.drill`` on one machine and for a job a
user launched on a cluster (torchrun multi-node, Slurm) with chaos switched on:

    python -m fault.drill <faulty run dir> [--reference <run dir>] [--wall-s SECONDS]

Per fault:
    detect_s        injection -> first detection event after it (a rank's own exception, the watchdog, the NaN
                    check, a peer's failed collective, the launcher's SIGTERM). When no process lived to record
                    it (a single-process job that was SIGKILLed), the restarted job's start is used and
                    ``detected_by`` says "restart".
    recover_s       detection -> the first completed step of the restarted job (torchrun restart, imports, build,
                    checkpoint load and one step). Null for faults that need no restart (a straggler).
    steps_lost      steps completed before the fault and trained again after the restart
    committed_steps_lost  steps that were in a committed checkpoint at the fault and still had to be redone
                    (nonzero only when the newest checkpoint was corrupt and an older one was used)
For the run:
    ettr            effective training time ratio: the step time of the steps that count (the last run of each
                    step) over the job's wall time (launch to exit). 1.0 is impossible: start-up is not training.
    loss            the faulty run's final loss at every step against the reference run's: bit_exact when every
                    step's loss is the same float.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fault.events import read_events

GOALS = {"crash_detect_s": 10.0, "hang_detect_x_timeout": 1.5}
CRASHES = ("kill", "exception", "corrupt_checkpoint", "kill_mid_save", "nan_loss")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return rows


def final_losses(rows: list[dict[str, Any]]) -> dict[int, float | None]:
    """The loss of each step's last run (a step redone after a restart replaces its earlier run)."""
    return {r["step"]: r["train/loss"] for r in sorted(rows, key=lambda r: r["time"])}


def fault_costs(events: list[dict], rows: list[dict]) -> list[dict[str, Any]]:
    injections = [e for e in events if e["kind"] == "fault_injected"]
    starts = [e for e in events if e["kind"] == "start"]
    commits = [e for e in events if e["kind"] == "checkpoint_commit"]
    out = []
    for inj in injections:
        t = inj["time"]
        detection = next((e for e in events if e["kind"] == "detected" and e["time"] >= t
                          and (e.get("cause") != "straggler" or inj["fault"] == "slow")), None)
        # The job's next start after the fault is its restart. Not TORCHELASTIC_RESTART_COUNT: with several agents an
        # agent restarted for a membership change does not count it, so ranks disagree on that number.
        restart = next((s for s in starts if s["time"] > t), None)
        cost: dict[str, Any] = {"fault": inj["fault"], "fault_id": inj["fault_id"], "step": inj["step"],
                                "target_rank": inj["target_rank"], "injected_at": inj["iso"]}
        if detection is not None and (restart is None or detection["time"] <= restart["time"]):
            cost.update(detected_cause=detection["cause"], detected_by_rank=detection["rank"],
                        blamed_rank=detection.get("blamed_rank"), detect_s=detection["time"] - t,
                        detail=detection.get("detail"))
            t_detect = detection["time"]
        elif restart is not None:
            cost.update(detected_cause="restart", detected_by_rank=None, blamed_rank=None,
                        detect_s=restart["time"] - t, detail="no process recorded the failure; the launcher "
                        "restarted the job")
            t_detect = restart["time"]
        else:
            cost.update(detected_cause=None, detect_s=None, detail="not detected")
            t_detect = None
        if restart is not None and t_detect is not None:
            first_step = next((e for e in events if e["kind"] == "step_done" and e["time"] > restart["time"]), None)
            done_before = [r["step"] for r in rows if r["time"] < t_detect]
            last_done = max(done_before, default=0)
            committed = max((c["step"] for c in commits if c["time"] < t_detect), default=0)
            cost.update(restarted=True, recover_s=None if first_step is None else first_step["time"] - t_detect,
                        resumed_from_step=restart["step"], resumed_from=restart.get("resumed_from"),
                        steps_lost=max(0, last_done - restart["step"]),
                        committed_steps_lost=max(0, committed - restart["step"]))
        else:
            cost.update(restarted=False, recover_s=None, steps_lost=0, committed_steps_lost=0)
        out.append(cost)
    return out


def compare_losses(faulty: dict[int, float | None], reference: dict[int, float | None]) -> dict[str, Any]:
    common = sorted(set(faulty) & set(reference))
    diffs = []
    for s in common:
        a, b = faulty[s], reference[s]
        same = a == b or (a is None and b is None)
        diffs.append((s, same, abs(a - b) if a is not None and b is not None else math.inf))
    bad = [s for s, same, _ in diffs if not same]
    return {"compared_steps": len(common), "reference_steps": len(reference), "faulty_steps": len(faulty),
            "mismatched_steps": bad[:20], "n_mismatched": len(bad),
            "max_abs_diff": max((d for _, _, d in diffs), default=None),
            "bit_exact": not bad and len(common) == len(reference),
            "missing_steps": sorted(set(reference) - set(faulty))}


def drill_report(run_dir: str | Path, *, reference_dir: str | Path | None = None, wall_s: float | None = None,
                 exit_code: int | None = None, hang_timeout_s: float | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    events, rows = read_events(run_dir), _rows(run_dir)
    faults = fault_costs(events, rows)
    final = final_losses(rows)
    step_s = {r["step"]: r["perf/step_s"] for r in sorted(rows, key=lambda r: r["time"])}
    if wall_s is None and events:  # without the launcher's clock: first start to finish (or last event)
        wall_s = events[-1]["time"] - events[0]["time"]
    finish = [e for e in events if e["kind"] == "finish"]
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "completed": bool(finish), "exit_code": exit_code,
        "restarts": max(0, sum(e["kind"] == "start" for e in events) - 1),
        "wall_s": wall_s, "productive_s": sum(step_s.values()),
        "ettr": sum(step_s.values()) / wall_s if wall_s else None,
        "faults": faults,
        "detections": [{k: e.get(k) for k in ("iso", "rank", "cause", "blamed_rank", "step", "detail")}
                       for e in events if e["kind"] == "detected"],
        "fallbacks": [e for e in events if e["kind"] == "checkpoint_fallback"],
        "checkpoint_block_s": [r["fault/ckpt_block_s"] for r in rows if r.get("fault/ckpt_block_s") is not None],
    }
    if reference_dir is not None:
        ref_rows = _rows(Path(reference_dir))
        report["reference_dir"] = str(reference_dir)
        report["loss"] = compare_losses(final, final_losses(ref_rows))
    report["goals"] = goals(report, hang_timeout_s)
    return report


def goals(report: dict[str, Any], hang_timeout_s: float | None) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it was met (None: not applicable)."""
    out: dict[str, Any] = {}
    for f in report["faults"]:
        key = f"{f['fault']}#{f['fault_id']}"
        if f["fault"] in CRASHES and f["detect_s"] is not None:
            out[f"{key} detect < {GOALS['crash_detect_s']:.0f} s"] = f["detect_s"] < GOALS["crash_detect_s"]
        hang = f["fault"] == "hang" or f.get("detected_cause") == "checkpoint_hang"
        if hang and f["detect_s"] is not None and hang_timeout_s:
            x = GOALS["hang_detect_x_timeout"]
            out[f"{key} detect < {x:g}x timeout"] = f["detect_s"] < x * hang_timeout_s
        if f.get("blamed_rank") is not None or hang:
            out[f"{key} blamed the faulty rank"] = f.get("blamed_rank") == f["target_rank"]
        out[f"{key} zero committed steps lost"] = f["committed_steps_lost"] == 0
    out["completed"] = report["completed"]
    if "loss" in report:
        out["bit-exact continuation"] = report["loss"]["bit_exact"]
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"drill: {report['run_dir']}",
             f"{'fault':<20}{'step':>5}{'rank':>5}  {'detected by':<20}{'blamed':>7}{'detect s':>9}"
             f"{'recover s':>10}{'resumed@':>9}{'lost':>5}{'lost*':>6}"]
    for f in report["faults"]:
        num = lambda v: "-" if v is None else f"{v:.2f}"
        lines.append(f"{f['fault']:<20}{f['step']:>5}{f['target_rank']:>5}  {f['detected_cause']!s:<20}"
                     f"{'-' if f.get('blamed_rank') is None else f['blamed_rank']!s:>7}"
                     f"{num(f['detect_s']):>9}{num(f['recover_s']):>10}{f.get('resumed_from_step', '-')!s:>9}"
                     f"{f['steps_lost']:>5}{f['committed_steps_lost']:>6}")
    if not report["faults"]:
        lines.append("(no fault was injected)")
    lines.append("lost = steps trained again; lost* = of those, steps that were in a committed checkpoint")
    ettr = report["ettr"]
    lines.append(f"restarts {report['restarts']}, completed {report['completed']}, wall {report['wall_s'] or 0:.1f} s, "
                 f"ETTR {'-' if ettr is None else f'{ettr:.3f}'}")
    if "loss" in report:
        loss = report["loss"]
        lines.append(f"loss vs reference: {loss['compared_steps']}/{loss['reference_steps']} steps compared, "
                     f"{loss['n_mismatched']} differ, max |diff| {loss['max_abs_diff']}, bit-exact "
                     f"{loss['bit_exact']}")
    lines += [f"  [{'met' if ok else 'NOT MET' if ok is False else 'n/a'}] {goal}"
              for goal, ok in report["goals"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--reference", help="an uninterrupted run of the same config, to compare losses")
    p.add_argument("--wall-s", type=float, help="the job's wall time measured by its launcher")
    p.add_argument("--hang-timeout-s", type=float)
    a = p.parse_args(argv)
    if not (Path(a.run_dir) / "events.jsonl").exists():
        print(f"fault.drill: error: {a.run_dir} has no events.jsonl; give a chuanliu run directory", file=sys.stderr)
        return 2
    report = drill_report(a.run_dir, reference_dir=a.reference, wall_s=a.wall_s, hang_timeout_s=a.hang_timeout_s)
    (Path(a.run_dir) / "drill_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

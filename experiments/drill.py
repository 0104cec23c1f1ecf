"""Fault drill: run a job under a chaos schedule with auto-resume, and report what each fault cost.

    python -m experiments.drill fault/chaos=kill_rank                  # 2 ranks, torchrun --max-restarts=3
    python -m experiments.drill fault/chaos=hang_rank drill.nproc=4 fault.watchdog.hang_timeout_s=5
    python -m experiments.drill fault/chaos=mtbf fault/checkpoint=async train.steps=60

Arguments are the training job's Hydra overrides, plus ``drill.<option>=value`` for the drill itself
(DrillConfig). The drill launches the job with torchrun (its elastic agent is the supervisor that restarts the
workers, exactly as on a cluster), first without faults as a reference unless one is given, then with the chaos
schedule. Both land under ``drills/<stamp>_<chaos>/``; the report (fault.drill) is written there as
drill_report.json, printed, and logged to wandb. On a cluster, launch the job yourself with torchrun multi-node or
srun and chaos switched on, then run ``python -m fault.drill <run dir> --reference <run dir>``.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from experiments.config import ConfigError, typed
from fault.drill import drill_report, format_report

REPO = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class DrillConfig:
    nproc: int = 2  # ranks (torchrun --nproc_per_node)
    max_restarts: int = 3  # the restart budget (torchrun --max-restarts)
    reference: bool = True  # also run the job without faults, to compare the loss at every step
    reference_dir: str | None = None  # reuse this finished reference run instead of running one
    timeout_s: float = 900.0  # each job is killed after this long (the drill then reports it unfinished)
    out: str | None = None  # drill directory (default drills/<stamp>_<chaos>)
    wandb_mode: str = "offline"  # where the report goes: offline, online or disabled
    # Training overrides every drill starts from; the command line's overrides win key by key.
    train_defaults: list[str] = field(default_factory=lambda: [
        "fault/checkpoint=sync", "fault.checkpoint.every=5", "fault.watchdog.hang_timeout_s=10",
        "train.steps=30", "logging.progress_bar=false"])

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.max_restarts < 0 or self.timeout_s <= 0:
            raise ValueError("drill.nproc must be >= 1, drill.max_restarts >= 0 and drill.timeout_s > 0")


def split_args(argv: list[str]) -> tuple[DrillConfig, list[str]]:
    """``drill.*`` arguments configure the drill; everything else is a training override."""
    mine = [a[len("drill."):] for a in argv if a.startswith("drill.")]
    train = [a for a in argv if not a.startswith("drill.")]
    try:
        cfg = typed(OmegaConf.from_dotlist(mine), "drill", DrillConfig)
    except ConfigError as e:
        raise SystemExit(f"chuanliu drill: error: {e}") from None
    return cfg, merge_overrides(cfg.train_defaults, train)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(defaults: list[str], given: list[str]) -> list[str]:
    keys = {_key(o) for o in given}
    return [o for o in defaults if _key(o) not in keys] + given


def override_value(overrides: list[str], key: str, default: str) -> str:
    for o in reversed(overrides):
        if _key(o) == key:
            return o.split("=", 1)[1]
    return default


def launch(overrides: list[str], run_dir: Path, *, nproc: int, max_restarts: int, timeout_s: float) -> dict:
    """One torchrun job; its output goes to <run_dir>/launcher.log with a timestamp on every line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "experiments.train", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    with open(run_dir / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=dict(os.environ))

        def copy() -> None:  # a thread, so the timeout below holds even when the job prints nothing
            for line in proc.stdout:
                log.write(f"{datetime.datetime.now().isoformat(timespec='milliseconds')} {line}")
                log.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker: they share the session
            proc.wait()
            code = None
        wall_s = time.time() - t0
        reader.join(timeout=10)
        if code is None:
            log.write(f"chuanliu drill: killed after {timeout_s:.0f} s\n")
    return {"exit_code": code, "wall_s": wall_s, "command": cmd}


def log_to_wandb(report: dict, drill_dir: Path, mode: str, chaos: str) -> None:
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(mode=mode, project="chuanliu", dir=str(drill_dir), job_type="drill", group="drills",
                     name=drill_dir.name, config={"chaos": chaos}, settings=wandb.Settings(console="off", quiet=True))
    cols = ["fault", "step", "target_rank", "detected_cause", "detect_s", "recover_s", "steps_lost",
            "committed_steps_lost"]
    run.log({"drill/faults": wandb.Table(columns=cols, data=[[f.get(c) for c in cols] for f in report["faults"]])})
    for k in ("ettr", "restarts", "wall_s", "completed"):
        run.summary[f"drill/{k}"] = report[k]
    if "loss" in report:
        run.summary["drill/bit_exact"] = report["loss"]["bit_exact"]
    run.finish()


def main(argv: list[str]) -> int:
    cfg, overrides = split_args(argv)
    chaos = override_value(overrides, "fault/chaos", "none")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    drill_dir = Path(cfg.out or REPO / "drills" / f"{stamp}_{chaos}").resolve()
    drill_dir.mkdir(parents=True, exist_ok=True)
    jobs = {}
    reference = Path(cfg.reference_dir).resolve() if cfg.reference_dir else None
    if reference is None and cfg.reference:
        reference = drill_dir / "reference"
        no_chaos = [o for o in overrides if not _key(o).startswith(("fault/chaos", "fault.chaos"))]
        jobs["reference"] = launch([*no_chaos, "fault/chaos=none"], reference, nproc=cfg.nproc, max_restarts=0,
                                   timeout_s=cfg.timeout_s)
        if jobs["reference"]["exit_code"] != 0:
            print(f"chuanliu drill: error: the reference run failed; see {reference}/launcher.log", file=sys.stderr)
            return 1
    faulty = drill_dir / "faulty"
    jobs["faulty"] = launch(overrides, faulty, nproc=cfg.nproc, max_restarts=cfg.max_restarts,
                            timeout_s=cfg.timeout_s)
    hang_timeout = float(override_value(overrides, "fault.watchdog.hang_timeout_s", "120"))
    report = drill_report(faulty, reference_dir=reference, wall_s=jobs["faulty"]["wall_s"],
                          exit_code=jobs["faulty"]["exit_code"], hang_timeout_s=hang_timeout)
    report.update(chaos=chaos, drill=asdict(cfg), overrides=overrides, jobs=jobs)
    if chaos != "none":  # a hook that never fires (a block the model no longer calls) must not pass for a drill
        report["goals"]["a fault was injected"] = bool(report["faults"])
    if "reference" in jobs:
        report["reference_wall_s"] = jobs["reference"]["wall_s"]
    (drill_dir / "drill_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    print(f"report: {drill_dir / 'drill_report.json'}")
    log_to_wandb(report, drill_dir, cfg.wandb_mode, chaos)
    return 0 if report["completed"] and report["goals"].get("a fault was injected", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Chaos injection: the faults a 1000-GPU job meets, injected on purpose so that recovery can be measured.

Kinds (``conf/fault/chaos/<kind>.yaml`` each schedule one; ``mtbf`` draws several):
    kill                SIGKILL the rank at the start of a step (a crashed host or OOM-killed process)
    hang                the rank stops making progress (a stuck kernel or deadlock): found by the watchdog
    slow                the rank's forward runs ``slow_factor`` times slower (a throttled GPU): a straggler
    nan_loss            the rank's loss becomes NaN (a bad batch or an overflow)
    exception           the rank raises (a software bug)
    corrupt_checkpoint  flip bytes in the newest committed checkpoint, then kill the rank: the restart must
                        fall back to the previous checkpoint
    kill_mid_save       SIGKILL the rank during a checkpoint save, after its shards are written and before the
                        commit: the half-written checkpoint must never become visible

A fault fires once per run: injections are recorded in events.jsonl (fsynced before a kill), and a process
restarted by the launcher reads them back and does not fire them again. Real faults are transient too; a fault
that came back after every restart would only test the restart budget.

The schedule is the same on every rank (explicit steps, or drawn from a seeded generator), so each rank knows
which faults are its own without talking to the others.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fault.events import EventLog, read_events

log = logging.getLogger(__name__)

KINDS = ("kill", "hang", "slow", "nan_loss", "exception", "corrupt_checkpoint", "kill_mid_save")


class ChaosError(RuntimeError):
    """The exception the ``exception`` fault raises."""


@dataclass(kw_only=True)
class FaultSpec:
    kind: str  # one of KINDS
    step: int  # fires at this step (kill_mid_save: at the first checkpoint save at or after it)
    rank: int | None = None  # target rank; None: drawn from the chaos seed
    slow_factor: float = 3.0  # slow: forward takes this many times as long
    slow_steps: int = 0  # slow: for this many steps (0: until the end of the run)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault.chaos fault kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.step < 1:
            raise ValueError(f"fault.chaos fault step must be >= 1, got {self.step}")
        if self.slow_factor <= 1:
            raise ValueError(f"fault.chaos slow_factor must be > 1, got {self.slow_factor}")


@dataclass(kw_only=True)
class ChaosConfig:
    name: str = "none"  # label for reports
    faults: list[FaultSpec] = field(default_factory=list)  # explicit schedule
    mtbf_steps: float | None = None  # also draw faults with exponential gaps of this mean (in steps)
    kinds: list[str] = field(default_factory=lambda: ["kill"])  # kinds drawn under mtbf_steps
    max_faults: int = 3  # at most this many drawn faults
    seed: int = 0  # draws of steps, kinds and ranks

    def __post_init__(self) -> None:
        if self.mtbf_steps is not None and self.mtbf_steps <= 0:
            raise ValueError(f"fault.chaos.mtbf_steps must be > 0, got {self.mtbf_steps}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"fault.chaos.kinds: {kind!r} is unknown; use some of {', '.join(KINDS)}")

    def schedule(self, *, total_steps: int, world_size: int) -> list[FaultSpec]:
        """The faults of this run, in step order, every rank resolved; identical on every rank."""
        rng = random.Random(self.seed)
        faults = [FaultSpec(**f.__dict__) for f in self.faults]
        if self.mtbf_steps:
            step = 0.0
            while len(faults) < len(self.faults) + self.max_faults:
                step += rng.expovariate(1 / self.mtbf_steps)
                if step > total_steps - 1:  # leave a step after the last fault to show recovery
                    break
                faults.append(FaultSpec(kind=rng.choice(self.kinds), step=max(2, int(step))))
        for f in faults:
            if f.rank is None:
                f.rank = rng.randrange(world_size)
            if f.rank >= world_size:
                raise ValueError(f"fault.chaos: a {f.kind} fault targets rank {f.rank} but the job has "
                                 f"{world_size} rank(s)")
        return sorted(faults, key=lambda f: f.step)


class Chaos:
    """This rank's injectors. The training loop calls the hooks; each does nothing unless a fault is due."""

    def __init__(self, cfg: ChaosConfig, *, rank: int, world_size: int, total_steps: int, events: EventLog,
                 checkpoint_dir: Path | None):
        self.rank, self.events, self.checkpoint_dir = rank, events, checkpoint_dir
        self.schedule = cfg.schedule(total_steps=total_steps, world_size=world_size)
        fired = {e["fault_id"] for e in read_events(events.path.parent) if e["kind"] == "fault_injected"}
        # (id, fault) pairs still to fire on this rank; the id is the position in the shared schedule
        self.pending = [(i, f) for i, f in enumerate(self.schedule) if f.rank == rank and i not in fired]
        self._slow: tuple[int, FaultSpec] | None = None
        self._nan_step: int | None = None
        self._step = 0
        if self.pending:
            log.warning("chaos: rank %d will inject %s", rank,
                        ", ".join(f"{f.kind}@step{f.step}" for _, f in self.pending))

    def attach(self, model: nn.Module) -> None:
        """The nan_loss fault multiplies the model's output (the loss) by NaN through a forward hook."""
        if any(f.kind == "nan_loss" for _, f in self.pending):
            model.register_forward_hook(lambda m, args, out: out * float("nan") if self._nan_step else out)

    def _due(self, step: int, kinds: tuple[str, ...]) -> tuple[int, FaultSpec] | None:
        for i, f in self.pending:
            if f.kind in kinds and f.step <= step:
                self.pending.remove((i, f))
                return i, f
        return None

    def _record(self, fault_id: int, f: FaultSpec, step: int, **extra) -> None:
        self.events.emit("fault_injected", durable=True, fault=f.kind, fault_id=fault_id, step=step,
                         target_rank=self.rank, **extra)
        log.warning("chaos: injecting %s on rank %d at step %d", f.kind, self.rank, step)

    def step_start(self, step: int) -> None:
        """Faults that strike between steps: kill, hang, exception, corrupt_checkpoint; arms slow and nan."""
        self._step = step
        self._nan_step = None
        due = self._due(step, ("kill", "hang", "exception", "corrupt_checkpoint", "slow", "nan_loss"))
        if due is None:
            return
        fault_id, f = due
        if f.kind == "corrupt_checkpoint":
            corrupted = corrupt_newest(self.checkpoint_dir)
            self._record(fault_id, f, step, corrupted=str(corrupted) if corrupted else None)
            _die()
        self._record(fault_id, f, step)
        if f.kind == "kill":
            _die()
        elif f.kind == "hang":
            while True:  # stuck, as a deadlocked rank would be; only the watchdog ends this
                time.sleep(3600)
        elif f.kind == "exception":
            raise ChaosError(f"chaos: injected exception on rank {self.rank} at step {step}")
        elif f.kind == "slow":
            self._slow = due
        elif f.kind == "nan_loss":
            self._nan_step = step

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around each forward pass: a slow fault stretches it to slow_factor times its own duration."""
        t0 = time.perf_counter()
        yield
        if self._slow is not None:
            _, f = self._slow
            if f.slow_steps and self._step >= f.step + f.slow_steps:
                self._slow = None
            else:
                time.sleep((f.slow_factor - 1) * (time.perf_counter() - t0))

    def before_commit(self, step: int) -> Callable[[], None]:
        """The hook a checkpoint save calls after this rank's files are written, before the commit."""
        def hook() -> None:
            due = self._due(step, ("kill_mid_save",))
            if due is not None:
                self._record(*due, step)
                _die()
        return hook


def _die() -> None:
    """SIGKILL this process: no cleanup, no exit handlers, exactly like a lost host."""
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def corrupt_newest(checkpoint_dir: Path | None) -> Path | None:
    """Flip bytes in the largest file of the newest committed checkpoint (step_* with a manifest)."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        log.warning("chaos: no checkpoint directory to corrupt (is fault/checkpoint off?)")
        return None
    committed = sorted(p for p in checkpoint_dir.glob("step_*") if (p / "manifest.json").exists())
    if not committed:
        log.warning("chaos: no committed checkpoint in %s to corrupt yet", checkpoint_dir)
        return None
    target = max((p for p in committed[-1].rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    with open(target, "r+b") as fh:
        size = target.stat().st_size
        fh.seek(size // 2)
        chunk = fh.read(64)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))
        fh.flush()
        os.fsync(fh.fileno())
    return target

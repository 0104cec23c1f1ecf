"""Chaos injection: the faults a 1000-GPU job meets, injected on purpose so that recovery can be measured.

Kinds (``conf/fault/chaos/<kind>.yaml`` each schedule one; ``mtbf`` draws several):
    kill                SIGKILL the rank at the start of a step (a crashed host or OOM-killed process)
    hang                the rank stops making progress, found by the watchdog; ``where`` places it:
                          step_start  between steps, before the step's first collective
                          forward     inside the forward pass (a pre-hook on the middle block this rank holds:
                                      under a pipeline, the middle one of its stage's layers)
                          allreduce   inside backward where gradient reductions are issued (at the embedding's
                                      gradient, the last one): the peers wait inside the gradient all-reduce; on a
                                      pipeline stage without the embedding, at its input's gradient (the last
                                      one it computes): its tp peers wait in their all-reduce, the stage before
                                      it in its p2p receive
                          optimizer   inside the optimizer step (a global optimizer step pre-hook)
                          sigstop     SIGSTOP of the whole process at a random moment of the step: frozen in
                                      whatever it was doing (compute, a collective, I/O), threads and all
                          random      one of the above, drawn from the chaos seed
    slow                the rank's forward runs ``slow_factor`` times slower (a throttled GPU): a straggler; under
                        tensor or pipeline parallelism each block it holds, forward and backward (Slow.attach)
    nan_loss            the output of the rank's last block becomes NaN (an overflow), so its loss does; on a
                        pipeline stage before the last it reaches the loss through the later stages
    exception           the rank raises (a software bug)
    corrupt_checkpoint  flip bytes in the newest committed checkpoint, then kill the rank: the restart must
                        fall back to the previous checkpoint
    kill_mid_save       SIGKILL the rank during a checkpoint save, after its shards are written and before the
                        commit: the half-written checkpoint must never become visible
    slow_io             the rank's checkpoint writes run at ``io_mb_s`` MB/s (0: stuck for good), each byte
                        standing for ``io_size_factor`` bytes (a small model's save lasting as long as a 7B one's),
                        for ``io_saves`` saves from ``step`` on: a slow save must not look like a hang, a stuck one
                        must be reported as a stuck checkpoint with its rank

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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fault.events import EventLog, read_events
from fault.progress import run_queue_s
from fault.watchdog import model_parallel

log = logging.getLogger(__name__)

HANG_PLACES = ("step_start", "forward", "allreduce", "optimizer", "sigstop")


class ChaosError(RuntimeError):
    """The exception the ``exception`` fault raises."""


@dataclass(kw_only=True)
class FaultSpec:
    kind: str  # one of KINDS (a FaultKind subclass's ``kind``)
    step: int | None  # fires at this step (kill_mid_save, slow_io: the first save at or after it); None: drawn
    rank: int | None = None  # target rank; None: drawn from the chaos seed
    where: str = "step_start"  # hang: one of HANG_PLACES, or random (drawn from the chaos seed)
    slow_factor: float = 3.0  # slow: forward takes this many times as long
    slow_steps: int = 0  # slow: for this many steps (0: until the end of the run)
    io_mb_s: float = 200.0  # slow_io: write bandwidth in MB/s (0: the write never completes)
    io_size_factor: float = 1.0  # slow_io: each byte written stands for this many (emulates a bigger checkpoint)
    io_saves: int = 1  # slow_io: this many saves are slow (0: every save from `step` on)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault.chaos fault kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.step is not None and self.step < 1:
            raise ValueError(f"fault.chaos fault step must be >= 1 (or null: drawn), got {self.step}")
        if self.where not in (*HANG_PLACES, "random"):
            raise ValueError(f"fault.chaos fault where={self.where!r} is unknown; use one of "
                             f"{', '.join(HANG_PLACES)} or random")
        if self.slow_factor <= 1:
            raise ValueError(f"fault.chaos slow_factor must be > 1, got {self.slow_factor}")
        if self.io_mb_s < 0 or self.io_size_factor < 1 or self.io_saves < 0:
            raise ValueError(f"fault.chaos slow_io needs io_mb_s >= 0 (got {self.io_mb_s}), io_size_factor >= 1 "
                             f"(got {self.io_size_factor}) and io_saves >= 0 (got {self.io_saves})")


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

    def kinds_used(self) -> list[type[FaultKind]]:
        """The kinds this config can inject (its explicit faults, and the drawn kinds under mtbf_steps)."""
        names = {f.kind for f in self.faults} | (set(self.kinds) if self.mtbf_steps else set())
        return [KINDS[n] for n in sorted(names)]

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
            if f.step is None:  # leave step 1 (start-up) and the last two steps (recovery must show) alone
                f.step = rng.randrange(2, max(3, total_steps - 1))
            if f.rank is None:
                f.rank = rng.randrange(world_size)
            if f.kind == "hang" and f.where == "random":
                f.where = rng.choice(HANG_PLACES)
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
        self._slow_in_blocks = False  # model parallelism: Slow's block hooks stretch the compute, not forward()
        self._burnt = 0.0  # CPU seconds those hooks burnt so far
        self._slow_io: tuple[int, FaultSpec, int] | None = None  # fault, saves throttled so far
        self._armed: tuple[int, FaultSpec] | None = None  # a hang waiting for its place in this step
        self._nan_step: int | None = None
        self._step = 0
        self._step_started: float | None = None
        self._last_step_s = 1.0
        self._last_forward_s = 0.0
        self._rng = random.Random(cfg.seed * 1_000_003 + rank)
        if self.pending:
            log.warning("chaos: rank %d will inject %s", rank,
                        ", ".join(f"{f.kind}{'/' + f.where if f.kind == 'hang' else ''}@step{f.step}"
                                  for _, f in self.pending))

    def attach(self, model: nn.Module) -> None:
        """Install the hooks the pending faults strike from: NaN on the output (nan_loss); for a hang, a pre-hook on
        the middle block (forward), a gradient hook on the embedding's output (allreduce), a global optimizer step
        pre-hook (optimizer)."""
        for kind in {f.kind for _, f in self.pending}:
            KINDS[kind].attach(self, model, [f for _, f in self.pending if f.kind == kind])

    def _strike(self, where: str) -> None:
        if self._armed is not None and self._armed[1].where == where:
            fault_id, f = self._armed
            self._armed = None
            self._record(fault_id, f, self._step, where=where)
            _hang_forever()

    def _due(self, step: int, kinds: tuple[str, ...]) -> tuple[int, FaultSpec] | None:
        for i, f in self.pending:
            if f.kind in kinds and f.step <= step:
                self.pending.remove((i, f))
                return i, f
        return None

    def _record(self, fault_id: int, f: FaultSpec, step: int, **extra) -> None:
        self.events.emit("fault_injected", durable=True, fault=f.kind, fault_id=fault_id, step=step,
                         target_rank=self.rank, **extra)
        log.warning("chaos: injecting %s on rank %d at step %d %s", f.kind, self.rank, step, extra or "")

    def step_start(self, step: int) -> None:
        """Faults that strike between steps: kill, hang (step_start), exception, corrupt_checkpoint; arms the
        others (a hang at its place in this step, a SIGSTOP at a random moment of it, slow, nan)."""
        now = time.monotonic()
        if self._step_started is not None:
            self._last_step_s = now - self._step_started
        self._step, self._step_started = step, now
        self._nan_step = None
        due = self._due(step, STEP_START_KINDS)
        if due is not None:
            KINDS[due[1].kind].strike(self, *due, step)

    def _freeze(self, fault_id: int, f: FaultSpec, step: int, delay: float) -> None:
        time.sleep(delay)
        self._record(fault_id, f, step, where="sigstop", delay_s=round(delay, 3))
        os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops: no heartbeat, no progress, no exit

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around each forward pass: a slow fault stretches it to slow_factor times its own compute (its wall time
        less the time it sat in the run queue behind other processes, as the straggler timer counts it), so a 2x
        fault is a 2x slower rank and not more on a loaded host."""
        t0, queued0 = time.perf_counter(), run_queue_s()
        yield
        self._last_forward_s = time.perf_counter() - t0
        if self._slow is not None:
            _, f = self._slow
            if f.slow_steps and self._step >= f.step + f.slow_steps:
                self._slow = None
            elif not self._slow_in_blocks:
                time.sleep((f.slow_factor - 1) * max(0.0, self._last_forward_s - (run_queue_s() - queued0)))

    def io_throttle(self, step: int) -> Callable[[int, Callable[[], None]], None] | None:
        """For a checkpoint save at ``step``: the slow_io throttle, called before each chunk this rank writes with
        the chunk's size and a function that reports the write as still moving."""
        if self._slow_io is None and (due := self._due(step, ("slow_io",))) is not None:
            self._slow_io = (*due, 0)
        if self._slow_io is None:
            return None
        fault_id, f, saves = self._slow_io
        if f.io_saves and saves >= f.io_saves:
            self._slow_io = None
            return None
        self._slow_io = (fault_id, f, saves + 1)
        if saves == 0:
            self._record(fault_id, f, step, io_mb_s=f.io_mb_s, io_size_factor=f.io_size_factor)

        def throttle(nbytes: int, moving: Callable[[], None]) -> None:
            if f.io_mb_s == 0:
                _hang_forever()  # a write that never returns (a dead NFS server, a stuck device)
            # A chunk of a checkpoint io_size_factor times bigger, written at io_mb_s: as long as a real disk
            # takes; sliced so that the bytes moving show as progress, as a real disk's 1 MiB writes would.
            remaining = nbytes * f.io_size_factor / (f.io_mb_s * 1e6)
            while remaining > 0:
                time.sleep(min(remaining, 0.1))
                remaining -= 0.1
                moving()
        return throttle

    def before_commit(self, step: int) -> Callable[[], None]:
        """The hook a checkpoint save calls after this rank's files are written, before the commit."""
        def hook() -> None:
            due = self._due(step, ("kill_mid_save",))
            if due is not None:
                self._record(*due, step)
                _die()
        return hook


# ---------------------------------------------------------------- the kinds
# One class per kind: where it strikes (``at``), what it installs on the model (``attach``), what it does when due
# (``strike``). Adding a kind is one class here and one YAML in conf/fault/chaos/ (its ``kind`` is the name).

class FaultKind:
    kind: ClassVar[str]
    at: ClassVar[str] = "step_start"  # step_start (Chaos.step_start), save (io_throttle) or commit (before_commit)
    needs_watchdog: ClassVar[bool] = False  # only the watchdog ends it (else the process-group timeout would)
    needs_checkpoint: ClassVar[bool] = False  # it injects into checkpoints

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        KINDS[cls.kind] = cls

    @staticmethod
    def attach(chaos: Chaos, model: nn.Module, faults: list[FaultSpec]) -> None:
        """Hooks on the model this kind strikes from (none by default)."""

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        raise NotImplementedError


KINDS: dict[str, type[FaultKind]] = {}


class Kill(FaultKind):
    kind = "kill"

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        chaos._record(fault_id, f, step)
        _die()


class Hang(FaultKind):
    kind = "hang"
    needs_watchdog = True

    @staticmethod
    def attach(chaos: Chaos, model: nn.Module, faults: list[FaultSpec]) -> None:
        """A pre-hook on the middle block this rank holds (forward), a gradient hook on the last gradient this
        rank's backward computes (allreduce), a global optimizer step pre-hook (optimizer)."""
        places = {f.where for f in faults}
        held = blocks(model)
        if "forward" in places:
            target = held[len(held) // 2] if held else model
            target.register_forward_pre_hook(lambda m, args: chaos._strike("forward"))
        if "allreduce" in places:
            _on_last_gradient(model, held, lambda: chaos._strike("allreduce"))
        if "optimizer" in places:
            register_optimizer_step_pre_hook(lambda opt, args, kwargs: chaos._strike("optimizer"))

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        if f.where == "sigstop":
            # Somewhere inside this step, whatever it is doing: a step's compute is about 3 forwards (the previous
            # step's whole time would also count its checkpoint save and could carry the freeze past the run's end).
            span = (min(chaos._last_step_s, 3 * chaos._last_forward_s) if chaos._last_forward_s
                    else chaos._last_step_s)
            delay = chaos._rng.uniform(0.0, span)
            threading.Thread(target=chaos._freeze, args=(fault_id, f, step, delay), daemon=True).start()
        elif f.where != "step_start":
            chaos._armed = (fault_id, f)  # strikes at its place in this step (attach's hooks)
        else:
            chaos._record(fault_id, f, step, where=f.where)
            _hang_forever()


class Slow(FaultKind):
    kind = "slow"

    @staticmethod
    def attach(chaos: Chaos, model: nn.Module, faults: list[FaultSpec]) -> None:
        """Under tensor or pipeline parallelism the slowdown is inside each block this rank holds, forward and
        backward, where a slow device is slow: its tp peers then wait in the layer's all-reduce and its pipeline
        peers in their p2p receives, as they would for a throttled GPU (a sleep after the whole step, as
        ``Chaos.forward`` does without model parallelism, would fall after the schedule, where no one waits for it
        inside their own compute). The block runs ``slow_factor`` times its own CPU time, burnt (not slept): the
        straggler timer counts CPU time there (``ComputeTimer``)."""
        held = blocks(model)
        if not (model_parallel(model) and held):
            return
        chaos._slow_in_blocks = True
        for block in held:
            block.register_forward_pre_hook(lambda m, args: _slow_forward_begins(chaos, m, args))
            block.register_forward_hook(lambda m, args, out: _slow_forward_ends(chaos, m, out))

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        chaos._record(fault_id, f, step)
        chaos._slow = (fault_id, f)  # Chaos.forward stretches each forward from now on


class NanLoss(FaultKind):
    kind = "nan_loss"

    @staticmethod
    def attach(chaos: Chaos, model: nn.Module, faults: list[FaultSpec]) -> None:
        # The last block this rank holds: under a pipeline the stage-pruned model is never called as a whole (the
        # schedule runs its chunks), and a NaN born in a middle stage must travel to the loss as a real one does.
        held = blocks(model)
        target = held[-1] if held else model
        target.register_forward_hook(lambda m, args, out: out * float("nan") if chaos._nan_step else out)

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        chaos._record(fault_id, f, step)
        chaos._nan_step = step


class RaiseException(FaultKind):
    kind = "exception"

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        chaos._record(fault_id, f, step)
        raise ChaosError(f"chaos: injected exception on rank {chaos.rank} at step {step}")


class CorruptCheckpoint(FaultKind):
    kind = "corrupt_checkpoint"
    needs_checkpoint = True

    @staticmethod
    def strike(chaos: Chaos, fault_id: int, f: FaultSpec, step: int) -> None:
        corrupted = corrupt_newest(chaos.checkpoint_dir)
        chaos._record(fault_id, f, step, corrupted=str(corrupted) if corrupted else None)
        _die()


class KillMidSave(FaultKind):
    kind = "kill_mid_save"
    needs_checkpoint = True
    at = "commit"  # Chaos.before_commit strikes it


class SlowIo(FaultKind):
    kind = "slow_io"
    needs_checkpoint = True
    at = "save"  # Chaos.io_throttle strikes it


STEP_START_KINDS = tuple(k for k, cls in KINDS.items() if cls.at == "step_start")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks this rank holds, in forward order: the largest ModuleList or ModuleDict of the model.
    A pipeline stage keeps its layers in a ModuleDict keyed by their original index (comm/parallel/pipeline.py,
    ``stage_module``) and holds any subset of them (two non-adjacent ones under a V schedule); [] when none."""
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    largest = max(containers, key=len, default=None)
    if not largest:
        return []
    return list(largest.values() if isinstance(largest, nn.ModuleDict) else largest)


def _on_last_gradient(model: nn.Module, held: list[nn.Module], hook: Callable[[], None]) -> None:
    """Call ``hook`` when this rank's backward computes its last gradient: the embedding output's on the rank that
    holds the embedding; on a later pipeline stage, its input activation's (the gradient it sends back)."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)

    def on_tensor(t) -> None:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda grad: hook())
    if embedding is not None:
        embedding.register_forward_hook(lambda m, args, out: on_tensor(out))
    elif held:
        held[0].register_forward_pre_hook(lambda m, args: on_tensor(args[0] if args else None))


def _mark(chaos: Chaos) -> tuple[float, float]:
    return time.thread_time(), chaos._burnt


def _stretch(chaos: Chaos, since: tuple[float, float]) -> None:
    """Burn this thread's CPU for (slow_factor - 1) x the CPU time since ``since`` (a ``_mark``), leaving out what
    was burnt in between (another block's backward stretch can fall inside this block's span)."""
    if chaos._slow is None:
        return
    t0, burnt0 = since
    now = time.thread_time()
    own = max(0.0, now - t0 - (chaos._burnt - burnt0))
    end = now + (chaos._slow[1].slow_factor - 1) * own
    while time.thread_time() < end:
        pass
    chaos._burnt += time.thread_time() - now


def _slow_forward_begins(chaos: Chaos, block: nn.Module, args: tuple) -> None:
    if chaos._slow is None:
        return
    state = {"forward": _mark(chaos)}
    block._chaos_slow = state
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad:  # its gradient ends this block's backward
        x.register_hook(lambda grad: _stretch(chaos, state["backward"]) if "backward" in state else None)


def _slow_forward_ends(chaos: Chaos, block: nn.Module, out) -> None:
    state = getattr(block, "_chaos_slow", None)
    if chaos._slow is None or state is None:
        return
    block._chaos_slow = None
    _stretch(chaos, state["forward"])
    if isinstance(out, torch.Tensor) and out.requires_grad:  # its gradient starts this block's backward
        out.register_hook(lambda grad: state.__setitem__("backward", _mark(chaos)))


def _hang_forever() -> None:
    """Stuck, as a deadlocked rank would be (alive: its watchdog thread still beats); only the watchdog ends this."""
    while True:
        time.sleep(3600)


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

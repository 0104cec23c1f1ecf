"""Detection: hangs and stragglers (a watchdog thread per rank), non-finite losses, and the launcher's stop signal.

Every rank writes a heartbeat file, ``<run_dir>/heartbeat/rank00001.json``, at each phase of each step: step,
phase, wall time, and the median of its recent forward-pass times. A file (not the c10d store) so that it outlives
whichever process hosts the store and can be read by a person during an incident; multi-node runs need the run
directory on a shared file system, as their checkpoints do.

- **Hang**: the watchdog thread sees no progress of its own rank for ``hang_timeout_s`` (``startup_timeout_s``
  until the first step completes: compilation and checkpoint loading are slow). A hung rank and the peers blocked
  on it in a collective all stop progressing, so every rank's watchdog fires within about one timeout instead of
  waiting out the process-group timeout (10 minutes by default). The blamed rank is the one furthest behind by
  (step, phase), ties broken by the oldest heartbeat. The watchdog then ends the process with EXIT_HANG so the
  launcher (torchrun's elastic agent) restarts the job: a Python exception cannot unblock a thread stuck in C++.
- **Straggler**: rank 0's watchdog compares the ranks' median forward times: a rank slower than
  ``straggler_factor`` times the median of the others is reported with its identity. The forward pass is timed
  because it contains no collective in any engine (DDP's buffer broadcast is off), so it measures the rank's own
  speed; a whole step is not a measure, since synchronous data parallelism makes every rank wait for the slowest.
- **Non-finite loss**: ``check_losses`` looks at every rank's local loss (gathered by the engine) before the
  optimizer step, logs which ranks went NaN/Inf, and raises NonFiniteLoss, so the job restarts from the newest
  checkpoint instead of stepping poisoned gradients into the weights.
- **Launcher stop**: when one worker dies, torchrun's agent sends SIGTERM to the others; the handler records the
  moment (the failure was detected) and exits at once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fault.events import EventLog

log = logging.getLogger(__name__)

EXIT_HANG = 70  # exit status of a process whose watchdog detected a hang
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process stopped by SIGTERM
PHASES = ("start", "forward_backward", "optimizer", "checkpoint", "done")  # order within one step


class FaultDetected(RuntimeError):
    """A detector decided the job must stop (and be restarted by the launcher); the event is already logged."""


class NonFiniteLoss(FaultDetected):
    pass


@dataclass(kw_only=True)
class WatchdogConfig:
    enabled: bool = True
    hang_timeout_s: float = 120.0  # no progress for this long -> hang (keep it below the process-group timeout)
    startup_timeout_s: float = 900.0  # the same, until the first step completes (compile, calibration, load)
    poll_s: float = 0.5  # how often the watchdog looks
    straggler_factor: float = 1.5  # forward time > factor x the median of the other ranks -> straggler
    straggler_window: int = 5  # steps in each rank's median forward time

    def __post_init__(self) -> None:
        for name in ("hang_timeout_s", "startup_timeout_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fault.watchdog.{name} must be > 0, got {getattr(self, name)}")
        if self.straggler_factor <= 1:
            raise ValueError(f"fault.watchdog.straggler_factor must be > 1, got {self.straggler_factor}")
        if self.straggler_window < 1:
            raise ValueError(f"fault.watchdog.straggler_window must be >= 1, got {self.straggler_window}")


class ForwardTimer:
    """Times forward passes; on CUDA with events (host time would only measure kernel launches)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self._host_s = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - t0

    def take(self) -> float:
        """Seconds of forward in the step just finished (call after the step synchronised)."""
        total = self._host_s + sum(s.elapsed_time(e) / 1e3 for s, e in self._pending)
        self._pending, self._host_s = [], 0.0
        return total


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, *, run_dir: Path, rank: int, world_size: int, events: EventLog):
        self.cfg, self.rank, self.world_size, self.events = cfg, rank, world_size, events
        self.dir = Path(run_dir) / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._last_progress = time.monotonic()
        self._first_step_done = False
        self._forward_s: deque[float] = deque(maxlen=cfg.straggler_window)
        self._beat = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": 0, "phase": "start"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chuanliu-watchdog", daemon=True)
        self._stragglers: set[int] = set()

    def start(self) -> Watchdog:
        self.beat(0, "start")
        if self.cfg.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; rank 0 compares the ranks' forward times one last time (a short run may end between
        two polls)."""
        if self.rank == 0 and self.world_size > 1:
            self._check_stragglers()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.cfg.poll_s)

    def beat(self, step: int, phase: str, forward_s: float | None = None) -> None:
        """Record progress: the main thread calls this at each phase of each step."""
        self._last_progress = time.monotonic()
        if forward_s is not None:
            self._forward_s.append(forward_s)
        if phase == "done":
            self._first_step_done = True
        self._beat.update(step=step, phase=phase, time=time.time(),
                          forward_s=statistics.median(self._forward_s) if self._forward_s else None)
        path = self.dir / f"rank{self.rank:05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._beat))
        os.replace(tmp, path)  # readers never see a half-written heartbeat

    def heartbeats(self) -> dict[int, dict]:
        beats = {}
        for path in self.dir.glob("rank*.json"):
            try:
                b = json.loads(path.read_text())
                beats[b["rank"]] = b
            except (json.JSONDecodeError, KeyError, OSError):
                continue  # a rank replacing its file right now; the next poll sees it
        return beats

    def dead_ranks(self) -> list[int]:
        """Ranks on this host whose process is gone (or a zombie): who crashed, as seen from a survivor."""
        host = socket.gethostname()
        return sorted(r for r, b in self.heartbeats().items()
                      if b.get("host") == host and r != self.rank and not _alive(b["pid"]))

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            limit = self.cfg.hang_timeout_s if self._first_step_done else self.cfg.startup_timeout_s
            idle = time.monotonic() - self._last_progress
            if idle > limit:
                self._hang(idle, limit)
            if self.rank == 0 and self.world_size > 1:
                self._check_stragglers()

    def _hang(self, idle: float, limit: float) -> None:
        beats = self.heartbeats()
        blamed = lagging_rank(beats)
        where = beats.get(blamed, {}) if blamed is not None else {}
        detail = (f"no progress on rank {self.rank} for {idle:.1f} s (limit {limit:.0f} s); furthest behind: rank "
                  f"{blamed} at step {where.get('step')} phase {where.get('phase')} on {where.get('host')} "
                  f"(pid {where.get('pid')})")
        self.events.emit("detected", durable=True, cause="hang", blamed_rank=blamed, step=self._beat["step"],
                         detail=detail)
        log.error("hang detected: %s; exiting with status %d so the launcher restarts the job", detail, EXIT_HANG)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_HANG)  # the main thread may be stuck in C++ (a collective): only exiting frees the job

    def _check_stragglers(self) -> None:
        beats = {r: b for r, b in self.heartbeats().items() if b.get("forward_s")}
        if len(beats) < 2:
            return
        for rank, b in beats.items():
            others = [o["forward_s"] for r, o in beats.items() if r != rank]
            ratio = b["forward_s"] / statistics.median(others)
            if ratio > self.cfg.straggler_factor and rank not in self._stragglers:
                self._stragglers.add(rank)
                detail = (f"rank {rank} on {b.get('host')} (pid {b.get('pid')}): median forward "
                          f"{b['forward_s'] * 1e3:.1f} ms, {ratio:.2f}x the other ranks' median")
                self.events.emit("detected", cause="straggler", blamed_rank=rank, step=b.get("step"), ratio=ratio,
                                 detail=detail)
                log.warning("straggler: %s", detail)
            elif ratio <= self.cfg.straggler_factor and rank in self._stragglers:
                self._stragglers.discard(rank)
                self.events.emit("straggler_recovered", rank=rank, step=b.get("step"), ratio=ratio)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child stays a zombie until its parent (the launcher) reaps it
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lagging_rank(beats: dict[int, dict]) -> int | None:
    """The rank furthest behind: lowest step, then earliest phase, then oldest heartbeat."""
    if not beats:
        return None
    order = {p: i for i, p in enumerate(PHASES)}
    return min(beats, key=lambda r: (beats[r]["step"], order.get(beats[r]["phase"], 0), beats[r].get("time", 0)))


def check_losses(step: int, rank_losses: list[float], events: EventLog, *, rank: int) -> None:
    """Raise NonFiniteLoss (after logging which ranks) when any rank's local loss is NaN or Inf."""
    bad = [r for r, v in enumerate(rank_losses) if not math.isfinite(v)]
    if not bad:
        return
    detail = f"non-finite loss at step {step} on rank(s) {bad}: {[rank_losses[r] for r in bad]}"
    if rank == 0:  # every rank sees the same gathered losses; one event is enough
        events.emit("detected", durable=True, cause="nan_loss", blamed_rank=bad[0], blamed_ranks=bad, step=step,
                    detail=detail)
    raise NonFiniteLoss(detail + "; stopping before the optimizer step so the weights stay finite (the launcher "
                        "restarts from the newest checkpoint)")


def install_stop_handler(events: EventLog, step_fn, watchdog: Watchdog) -> None:
    """SIGTERM from the launcher means it stopped the job (a peer failed): record when and who, then exit at once."""
    def handler(signum, frame):
        dead = watchdog.dead_ranks()
        events.emit("detected", durable=True, cause="terminated", blamed_rank=dead[0] if dead else None,
                    dead_ranks=dead, step=step_fn(),
                    detail=f"stopped by the launcher (SIGTERM): another worker failed or the job was cancelled; "
                    f"ranks whose process is gone on this host: {dead or 'none'}")
        os._exit(EXIT_TERMINATED)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)

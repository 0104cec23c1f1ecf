"""Detection: hangs (with the rank at fault), stragglers, non-finite losses, and the launcher's stop signal.

Every rank's watchdog thread writes a heartbeat file, ``<run_dir>/heartbeat/rank00001.json``, on every poll: a
liveness counter, and the rank's progress (step, phase, micro-batch, checkpoint I/O, where its main thread is) and
per-process-group collective counts from torch's flight recorder (fault/progress.py). A file (not the c10d store)
so that it outlives whichever process hosts the store and can be read by a person during an incident; multi-node
runs need the run directory on a shared file system, as their checkpoints do.

- **Hang**: no progress of this rank for ``hang_timeout_s`` (``startup_timeout_s`` until the first step completes;
  ``checkpoint_timeout_s`` inside an opaque checkpoint I/O call such as an fsync). Progress is any update of the
  rank's position or a collective entered or completed; a checkpoint save reports the bytes it writes and hashes, so
  a slow save is progress and a stuck one is not. A hung rank and the peers blocked on it all stop progressing, so
  every rank's watchdog fires within about one timeout instead of the process-group timeout. A rank that waits
  while some live peer still makes progress (a peer writing a large checkpoint slowly) does not fire: the job is
  slow, not hung. Who is to blame
  (``blame``), in order: ranks whose liveness stopped (a frozen or vanished process); else the ranks the others
  wait for in a collective they never entered (the ends of the waits-for chains, so a node leader blocked on its
  node is not blamed for blocking the leaders' all-reduce); else the one furthest behind. The detection names the
  collective the healthy ranks wait in (group, sequence number, op, bytes) and the blamed rank's host and where its
  main thread is. The watchdog then ends the process with EXIT_HANG so the launcher (torchrun's elastic agent)
  restarts the job: a Python exception cannot unblock a thread stuck in C++.
- **Straggler**: each rank times its own forward compute (``ComputeTimer``: wall or CUDA-event time minus the time
  spent in the engine's forward pre-hooks, where FSDP2 and ZeRO-3 wait for parameter all-gathers), and publishes the
  median over windows of ``straggler_window`` steps. Rank 0 scores every complete window: a rank slower than
  ``straggler_factor`` times the median of the others in ``straggler_windows`` consecutive windows is reported with
  its identity and how much slower (a persistent slowdown, as NVIDIA's resiliency extension scores ranks; one
  window of noise on a loaded host is not a straggler). A whole step is not a measure: synchronous data parallelism
  makes every rank wait for the slowest. Under tensor or pipeline parallelism the forward span itself holds waits
  for peers (a layer's all-reduce, the schedule's p2p receives), so on a CPU device it is the thread's CPU time,
  and a rank is compared with the ranks at its own pipeline position (stages do different work).
  (For a hang's blame, a rank blocked in a pipeline schedule's p2p wait or in a barrier, which the flight recorder
  does not keep on gloo, waits for its pipeline peers or for the group members behind it: ``_pipeline_waits``.)
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
from fault.progress import Progress, collectives, main_thread_where, run_queue_s

log = logging.getLogger(__name__)

EXIT_HANG = 70  # exit status of a process whose watchdog detected a hang
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process stopped by SIGTERM
PHASES = ("start", "forward_backward", "optimizer", "checkpoint", "done")  # order within one step
CHECKPOINT_GROUP_DESC = "checkpoint"  # the description of fault.checkpoint's process group (flight recorder)


class FaultDetected(RuntimeError):
    """A detector decided the job must stop (and be restarted by the launcher); the event is already logged."""


class NonFiniteLoss(FaultDetected):
    pass


@dataclass(kw_only=True)
class WatchdogConfig:
    enabled: bool = True
    hang_timeout_s: float = 120.0  # no progress for this long -> hang (keep it below the process-group timeout)
    startup_timeout_s: float = 900.0  # the same, until the first step completes (compile, calibration, load)
    # the same, inside an opaque checkpoint I/O call that reports no progress while it runs (an fsync, an engine's
    # own checkpoint writer); writes and checksums report their bytes and are held to hang_timeout_s
    checkpoint_timeout_s: float = 900.0
    poll_s: float = 0.5  # how often the watchdog looks (and beats: the liveness signal)
    # a heartbeat unchanged this long: frozen or gone (None: max(6 poll_s, 3 s); a loaded host can starve the
    # watchdog thread for a second or two, which must not pass for a frozen process)
    liveness_s: float | None = None
    straggler_factor: float = 1.5  # forward compute > factor x the median of the other ranks -> slow window
    straggler_window: int = 5  # steps per window (a rank's median forward compute over them)
    straggler_windows: int = 2  # consecutive slow windows before a rank is reported as a straggler

    def __post_init__(self) -> None:
        for name in ("hang_timeout_s", "startup_timeout_s", "checkpoint_timeout_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fault.watchdog.{name} must be > 0, got {getattr(self, name)}")
        if self.liveness_s is not None and not 0 < self.liveness_s < self.hang_timeout_s:
            raise ValueError(f"fault.watchdog.liveness_s must be > 0 and below hang_timeout_s "
                             f"({self.hang_timeout_s}), got {self.liveness_s}")
        if (self.liveness_s or max(6 * self.poll_s, 3.0)) >= self.hang_timeout_s:
            raise ValueError(f"fault.watchdog.poll_s={self.poll_s} is too slow for hang_timeout_s="
                             f"{self.hang_timeout_s}: liveness needs several polls within the timeout; lower "
                             "poll_s or set liveness_s")
        if self.straggler_factor <= 1:
            raise ValueError(f"fault.watchdog.straggler_factor must be > 1, got {self.straggler_factor}")
        if self.straggler_window < 1 or self.straggler_windows < 1:
            raise ValueError(f"fault.watchdog.straggler_window ({self.straggler_window}) and straggler_windows "
                             f"({self.straggler_windows}) must be >= 1")


class ComputeTimer:
    """Times this rank's forward compute: each forward's wall time (CUDA events on a GPU, where host time would only
    measure kernel launches) minus the time spent in the engine's forward pre-hooks.

    On a CPU device the time the thread sat in the run queue, waiting for a core held by another process, is left
    out as well: with more ranks than cores (4 ranks on a 2-core host) the scheduler's placement made healthy ranks
    1.5-2.3x slower than the others for whole windows (measured), which is host contention, not the rank's own
    speed. A rank slowed for real (a throttled or stopped process, a slow device, a sleep injected by chaos) is not
    in the run queue during that time, so it is still counted.

    FSDP2, DeepSpeed ZeRO-3 and megatron-core's distributed optimizer gather parameters in forward pre-hooks; a
    rank waiting there waits for its peers, and counting it would hide a slow rank (whose peers then wait) and blame
    a healthy one. ``exclude_engine_hooks`` brackets every pre-hook the engine registered with two of ours (one
    prepended, one appended), and that interval is subtracted. On a GPU the interval is measured on the stream, so
    a stream wait on an all-gather's event is excluded too.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_time = False  # count this thread's CPU time (model parallelism on a CPU device: see below)
        self._active = False
        self._spans: list = []  # (start, end) CUDA event pairs of forwards and of excluded waits, with a sign
        self._host_s = 0.0
        self._wait_start = None
        self.hooked_modules = 0

    def exclude_engine_hooks(self, module: torch.nn.Module) -> None:
        """Call once the engine is built and before anything else adds forward pre-hooks (chaos, meters).

        Under tensor or pipeline parallelism the timed span holds waits for peers that no hook brackets: a tp
        peer's all-reduce inside every layer, and under a pipeline the whole schedule (forward and backward of
        every micro-batch, the p2p receives, the barrier it starts from). A healthy rank next to a slow one waits
        there, and in wall time every rank looks as slow as the culprit (measured on tp=2 x pp=2 x dp=2, one rank's
        blocks 3x slower: every rank's windows within 0.85-1.22 s, no straggler found). On a CPU device such a rank
        counts its own thread's CPU time instead: a blocked wait in gloo (a collective, a p2p receive) uses none,
        and the run queue is left out as before (same drill: 0.37 s against 0.12-0.17 s, the culprit named). On a
        GPU the span stays event time (excluding stream waits for peers there is not done)."""
        self.cpu_time = not self.cuda and model_parallel(module)
        for m in module.modules():
            if m._forward_pre_hooks:
                m.register_forward_pre_hook(self._wait_begins, prepend=True)
                m.register_forward_pre_hook(self._wait_ends)
                self.hooked_modules += 1

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.cpu_time:
            return time.thread_time()
        return time.perf_counter() - run_queue_s()

    def _wait_begins(self, module, args) -> None:
        if self._active:
            self._wait_start = self._mark()

    def _wait_ends(self, module, args) -> None:
        if self._active and self._wait_start is not None:
            self._add(self._wait_start, self._mark(), -1)
            self._wait_start = None

    def _add(self, start, end, sign: int) -> None:
        if self.cuda:
            self._spans.append((start, end, sign))
        else:
            self._host_s += sign * (end - start)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        start = self._mark()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._add(start, self._mark(), +1)

    def take(self) -> float:
        """Seconds of forward compute in the step just finished (call after the step synchronised)."""
        total = self._host_s + sum(sign * s.elapsed_time(e) / 1e3 for s, e, sign in self._spans)
        self._spans, self._host_s = [], 0.0
        return max(total, 0.0)


def model_parallel(module: torch.nn.Module) -> bool:
    """The module is a pipeline stage (comm/parallel/pipeline.py ``stage_module`` marks it) or holds tensor-parallel
    (DTensor) parameters: a forward that waits for peers inside it."""
    if getattr(module, "_pipeline_chunks", None) is not None:
        return True
    return any(hasattr(p, "device_mesh") for p in module.parameters())


@dataclass
class Verdict:
    """Who is to blame for a hang, and why."""

    blamed: list[int]  # empty: the evidence points at no rank
    rule: str  # frozen | not_in_collective | behind | only_rank | unknown
    waiting_in: dict | None = None  # the collective the healthy ranks wait in: group, desc, seq, op, bytes
    waiting_ranks: list[int] | None = None


PHASE_ORDER = {p: i for i, p in enumerate(PHASES)}


def blame(beats: dict[int, dict], *, frozen: set[int]) -> Verdict:
    """The rank(s) at fault for a hang, from every rank's heartbeat and the ranks seen frozen (no liveness).

    Ranks that left on purpose (``state`` exiting, finished, terminated) are not candidates: a watchdog that fired
    first has stopped beating, and must not be mistaken for a frozen rank."""
    live = {r: b for r, b in beats.items() if b.get("state", "running") == "running"}
    # A rank that already detected the hang and left still shows where it stood: keep it in the collective analysis.
    waits = _waits_for(beats)
    waiting_in = next((w for w in waits.values() if w), None)
    waiting_ranks = sorted(r for r, w in waits.items() if w)
    info = {"waiting_in": waiting_in["collective"] if waiting_in else None, "waiting_ranks": waiting_ranks}
    if stopped := sorted(r for r in live if r in frozen):
        return Verdict(stopped, "frozen", **info)
    # A waits-for graph: a rank pending in collective N of a group waits for the members that never entered N.
    # The ranks at fault are the ones waited for that wait for no one themselves.
    waited_for = {m for w in waits.values() if w for m in w["missing"]}
    sinks = sorted(m for m in waited_for if not waits.get(m))
    if sinks:
        for w in waits.values():  # name the collective that waits on a culprit directly
            if w and set(w["missing"]) & set(sinks):
                info["waiting_in"] = w["collective"]
                break
        return Verdict(sinks, "not_in_collective", **info)
    if not beats:
        return Verdict([], "unknown", **info)

    def position(r: int) -> tuple:
        b = beats[r]
        default = (b.get("collectives") or {}).get("0", {})
        return b.get("step", 0), PHASE_ORDER.get(b.get("phase"), 0), b.get("micro", 0), default.get("enqueued", 0)

    if len(beats) == 1:  # one process: it is the one that stopped
        return Verdict(list(beats), "only_rank", **info)
    lowest = min(position(r) for r in beats)
    behind = sorted(r for r in beats if position(r) == lowest)
    if len(behind) == 1:
        return Verdict(behind, "behind", **info)
    return Verdict([], "unknown", **info)


def _waits_for(live: dict[int, dict]) -> dict[int, dict | None]:
    """For each rank: the oldest collective it waits in ({"collective", "missing"}), or None."""
    out: dict[int, dict | None] = {r: None for r in live}
    names = {n for b in live.values() for n in (b.get("collectives") or {})}
    absent = {"enqueued": -1, "started": -1, "completed": -1}  # a member that has not used the group yet
    for name in names:
        members = {r: b["collectives"][name] for r, b in live.items() if name in (b.get("collectives") or {})}
        for ranks in [g.get("ranks") for g in list(members.values())]:
            for m in ranks or []:
                if m in live and m not in members:
                    members[m] = absent
        for r, g in members.items():
            if g["enqueued"] <= max(g["completed"], 0):
                continue
            seq = max(g["completed"], 0) + 1
            # NCCL with timing records when a collective started on the device: a rank that enqueued it but never
            # started it (its GPU is stuck before it) is missing too.
            started = all(o["started"] >= 0 for o in members.values())
            missing = sorted(m for m, o in members.items()
                             if m != r and (o["started"] if started else o["enqueued"]) < seq)
            if not missing:
                continue
            pending = g.get("pending") or {}
            collective = {"group": name, "desc": g.get("desc", ""), "seq": seq, "op": pending.get("op", "?"),
                          "bytes": pending.get("bytes")}
            if out[r] is None or (out[r]["collective"]["group"] != "0" and name == "0"):
                out[r] = {"collective": collective, "missing": missing}
    _pipeline_waits(live, out)
    return out


# Waits the flight recorder does not keep, recognised by the main thread's place in the heartbeat (``where``).
P2P_WAIT = "_wait_batch_p2p"  # torch.distributed.pipelining's wait on a stage's sends and receives
BARRIER_WAIT = " barrier"  # inside torch.distributed.barrier
PIPELINE_GROUP_DESC = "mesh_pp"  # the pipeline dimension's group (DeviceMesh names a dim's group mesh_<dim>)


def pipeline_stage(beat: dict) -> int | None:
    """A rank's position in its pipeline (its index in its pipeline group), from its heartbeat; None without one."""
    for g in (beat.get("collectives") or {}).values():
        if g.get("desc") == PIPELINE_GROUP_DESC and beat.get("rank") in (g.get("ranks") or []):
            return g["ranks"].index(beat["rank"])
    return None


def _barrier_wait(r: int, beats: dict[int, dict], out: dict[int, dict | None]) -> None:
    """A rank blocked in a barrier the flight recorder does not keep (gloo's; the pipeline step starts from one
    over its pipeline group) waits for the members of a group it has run more operations on than they have (measured:
    a rank hung before its step was blamed together with its pipeline peer, which waited for it in that barrier)."""
    mine = beats[r].get("collectives") or {}
    for name, g in mine.items():
        behind = sorted(m for m in g.get("ranks") or [] if m != r and m in beats
                        and ((beats[m].get("collectives") or {}).get(name) or {}).get("enqueued", -1) < g["enqueued"])
        if behind:
            out[r] = {"collective": {"group": name, "desc": g.get("desc", ""), "seq": g["enqueued"],
                                     "op": "barrier", "bytes": None}, "missing": behind}
            return


def _pipeline_waits(beats: dict[int, dict], out: dict[int, dict | None]) -> None:
    """Edges of the waits-for graph the collective counts miss: a rank in a barrier (``_barrier_wait``), and a
    rank blocked in a pipeline schedule's p2p wait, which waits for its pipeline peers. The flight recorder keeps no
    p2p operation on gloo (nor a peer on any backend), so without this such a rank looks like one that never
    entered the collective the others wait in, and is blamed beside the culprit (measured on tp=2 x pp=2 x dp=2:
    a hang inside rank 3's forward blamed ranks 0, 1 and 3, the first stage blocked waiting for rank 3's
    gradients). Its peers that are not themselves in a p2p wait are the ones it waits for; the main thread's place
    (``where`` in the heartbeat) says it is in that wait."""
    for r, b in beats.items():
        if not out.get(r) and BARRIER_WAIT in (b.get("where") or ""):
            _barrier_wait(r, beats, out)
        if out.get(r) or P2P_WAIT not in (b.get("where") or ""):
            continue
        group = next(((n, g) for n, g in (b.get("collectives") or {}).items()
                      if g.get("desc") == PIPELINE_GROUP_DESC), None)
        if group is None:
            continue
        name, g = group
        peers = [m for m in g.get("ranks") or [] if m != r]
        missing = sorted(m for m in peers if P2P_WAIT not in (beats.get(m, {}).get("where") or ""))
        if missing:
            out[r] = {"collective": {"group": name, "desc": g.get("desc", ""), "seq": None, "op": "pipeline p2p",
                                     "bytes": None}, "missing": missing}


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, *, run_dir: Path, rank: int, world_size: int, events: EventLog,
                 progress: Progress | None = None):
        self.cfg, self.rank, self.world_size, self.events = cfg, rank, world_size, events
        self.progress = progress or Progress()
        self.dir = Path(run_dir) / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.liveness_s = cfg.liveness_s or max(6 * cfg.poll_s, 3.0)
        self._last_progress = time.monotonic()
        self._signature: tuple | None = None
        self._first_step_done = False
        self._beats = 0
        self._state = "running"
        self._last_beat: dict | None = None
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._window: list[float] = []  # this window's compute times
        self._window_index: int | None = None
        self._windows: deque[list] = deque(maxlen=8)  # [window index, median compute s, min compute s]
        self._steps_seen = 0
        self._peers: dict[int, list] = {}  # rank -> [beat counter, monotonic time it last changed, first seen]
        self._deferred = False  # a hang decision put off because a peer still makes progress (logged once)
        self._scored = -1
        self._slow_streak: dict[int, list[float]] = {}
        self._noise: list[float] = []  # |log| change of each rank's ratio between consecutive windows
        self._last_ratio: dict[int, float] = {}
        self._ratio_history: dict[int, list[float]] = {}  # each rank's ratios in its healthy windows
        self._stragglers: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="chuanliu-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._write()
        if self.cfg.enabled:
            self._thread.start()
        return self

    def stop(self, state: str = "finished") -> None:
        """Stop watching; rank 0 scores the ranks' windows one last time, once every rank has published its last
        one (a short run may end between polls)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.cfg.poll_s)
        self._state = state
        self._write()
        if self.rank == 0 and self.world_size > 1:
            deadline = time.monotonic() + max(2.0, 4 * self.cfg.poll_s)
            while time.monotonic() < deadline and any(b.get("state", "running") == "running"
                                                      for b in self.heartbeats().values()):
                time.sleep(self.cfg.poll_s / 4)
            self._check_stragglers()

    def beat(self, step: int, phase: str, compute_s: float | None = None) -> None:
        """Record progress: the main thread calls this at each phase of each step (no I/O)."""
        self.progress.set(step, phase)
        if compute_s is not None:
            self._add_compute(step, compute_s)
        if phase == "done":
            self._first_step_done = True
        if not self._thread.is_alive():
            self._write()

    def _add_compute(self, step: int, compute_s: float) -> None:
        """Windows are aligned on step numbers, so every rank's window w covers the same steps; the first step of
        each process (allocation, lazy initialisation) and a window cut by a restart are left out."""
        self._steps_seen += 1
        w = (step - 1) // self.cfg.straggler_window
        if w != self._window_index:
            self._window, self._window_index = [], w
        if self._steps_seen == 1:
            self._window_index = None  # this window is incomplete for this process: skip it
            return
        self._window.append(compute_s)
        if len(self._window) == self.cfg.straggler_window:
            with self._lock:
                self._windows.append([w, statistics.median(self._window), min(self._window)])
            self._window, self._window_index = [], None

    # ---- heartbeats ---------------------------------------------------------------------------------------------
    def _write(self, collectives_now: dict | None = None, *, keep_position: bool = False) -> None:
        """keep_position: only the state and the beat change; where the main thread was and its collectives stay
        as the last heartbeat had them (called from the main thread, which is no longer where it stood)."""
        self._beats += 1
        with self._lock:
            windows = list(self._windows)
        last = self._last_beat if keep_position else None
        beat = {"rank": self.rank, "host": self._host, "pid": self._pid, "state": self._state, "beat": self._beats,
                "time": time.time(), **self.progress.snapshot(),
                "where": last["where"] if last else main_thread_where(),
                "idle_s": round(time.monotonic() - self._last_progress, 3), "limit_s": self._limit()[0],
                "collectives": (last["collectives"] if last else collectives() if collectives_now is None
                                else collectives_now), "windows": windows}
        self._last_beat = beat
        path = self.dir / f"rank{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)  # readers never see a half-written heartbeat
        except OSError as e:  # a full or vanished disk must not kill the watchdog; the next poll tries again
            log.warning("cannot write heartbeat %s: %s", path, e)

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
        """Ranks on this host whose process is gone (or a zombie) without leaving on purpose (a watchdog's exit, the
        launcher's stop): who crashed, as seen from a survivor."""
        return sorted(r for r, b in self.heartbeats().items() if b.get("host") == self._host and r != self.rank
                      and b.get("state", "running") == "running" and not _alive(b["pid"]))

    def unresponsive_ranks(self) -> list[int]:
        """Ranks whose process is gone on this host, or whose heartbeat did not change for ``liveness_s`` (any
        host): called after a collective failed, to find the peer that broke it."""
        dead = set(self.dead_ranks())
        first = {r: b.get("beat") for r, b in self.heartbeats().items() if b.get("state", "running") == "running"}
        time.sleep(self.liveness_s)
        again = self.heartbeats()
        stale = {r for r, n in first.items() if r != self.rank and again.get(r, {}).get("beat") == n
                 and again.get(r, {}).get("state", "running") == "running"}
        return sorted(dead | stale)

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _limit(self) -> tuple[float, str]:
        if not self._first_step_done:
            return self.cfg.startup_timeout_s, "startup_timeout_s"
        if self.progress.io_wait:
            return self.cfg.checkpoint_timeout_s, "checkpoint_timeout_s"
        return self.cfg.hang_timeout_s, "hang_timeout_s"

    def _watch(self) -> None:
        failures = 0
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 (the watchdog must outlive a bad poll: it is the liveness signal)
                failures += 1
                if failures <= 3:
                    log.exception("watchdog poll failed on rank %d (it keeps watching)", self.rank)

    def _poll(self) -> None:
        now_collectives = collectives()
        signature = (self.progress.changes,
                     tuple(sorted((n, g["enqueued"], g["completed"]) for n, g in now_collectives.items())))
        now = time.monotonic()
        if signature != self._signature:
            self._signature, self._last_progress = signature, now
        self._write(now_collectives)
        idle = now - self._last_progress
        limit, name = self._limit()
        if idle > limit / 4 and self.world_size > 1:
            self._observe_peers(now)  # liveness history for the blame, gathered only while a hang is possible
        elif self._peers:
            self._peers.clear()
        if idle > limit and self._observed_for(now) >= min(self.liveness_s, 0.75 * limit):
            busy = self._busy_peers(now)
            if not busy:
                self._hang(idle, limit, name)
            elif not self._deferred:
                self._deferred = True
                log.warning("no progress on rank %d for %.0f s, but rank(s) %s still make progress (a slow save, "
                            "a slow rank): waiting for them, not a hang", self.rank, idle, busy)
        else:
            self._deferred = False
        # Rank 0 reads every heartbeat only while one of its own windows waits to be scored (every rank's window w
        # covers the same steps), not on every poll: at 1000 ranks that is a burst of reads per window.
        if self.rank == 0 and self.world_size > 1 and self._windows and self._windows[-1][0] > self._scored:
            self._check_stragglers()

    def _busy_peers(self, now: float) -> list[int]:
        """Live peers that still make progress within their own limit: a rank waiting in a collective for a peer
        that is slow but moving (writing a big checkpoint at 200 MB/s, a straggler) is not hung, and neither is the
        job. A frozen peer's last heartbeat says it was busy, so frozen ranks never count."""
        frozen = {r for r, p in self._peers.items() if now - p[1] >= self.liveness_s}
        return sorted(r for r, b in self.heartbeats().items()
                      if r != self.rank and r not in frozen and b.get("state", "running") == "running"
                      and b.get("idle_s", float("inf")) < b.get("limit_s", self.cfg.hang_timeout_s))

    def _observe_peers(self, now: float) -> None:
        for r, b in self.heartbeats().items():
            seen = self._peers.get(r)
            if seen is None:
                self._peers[r] = [b.get("beat"), now, now]
            elif seen[0] != b.get("beat"):
                seen[0], seen[1] = b.get("beat"), now

    def _observed_for(self, now: float) -> float:
        if self.world_size == 1:
            return float("inf")
        return now - min((p[2] for p in self._peers.values()), default=now)

    def _hang(self, idle: float, limit: float, limit_name: str) -> None:
        now = time.monotonic()
        beats = self.heartbeats()
        frozen = {r for r, p in self._peers.items() if r != self.rank and now - p[1] >= self.liveness_s}
        verdict = blame(beats, frozen=frozen)
        first = verdict.blamed[0] if verdict.blamed else None
        culprit = beats.get(first, {})
        # What the healthy ranks wait in says what is stuck; a frozen rank's own phase may be a poll out of date.
        if verdict.waiting_in:
            in_checkpoint = verdict.waiting_in.get("desc") == CHECKPOINT_GROUP_DESC
        else:
            in_checkpoint = culprit.get("phase") == "checkpoint" or bool(culprit.get("io_wait"))
        cause = "checkpoint_hang" if in_checkpoint else "hang"
        detail = describe(verdict, beats, frozen, me=self.rank, idle=idle, limit=limit, limit_name=limit_name)
        fenced = [r for r in verdict.blamed if verdict.rule == "frozen" and self._fence(beats.get(r, {}))]
        if fenced:
            detail += f"; killed the stopped process of rank(s) {fenced} on this host so the launcher can restart"
        self.events.emit("detected", durable=True, cause=cause, blamed_rank=first, blamed_ranks=verdict.blamed,
                         blamed_host=culprit.get("host"), rule=verdict.rule, waiting_in=verdict.waiting_in,
                         step=self.progress.step, fenced=fenced, detail=detail)
        log.error("%s detected: %s; exiting with status %d so the launcher restarts the job",
                  cause.replace("_", " "), detail, EXIT_HANG)
        self._state = "exiting"
        self._write()  # peers must not read this rank's silence as a frozen process
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_HANG)  # the main thread may be stuck in C++ (a collective): only exiting frees the job

    def _fence(self, beat: dict) -> bool:
        """SIGKILL a blamed rank's process when it is on this host and stopped (state T: SIGSTOP, a debugger).

        A stopped process ignores the launcher's SIGTERM until it is continued, so torchrun's agent waits out its
        grace period (30 s) before its SIGKILL; fencing it here cuts recovery by that much (measured: 37 s -> 7 s
        on 4 CPU ranks). Only a process whose pid and host the heartbeat names and that the kernel reports as
        stopped is touched; one frozen in uninterruptible I/O (state D) is left to the launcher."""
        pid = beat.get("pid")
        if beat.get("host") != self._host or not pid or _proc_state(pid) not in ("T", "t"):
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return False
        return True

    # ---- stragglers ---------------------------------------------------------------------------------------------
    def _check_stragglers(self) -> None:
        beats = {r: b for r, b in self.heartbeats().items() if b.get("windows")}
        if len(beats) < 2:
            return
        per_rank = {r: {w[0]: w[1] for w in b["windows"]} for r, b in beats.items()}
        complete = sorted(set.intersection(*(set(v) for v in per_rank.values())))
        for w in (w for w in complete if w > self._scored):
            self._score_window(w, {r: v[w] for r, v in per_rank.items()}, beats)
            self._scored = w

    def _score_window(self, w: int, times: dict[int, float], beats: dict[int, dict]) -> None:
        """A window is slow for a rank when its compute is ``straggler_factor`` times the other ranks' median, or
        when its ratio to the others grew by that factor over its own earlier windows and it is now clearly the
        slower (a rank that was a little faster or slower than the rest all along keeps its ratio; a rank that
        became slower does not, whatever its starting point). Both ratios compare ranks within one window, so a
        slowdown of the whole job is not a straggler. The first criterion must also beat the run's own noise:
        exp(2x the median |log| change of a rank's ratio between consecutive windows), which on a quiet GPU cluster
        is a few percent and leaves the factor in charge."""
        ratios = {}
        role = {r: pipeline_stage(beats.get(r, {})) for r in times}
        for rank, t in times.items():
            # Under a pipeline, stages do different work (the first holds the embedding, the last the LM head and
            # the loss): a rank is compared with the ranks at its own pipeline position when there are any.
            peers = [r for r in times if r != rank and role[r] == role[rank]] or [r for r in times if r != rank]
            others = statistics.median(times[r] for r in peers)
            ratios[rank] = t / others if others > 0 and t > 0 else 1.0
        # Noise is how much a rank's ratio moves from one window to the next: a persistent straggler moves once
        # (at its onset), host contention keeps moving every rank (measured here: 1-2.3x jumps between windows).
        for rank, ratio in ratios.items():
            if rank in self._last_ratio:
                self._noise.append(abs(math.log(ratio / self._last_ratio[rank])))
            self._last_ratio[rank] = ratio
        noise = statistics.median(self._noise) if self._noise else 0.0
        threshold = max(self.cfg.straggler_factor, math.exp(2 * noise))
        for rank, ratio in ratios.items():
            history = self._ratio_history.setdefault(rank, [])
            drift = ratio / statistics.median(history) if len(history) >= 2 else 1.0
            streak = self._slow_streak.setdefault(rank, [])
            became_slow = drift > self.cfg.straggler_factor and ratio > (1 + self.cfg.straggler_factor) / 2
            if ratio > threshold or became_slow:
                streak.append(ratio)
            else:
                streak.clear()
                history.append(ratio)  # only healthy windows form the rank's baseline
            b = beats[rank]
            if len(streak) >= self.cfg.straggler_windows and rank not in self._stragglers:
                self._stragglers.add(rank)
                mean = statistics.fmean(streak)
                t = times[rank]
                baseline = f", {drift:.2f}x its own earlier ratio" if len(history) >= 2 else ""
                detail = (f"rank {rank} on {b.get('host')} (pid {b.get('pid')}): forward compute {mean:.2f}x the "
                          f"other ranks' median{baseline} over {len(streak)} consecutive windows of "
                          f"{self.cfg.straggler_window} steps (last window: {t * 1e3:.1f} ms vs "
                          f"{t / ratio * 1e3:.1f} ms)")
                self.events.emit("detected", cause="straggler", blamed_rank=rank, blamed_host=b.get("host"),
                                 step=b.get("step"), ratio=mean, drift=drift, window=w, windows=len(streak),
                                 threshold=threshold, detail=detail)
                log.warning("straggler: %s", detail)
            elif not streak and rank in self._stragglers:
                self._stragglers.discard(rank)
                self.events.emit("straggler_recovered", rank=rank, step=b.get("step"), ratio=ratio, window=w)


def describe(verdict: Verdict, beats: dict[int, dict], frozen: set[int], *, me: int, idle: float, limit: float,
             limit_name: str) -> str:
    parts = [f"no progress on rank {me} for {idle:.1f} s ({limit_name}={limit:g})"]
    w = verdict.waiting_in
    if w:
        n = w.get("bytes")
        size = "" if not n else f", {n / 1e6:.2f} MB" if n >= 1e5 else f", {n} B"
        which = "" if w.get("seq") is None else f" #{w['seq']}"  # a pipeline p2p wait has no sequence number
        parts.append(f"rank(s) {verdict.waiting_ranks} wait in {w['desc'] or 'group ' + w['group']} collective"
                     f"{which} ({w['op']}{size})")
    why = {"frozen": "shows no sign of life (frozen or gone)",
           "not_in_collective": "never entered that collective",
           "behind": "is furthest behind", "only_rank": "is the only rank", "unknown": ""}[verdict.rule]
    for r in verdict.blamed:
        b = beats.get(r, {})
        parts.append(f"blamed rank {r} on {b.get('host')} (pid {b.get('pid')}) {why}: step {b.get('step')} "
                     f"{b.get('phase')} micro-batch {b.get('micro')}"
                     + (f", checkpoint I/O: {b.get('io_what')}" if b.get("io_what") else "")
                     + f", at {b.get('where')}")
    if not verdict.blamed:
        parts.append("no rank is behind or missing from a collective: every rank entered it, so suspect the "
                     "interconnect or a device stuck inside the collective")
    return "; ".join(parts)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) != "Z"  # a killed child stays a zombie until its parent (the launcher) reaps it

def check_losses(step: int, rank_losses: list[float], events: EventLog, *, rank: int,
                 origins: list[bool] | None = None) -> None:
    """Raise NonFiniteLoss (after logging which ranks) when any rank's local loss is NaN or Inf. ``origins``:
    per rank, whether a non-finite value first appeared in its own compute (a pipeline's loss reaches every rank
    of the replica, so the loss alone cannot say which stage made it): the first such rank is blamed."""
    bad = [r for r, v in enumerate(rank_losses) if not math.isfinite(v)]
    if not bad:
        return
    detail = f"non-finite loss at step {step} on rank(s) {bad}: {[rank_losses[r] for r in bad]}"
    first = [r for r in bad if origins and origins[r]]
    if first:
        detail += f"; first non-finite output of a stage from finite input on rank(s) {first}"
    if rank == 0:  # every rank sees the same gathered losses; one event is enough
        blamed = first or bad
        events.emit("detected", durable=True, cause="nan_loss", blamed_rank=blamed[0], blamed_ranks=blamed,
                    step=step, detail=detail)
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
        watchdog._state = "terminated"
        # A peer's watchdog must not read this rank's silence as a frozen process, and must still see where it
        # stood: this handler runs on the main thread, so a fresh heartbeat would place it here, outside the wait
        # it was in (measured on tp x pp x dp: a rank stopped while it waited for the hung rank was then blamed
        # beside it by the watchdogs that fired after the first).
        watchdog._write(keep_position=True)
        os._exit(EXIT_TERMINATED)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)

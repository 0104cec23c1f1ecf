"""What a rank is doing, as the watchdog sees it: progress (step, phase, micro-batch, I/O) and collectives.

Liveness and progress are different things. A frozen process (SIGSTOP, a host that stopped scheduling it) makes no
progress and shows no sign of life; a rank stuck in Python or in a kernel is alive but makes no progress; a rank
waiting in a collective for a stuck peer is alive, makes no progress, and is not at fault. Telling them apart needs
both signals: the watchdog thread writes the heartbeat on every poll (liveness), and the heartbeat carries this
module's ``Progress`` and the per-group collective counts (progress).

Collectives come from torch's flight recorder (c10d's ``FlightRecorder``, the ring buffer behind
``TORCH_NCCL_TRACE_BUFFER_SIZE`` and torch's desync debugging), which records every collective a process group
runs whoever issued it: DDP's C++ reducer, FSDP2's all-gathers and reduce-scatters, DeepSpeed, megatron-core, our
comm hooks, checkpoint agreement. Per group it keeps the last collective enqueued, started (NCCL with timing only)
and completed, and for each recent one its op and sizes. That is exactly what blames the right rank: the healthy
ranks all wait in collective N of some group, and the culprit never entered it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch._C._distributed_c10d as c10d
import torch.distributed as dist

FR_BUFFER_ENV = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
FR_BUFFER_DEFAULT = "256"  # entries; the watchdog needs the pending ones and the per-group counters only
_DTYPE_BYTES = {"Float": 4, "BFloat16": 2, "Half": 2, "Double": 8, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                "Byte": 1, "Bool": 1, "Float8_e4m3fn": 1, "Float8_e5m2": 1}
_REPO = str(Path(__file__).resolve().parents[1])


def enable_flight_recorder() -> None:
    """Ask c10d to record collectives (call before the process group starts; a value the user set is kept)."""
    if not any(os.environ.get(k) for k in FR_BUFFER_ENV):
        os.environ[FR_BUFFER_ENV[0]] = FR_BUFFER_DEFAULT


class Progress:
    """This rank's position, updated by the training code (in memory, no I/O) and read by the watchdog thread.

    ``changes`` counts every update: the watchdog sees progress when it moves, or when a collective completes.
    ``io_wait`` is set around an opaque I/O operation (an fsync, an engine's own checkpoint writer) that reports no
    progress while it runs; the watchdog then allows it ``checkpoint_timeout_s`` instead of ``hang_timeout_s``.
    """

    def __init__(self) -> None:
        self.step, self.phase, self.micro = 0, "start", 0
        self.io_bytes, self.io_what = 0, ""
        self.io_wait: str | None = None
        self.changes = 0

    def set(self, step: int, phase: str) -> None:
        self.step, self.phase, self.micro = step, phase, 0
        self.io_what = ""  # an async save's writer thread sets it again while it works
        self.changes += 1

    def next_micro(self) -> None:
        self.micro += 1
        self.changes += 1

    def io(self, nbytes: int, what: str) -> None:
        """Bytes of checkpoint I/O done (written, hashed) and what is being done: progress from inside a save."""
        self.io_bytes += nbytes
        self.io_what = what
        self.changes += 1

    @contextlib.contextmanager
    def opaque(self, what: str) -> Iterator[None]:
        self.io_wait, self.io_what = what, what
        self.changes += 1
        try:
            yield
        finally:
            self.io_wait = None
            self.changes += 1

    def snapshot(self) -> dict:
        return {"step": self.step, "phase": self.phase, "micro": self.micro, "io_bytes": self.io_bytes,
                "io_what": self.io_what, "io_wait": self.io_wait, "changes": self.changes}


def _dumps() -> list[dict]:
    """The flight recorder's dumps: the generic one (gloo) and, on CUDA builds, NCCL's."""
    out = []
    for fn in (getattr(c10d, "_dump_fr_trace_json", None), getattr(c10d, "_dump_nccl_trace_json", None)):
        if fn is None:
            continue
        try:
            out.append(json.loads(fn(True, False)))
        except Exception:  # noqa: BLE001, S112 (a build or backend without a recorder: no collective information)
            continue
    return out


def _entry_bytes(e: dict) -> int:
    size = sum(math.prod(s) for s in e.get("input_sizes") or [])
    dtypes = e.get("input_dtypes") or ["Float"]
    return size * _DTYPE_BYTES.get(dtypes[0], 4)


def collectives() -> dict[str, dict]:
    """Per process group this rank belongs to (by name, equal on every rank): its member ranks, the sequence
    numbers of the last collective enqueued and completed, and the oldest pending one (seq, op, bytes).

    Enqueued is the group's own sequence number; completed is one below the oldest collective the recorder has not
    retired (the recorder's per-group status is keyed by an id that differs between ranks, so it is not used)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    pending: dict[str, dict] = {}
    newest: dict[str, int] = {}
    for dump in _dumps():
        for e in dump.get("entries", []):
            if e.get("is_p2p"):
                continue
            name, seq = (e.get("process_group") or ["?"])[0], e.get("collective_seq_id", 0)
            newest[name] = max(newest.get(name, 0), seq)
            if not e.get("retired") and (name not in pending or seq < pending[name]["seq"]):
                pending[name] = {"seq": seq, "op": e.get("profiling_name", "?"), "bytes": _entry_bytes(e)}
    world = dist.distributed_c10d._world
    groups = {}
    for pg, name in list(world.pg_names.items()):
        ranks = world.pg_group_ranks.get(pg)
        if not ranks:
            continue
        try:
            enqueued = pg._get_sequence_number_for_group()
        except RuntimeError:  # a backend without sequence numbers: what the recorder saw
            enqueued = 0
        enqueued = max(enqueued, newest.get(name, 0))
        p = pending.get(name)
        groups[name] = {"desc": getattr(pg, "group_desc", "") or "", "ranks": sorted(ranks), "enqueued": enqueued,
                        "started": -1, "completed": p["seq"] - 1 if p else enqueued, "pending": p}
    return groups


def main_thread_where() -> str:
    """Where the main thread is right now: its innermost frame and the innermost one in this project's code."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?"
    inner = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
    f = frame
    while f is not None and (not f.f_code.co_filename.startswith(_REPO) or "site-packages" in f.f_code.co_filename):
        f = f.f_back
    if f is None or f is frame:
        return inner
    return f"{inner} < {_short(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"


def _short(path: str) -> str:
    parts = Path(path).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:])
    return os.path.relpath(path, _REPO) if path.startswith(_REPO) else Path(path).name


def run_queue_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0

"""The run's event log: ``<run_dir>/events.jsonl``, one JSON object per line, appended by every rank.

Detections, fault injections, restarts, checkpoint commits and fallbacks land here with a wall-clock timestamp,
the rank that saw them and the launcher's restart count, so a drill report can be computed afterwards from the
files alone (fault.drill). Each event is one ``write`` of one line on a file opened with O_APPEND, so lines
from several processes do not interleave; events that precede a deliberate death (a SIGKILL injection) are
fsynced first.

Event kinds (the ``kind`` field) and what they carry:
    start               step the process starts from (0 = fresh), resumed_from (a checkpoint path or null)
    fault_injected      fault (kind), fault_id, step, target rank
    detected            cause (crash, hang, checkpoint_hang, nan_loss, exception, straggler, collective_failure,
                        terminated), blamed_rank (or null), step, detail; a hang also blamed_ranks, blamed_host,
                        rule (frozen, not_in_collective, behind, unknown), waiting_in (group, desc, seq, op,
                        bytes), fenced; a straggler ratio, drift, window, windows, threshold
    checkpoint_commit   step, path, block_s (training blocked), write_s (whole save), bytes
    checkpoint_fallback skipped (path), reason, used (path or null)
    checkpoint_failed   step (the save that committed nothing), at_step, detail; training went on
    checkpoint_lease_takeover  dir, previous (the stale holder: job, host, pid, heartbeat)
    step_done           step (only the first completed step of each process, to time recovery)
    finish              step, steps_done
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


def restart_count() -> int:
    """How many times the launcher (torchrun's elastic agent) restarted this worker group; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class EventLog:
    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / EVENTS_FILE
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, *, durable: bool = False, **fields: Any) -> dict[str, Any]:
        """Append one event; ``durable`` fsyncs it (use before the process may die)."""
        now = time.time()
        event = {"time": now, "iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                 "kind": kind, "rank": self.rank, "restart": restart_count(), **fields}
        line = (json.dumps(event, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        return event


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event of a run in time order; a torn last line (a process killed mid-write) is skipped."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(events, key=lambda e: e["time"])

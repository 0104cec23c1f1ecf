"""One writer per checkpoint directory: a lease file with the holder's job identity and a heartbeat.

Two jobs pointed at one checkpoint directory would destroy each other's work (one removes the other's save in
progress, prunes its checkpoints, or commits over its steps). ``Lease.acquire`` on the job's rank 0 creates
``<dir>/.lease.json`` with ``O_EXCL``; a second job finds it held and refuses with one line naming the holder.

Why a heartbeat file and not ``fcntl``/``flock``: checkpoint directories live on NFS, Lustre, GPFS or a bucket's
POSIX mount, where advisory locks are missing, local to a node or silently ignored; a file created with ``O_EXCL``
and refreshed by its holder works on all of them. The holder's thread rewrites it every ``ttl_s / 4`` seconds.

Who may take a lease over:
- the same job, restarted (the launcher's job id: ``CHUANLIU_JOB_ID``, ``SLURM_JOB_ID``, or torchrun's
  ``TORCHELASTIC_RUN_ID`` when it is not the default "none"): silently, a restart is not a second writer;
- anyone, once the holder is gone: its heartbeat is older than ``ttl_s``, or it ran on this host under a pid that no
  longer exists. Taken over with a warning (and an event), naming the previous holder.
Otherwise ``LeaseHeld`` (a CheckpointError-like ValueError) says who holds it and what to do.

The holder re-reads the lease before every commit (``check``): a job that lost its lease (stopped longer than
``ttl_s`` and taken over) never commits into a directory another job now owns.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fault.watchdog import _alive as pid_alive  # the watchdog's test: a zombie is not alive

log = logging.getLogger(__name__)

LEASE = ".lease.json"
_PROCESS_START = time.time()


class LeaseHeld(ValueError):
    """Another live job holds the directory: the message names it and says what to do."""


@dataclass
class JobIdentity:
    job: str  # the launcher's job id, or host-pid-start of rank 0 when there is none
    host: str
    pid: int
    token: str  # this holder's own token (a restart of the same job gets a new one)

    @property
    def tag(self) -> str:
        return job_tag(self.job)


def job_tag(job: str) -> str:
    """A job id as a file-name component (the job's temporary checkpoint directories carry it)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:64]


def job_identity(job: str | None = None) -> JobIdentity:
    """This process's job identity, from the launcher where it gives one. Rank 0's is the job's (it is the one
    that holds the lease and names the temporary directories; the trainer broadcasts it)."""
    host, pid = socket.gethostname(), os.getpid()
    found = job or next((v for k in ("CHUANLIU_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
                         if (v := os.environ.get(k)) and v.lower() != "none"), None)
    ident = found if found else f"{host}-{pid}-{int(_PROCESS_START)}"
    return JobIdentity(job=ident, host=host, pid=pid, token=uuid.uuid4().hex)


def _alive_here(host: str, pid: int) -> bool | None:
    """Whether ``pid`` runs on this host; None when the holder is on another host (only its heartbeat tells)."""
    if host != socket.gethostname():
        return None
    return pid_alive(pid)


class Lease:
    def __init__(self, directory: Path, me: JobIdentity, ttl_s: float = 60.0):
        self.path, self.me, self.ttl_s = Path(directory) / LEASE, me, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.previous: dict | None = None  # the holder taken over, if any

    def _record(self) -> dict:
        return {**asdict(self.me), "heartbeat": time.time()}

    def _read(self) -> dict | None:
        try:
            held = json.loads(self.path.read_text())
            return held if isinstance(held, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: treated as a holder with no heartbeat (stale)

    def _write(self) -> None:
        tmp = self.path.with_name(f"{LEASE}.{self.me.token}")
        tmp.write_text(json.dumps(self._record()))
        os.replace(tmp, self.path)  # atomic: a reader sees the old lease or the new one

    def acquire(self) -> str:
        """Hold the lease or raise LeaseHeld. Returns how: "new", "restart" (same job) or "stale" (taken over)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._record()))
            how = "new"
        except FileExistsError:
            held = self._read()
            how = "new" if held is None else self._judge(held)
            self.previous = held
            self._write()
        # Two jobs taking over one stale lease at once: the last rename wins; the other sees it here.
        if (self._read() or {}).get("token") != self.me.token:
            raise LeaseHeld(self._held_line(self._read() or {}, "took it over at the same moment"))
        self._start_heartbeat()
        return how

    def _judge(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0) or 0)
        if held.get("job") == self.me.job:  # a launcher's id again (a restart), or this very process
            return "restart"
        try:
            alive = _alive_here(str(held.get("host")), int(held.get("pid", -1)))
        except (TypeError, ValueError):
            alive = None
        if age > self.ttl_s or alive is False:
            return "stale"
        raise LeaseHeld(self._held_line(held, f"last heartbeat {age:.0f} s ago"))

    def _held_line(self, held: dict, when: str) -> str:
        return (f"checkpoint directory {self.path.parent} is in use by job {held.get('job')!r} (host "
                f"{held.get('host')}, pid {held.get('pid')}, {when}); two jobs writing one directory destroy each "
                f"other's checkpoints: set fault.checkpoint.dir to another directory, or wait for that job to end "
                f"(its lease {self.path.name} is taken over {self.ttl_s:.0f} s after its last heartbeat; delete it "
                "only if you are sure the job is gone)")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if (self._read() or {}).get("token") == self.me.token:
                        self._write()
                except OSError as e:  # a stalled file server: the next beat tries again
                    log.warning("could not refresh the checkpoint lease %s: %s", self.path, e)
        self._thread = threading.Thread(target=beat, name="ckpt-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseHeld if another job holds the lease now (checked before every commit)."""
        held = self._read()
        if (held or {}).get("token") != self.me.token:
            raise LeaseHeld(f"this job lost its lease on {self.path.parent} to job {(held or {}).get('job')!r} "
                            f"(host {(held or {}).get('host')}); not committing into a directory another job "
                            "writes: set fault.checkpoint.dir to another directory")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self._read() or {}).get("token") == self.me.token:
            self.path.unlink(missing_ok=True)

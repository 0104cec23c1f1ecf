"""Checkpoints that survive crashes: sharded, verified, committed atomically, optionally written asynchronously.

Start with ``CheckpointManager``: the trainer calls ``due``/``save`` after optimizer steps, ``load`` once at start
and ``wait``/``close`` at the end.

Layout of ``<dir>`` (default ``<run_dir>/checkpoints``; it must be on a filesystem every rank sees)::

    step_000100/                 a committed checkpoint
        .metadata, __<r>_0.distcp    torch.distributed.checkpoint (DCP): model/optimizer tensors, sharded per rank
        rank00000.pt, ...            torch.save of each rank's own state (data position, RNG, scheduler, scaler)
        manifest.json                format tag, step, world_size, fingerprint, {file: {bytes, sha256}}
    .tmp-step_000110.<job>/      a save in progress, or one killed before its commit: never read; removed at start
                                 by the same job (or by the job that takes over its stale lease)
    step_000090.corrupt-<time>/  a checkpoint that failed verification, kept for post-mortems and never picked again
    .lease.json                  the job writing here (fault.lease): a second job refuses to share the directory

Why each decision:
- Atomic commit. All ranks write into ``.tmp-step_N`` (files fsynced, an engine's own files too), agree that every
  rank finished, and only then rank 0 writes the manifest, fsyncs it and renames the directory to ``step_N`` (a
  rename is atomic on POSIX) and fsyncs the parent. A ``step_N`` directory therefore always holds a complete
  checkpoint, whatever moment a process is killed at; ``load`` never has to guess whether a save finished.
- Failures while saving. A rank whose own write fails (a full disk) must not skip a collective the others are in:
  every rank writes its local state first and the ranks agree that all writes succeeded before the first collective
  of the save (DCP's); after DCP's write every rank reports its files or its error in one gather. Either way all
  ranks raise the same error naming the rank, and nothing is committed.
- Checksums in parallel. Each rank hashes the files it writes while writing them (the streams are sequential), so
  a 100 GB checkpoint is hashed by all ranks at once and never read back; rank 0 hashes only DCP's small
  ``.metadata`` and the files of an engine's own writer. The commit checks that every file another rank wrote is
  visible to rank 0 with its size: a checkpoint directory that is not on a shared file system is reported at the
  first save, not discovered at resume.
- Progress from inside. Writes and hashes report their bytes to the watchdog (fault.progress), so a slow save is
  progress and never trips the hang detector, while a stuck write is found within the hang timeout; an opaque call
  (an fsync, an engine's own writer) is marked and held to ``checkpoint_timeout_s`` instead.
- No code in checkpoints, nothing read from outside them (fault.safe_load has the threat and the checks): the
  per-rank files and every DCP bytes item are loaded with ``weights_only=True``, ``.metadata`` through an allow-list,
  every name confined to the directory, links refused. (The sha256 manifest does not help here: whoever writes the
  files writes the manifest.) DeepSpeed's files: its engine's ``native_check`` / ``weights_only`` load, or its own
  full unpickler with ``trust_pickle=true``.
- Verify before touching the model. ``load`` checks the whole tree against the manifest (every file listed, sizes,
  and with ``verify`` the sha256, hashed by all ranks at once, a fair share each, the wait sized by bytes), reads
  every bytes item and the per-rank files, and only then lets DCP copy tensors into the live state. A checkpoint
  that fails any check, or whose load still fails, is renamed aside (``*.corrupt-<time>``, kept for inspection) with
  a warning and a ``checkpoint_fallback`` event, and the next older one is used: a refused checkpoint never turns a
  restarting job into a loop.
- One writer per directory: rank 0 holds a lease (fault.lease); temporary directories carry the job's name, and
  pruning removes only checkpoints of this job's lineage (the jobs it resumed from) and fingerprint.
- Failed saves end cleanly: an I/O error or a full disk raises ``SaveFailed`` on every rank alike, nothing is
  committed, and the trainer records it and trains on (the next save tries again).
- Agreement. Rank 0 alone decides (probe, choice of checkpoint, commit) and broadcasts its decision or its error,
  so every rank resumes from the same step or raises the same ``CheckpointError``; no rank is left waiting.
- Async. ``dcp.async_save`` copies the tensors to host memory (the only time training is blocked) and writes them
  from a DCP thread; our commit thread then waits for the write and commits. Checkpoint collectives use a
  dedicated gloo group, so they never interleave with the training's collectives on the default group (and work
  when that group is NCCL). At most one save is in flight: the next ``save`` waits for it, and an error in the
  background is re-raised there (or at ``wait``).
- Never destroy data the user may need: a checkpoint of another configuration (fingerprint) is refused, never
  overwritten; ``resume=never`` refuses a dir that already holds checkpoints (saving there could later prune or
  collide with them), so starting fresh means a new ``dir``; pruning (keep the newest ``keep``) only removes
  checkpoints of this run's lineage and fingerprint; all checkpoints corrupt is an error, not a silent fresh start,
  also after they were renamed aside.
- ``mode=off`` does nothing at all (no directory, no collectives, ``load`` returns None).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fault import safe_load
from fault.checkpoint_io import (  # noqa: F401 (file_sha256, SaveIO, _HashingStream: for tests and tools)
    SaveIO,
    _fsync_dir,
    _fsync_tree,
    _HashingStream,
    _write_file,
    _Writer,
    file_sha256,
    hash_confined,
)
from fault.events import EventLog
from fault.lease import JobIdentity, Lease, LeaseHeld, job_identity, job_tag
from fault.progress import Progress
from fault.safe_load import MANIFEST, Refused

log = logging.getLogger(__name__)
# DCP warns on every save/load without a process group, even when no_dist=True says that is the intent; one
# process is a supported set-up here, so the warning would only bury the log.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)

FORMAT = "chuanliu-checkpoint/1"
MODES = ("off", "sync", "async")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FRESH = "to start fresh, set fault.checkpoint.dir to a new directory (the existing checkpoints are kept)"


class CheckpointError(ValueError):
    """Bad input (configuration, directory, checkpoint): the message says what is wrong and what to do."""


class SaveFailed(CheckpointError, RuntimeError):
    """A save that committed nothing (a full disk, an I/O error, a rank's failed write), raised on every rank alike;
    the last committed checkpoint is intact and the next save tries again. ``step``: the save's step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclass(kw_only=True)
class CheckpointConfig:
    mode: str = "off"  # off | sync | async (training continues while the checkpoint is written)
    every: int = 10  # save after every `every` optimizer steps, and after the last step
    keep: int = 3  # newest committed checkpoints kept (of this run's fingerprint)
    dir: str | None = None  # None: <run_dir>/checkpoints
    resume: str = "auto"  # auto: newest valid checkpoint in dir, else fresh | never | a checkpoint(s) dir path
    verify: bool = True  # check the sha256 of every file at load (sizes are always checked)
    verify_min_mb_s: float = 50.0  # slowest read+hash rate expected of a rank: sizes the wait for verification
    lease_s: float = 60.0  # a writer's lease on dir is stale this long after its last heartbeat
    trust_pickle: bool = False  # engine=deepspeed: read its files with DeepSpeed's full unpickler (trusted files)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CheckpointError(f"fault.checkpoint.mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.every < 1 or self.keep < 1:
            raise CheckpointError(f"fault.checkpoint.every ({self.every}) and keep ({self.keep}) must be >= 1")
        if not self.verify_min_mb_s > 0 or not self.lease_s > 0:
            raise CheckpointError(f"fault.checkpoint.verify_min_mb_s ({self.verify_min_mb_s}) and lease_s "
                                  f"({self.lease_s}) must be > 0")
        if not self.resume:
            raise CheckpointError("fault.checkpoint.resume is empty; use auto, never or a checkpoint path")
        if self.mode == "off" and self.resume not in ("auto", "never"):
            # "off" does nothing at all, so a named checkpoint would be silently ignored.
            raise CheckpointError(f"fault.checkpoint.resume={self.resume} needs fault.checkpoint.mode=sync or async")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass
class Loaded:
    step: int
    path: Path
    per_rank: dict  # this rank's per_rank dict as saved
    sharded: dict  # the DCP state, loaded in place


def rng_state() -> dict:
    """Every generator a training step may draw from: python, numpy, torch CPU and all CUDA devices, as tensors and
    plain types only, so that the file loads with ``weights_only=True``."""
    key, mt, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"key": str(key), "state": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def newest_committed(ckpt_dir: Path) -> list[Path]:
    """Committed ``step_*`` directories, newest first (temporary and corrupt ones have other names)."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m[1]), p) for p in Path(ckpt_dir).iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


_OTHER_RANK = "(another rank's write failed)"


def inspect_checkpoint(path: Path, native_check: Callable[[Path], None] | None = None) -> tuple[dict, dict]:
    """Every check of a committed checkpoint that needs no hashing (fault.safe_load): the manifest, the tree against
    it, ``.metadata`` against the files, every bytes item read safely, an engine's own check. Returns the manifest
    and the files' sizes; raises Refused (one line: what is wrong)."""
    try:
        manifest = json.loads(safe_load.read_manifest(path))
        keys = ("format", "step", "world_size", "fingerprint", "files")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not all(k in manifest for k in keys):
            raise Refused(f"{MANIFEST} is not a complete {FORMAT} manifest")
        sizes = safe_load.check_tree(path, manifest["files"])
        needed = [".metadata"] + [f"rank{r:05d}.pt" for r in range(manifest["world_size"])]
        if missing := [n for n in needed if n not in manifest["files"]]:
            raise Refused(f"{MANIFEST} lists no {', '.join(missing)}")
        metadata = safe_load.read_metadata(path)
        safe_load.check_metadata(metadata, sizes)
        safe_load.check_bytes_items(path, metadata)
        if native_check is not None:
            native_check(path)
    except FileNotFoundError as e:
        raise Refused(f"{Path(e.filename or MANIFEST).name} is missing") from None
    except Refused:
        raise
    except (OSError, ValueError) as e:  # ValueError: unreadable JSON, an engine's refusal
        raise Refused(str(e) if isinstance(e, ValueError) else f"{e.strerror or e}") from None
    except (KeyError, TypeError, AttributeError) as e:  # a manifest with the right keys but wrong shapes
        raise Refused(f"{MANIFEST} is malformed ({e!r})") from None
    return manifest, sizes


def verify_checkpoint(path: Path, progress: Progress | None = None) -> dict:
    """``inspect_checkpoint`` and every file's sha256, in this process (for tools that read one checkpoint:
    experiments.quality). Returns the manifest; raises Refused."""
    manifest, _ = inspect_checkpoint(path)
    for name, info in manifest["files"].items():
        if hash_confined(path, name, progress) != info["sha256"]:
            raise Refused(f"{name} fails its sha256 check")
    return manifest


def load_per_rank(path: Path) -> dict:
    """A rank's own state (data position, RNG, schedule, scaler): tensors and plain types only, loaded with
    ``weights_only=True`` from a plain file of the checkpoint, so a shared checkpoint cannot run code when it is
    resumed. Refused (fault.safe_load.Refused) otherwise."""
    try:
        with safe_load.open_confined(path.parent, path.name) as f:
            return torch.load(f, weights_only=True)
    except OSError as e:
        raise Refused(f"{path.name} cannot be read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 (UnpicklingError, or torch's RuntimeError on a malformed archive)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Refused(f"refusing to load {path.name}: it holds objects beyond tensors and plain types, and "
                      f"unpickling them could run code, or it is malformed ({first[:200]}); a chuanliu checkpoint "
                      f"never does, so this file was written by something else or tampered with: "
                      f"{safe_load.TRUST}") from None


def fair_shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Files split over n ranks so that the most any rank hashes is small: largest first, each to the rank with
    the fewest bytes so far (LPT; within 4/3 of the best split). The same on every rank (sorted, no randomness)."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = load.index(min(load))
        shares[r].append(name)
        load[r] += sizes[name]
    return shares


# Errors rank 0 hands to every rank by class (``_agree``), so that each rank handles them alike.
_AGREED_ERRORS = (LeaseHeld, SaveFailed, CheckpointError)


def _dcp_failure(e: CheckpointException) -> str:
    """DCP's CheckpointException in one line: the first failing rank and its error."""
    failures = getattr(e, "failures", {}) or {}
    if not failures:
        return f"CheckpointException: {str(e).splitlines()[0][:300] if str(e) else ''}"
    rank, (exc, _) = next(iter(sorted(failures.items())))
    return f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _not_shared(directory: Path, host: str, n: int, example: str) -> str:
    return (f"checkpoint directory {directory} is not shared between the ranks: rank 0 on {host} cannot see {n} "
            f"file(s) other ranks wrote (e.g. {example}). Put the run directory, or fault.checkpoint.dir, on a file "
            "system every node mounts (NFS, Lustre, GPFS, a cloud bucket's POSIX mount); otherwise a resume finds "
            "half a checkpoint")


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, *, run_dir: Path, rank: int, world_size: int,
                 fingerprint: dict, events: EventLog | None = None, progress: Progress | None = None,
                 dp_of_rank: list[int] | None = None, job: str | None = None):
        """dp_of_rank: every rank's data-parallel coordinate (tensor and pipeline ranks of one replica share it);
        None: every rank its own. A checkpoint's per-rank state (data position, RNG) is read from a rank with the
        same coordinate, so a job may resume under another tp x pp layout as long as dp is the same. job: this
        job's identity (None: the launcher's job id, else rank 0's host-pid-start; fault.lease)."""
        self.cfg, self.rank, self.world_size, self.events, self.progress = cfg, rank, world_size, events, progress
        self.dp_of_rank = list(dp_of_rank) if dp_of_rank is not None else list(range(world_size))
        self._host = socket.gethostname()
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back from JSON
        self._distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self._group = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lease: Lease | None = None
        if not cfg.enabled:
            return
        if self._distributed:
            # Collective: every rank builds it, in the same order. The description names it in torch's flight
            # recorder, so the watchdog can tell a stuck save from a stuck training step.
            self._group = dist.new_group(backend="gloo", group_desc="checkpoint")
        if cfg.mode == "async":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        self.job: JobIdentity = self._agree(lambda: job_identity(job))  # rank 0's is the job's
        self.lineage = [self.job.job]  # the jobs whose checkpoints this one may prune: itself and its ancestors
        try:
            # The broadcast doubles as the barrier: no rank goes on before rank 0 has prepared the directory.
            self._agree(self._prepare)
            if self._distributed:
                self._check_shared()
        except BaseException:
            self._give_back()  # a job refused at start leaves the directory as it found it
            raise

    # ---- start-up -------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        d = self.dir
        if d.exists() and not d.is_dir():
            raise CheckpointError(f"cannot write checkpoints to {d} (it exists and is not a directory); "
                                  "set fault.checkpoint.dir to a writable directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{os.getpid()}"
            probe.write_bytes(b"probe")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {d} ({e.strerror or e}); "
                                  "set fault.checkpoint.dir to a writable directory") from e
        self._lease = Lease(d, self.job, self.cfg.lease_s)
        how = self._lease.acquire()  # LeaseHeld: another live job writes here
        gone = self._lease.previous if how == "stale" else None
        if gone is not None:
            log.warning("checkpoint directory %s: took over the lease of job %r (host %s, pid %s), which is gone",
                        d, gone.get("job"), gone.get("host"), gone.get("pid"))
            if self.events is not None:
                self.events.emit("checkpoint_lease_takeover", dir=str(d), previous=gone)
        # Only this job's leftovers, and those of a job whose stale lease it took over: another live job's save in
        # progress is never removed. Untagged names come from chuanliu before leases (no job wrote them since).
        tags = {self.job.tag} | ({job_tag(str(gone.get("job")))} if gone else set())
        for stale in sorted(d.glob(".tmp-step_*")):
            tag = stale.name.partition(".")[2].partition(".")[2]  # .tmp-step_000010.<tag>
            if tag in tags or not tag:
                log.warning("removing %s: a checkpoint save that was killed before it finished", stale)
                shutil.rmtree(stale, ignore_errors=True)
        for stale in sorted(d.glob(".trash-*")):  # a prune killed mid-delete: its owner had already decided
            shutil.rmtree(stale, ignore_errors=True)
        if self.cfg.resume == "never" and newest_committed(d):
            # Saving next to them could later prune them or collide with their names: refuse instead.
            raise CheckpointError(f"fault.checkpoint.resume=never but {d} already holds checkpoints "
                                  f"({newest_committed(d)[0].name}, ...) that this run must not overwrite; "
                                  "set fault.checkpoint.dir to a new directory, or resume=auto to continue from them")

    def _check_shared(self) -> None:
        """Every rank writes a probe file; rank 0 must see them all. A directory that is not on a shared file system
        (each node writing its own copy) is found here, before any training, instead of at resume."""
        probe = self.dir / f".probe-rank{self.rank:05d}-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"probe")
            name = probe.name
        except OSError as e:
            name = None
            self._agree_ok(f"cannot write {probe} ({e.strerror or e})", "checking the checkpoint directory", 0)
        names = self._gather((name, self._host))

        def check() -> None:
            unseen = [(r, host) for r, (n, host) in enumerate(names) if n is None or not (self.dir / n).exists()]
            if unseen:
                raise CheckpointError(_not_shared(self.dir, self._host, len(unseen), f"the probe of rank "
                                                  f"{unseen[0][0]} on {unseen[0][1]}"))
        try:
            self._agree(check)
        finally:
            probe.unlink(missing_ok=True)

    # ---- collectives (all on the dedicated group; no-ops in one process) ----------------------------------
    def _agree(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 and give every rank its result, or make every rank raise its error."""
        box: list[Any] = [None, None, None]  # result, error message, the error's class (of _AGREED_ERRORS)
        error: BaseException | None = None
        if self.rank == 0:
            try:
                box[0] = fn()
            except Exception as e:  # noqa: BLE001 (any error: the other ranks must hear of it, or they wait forever)
                error, box[1] = e, str(e)
                box[2] = next((c.__name__ for c in _AGREED_ERRORS if isinstance(e, c)), "RuntimeError")
        if self._distributed:
            dist.broadcast_object_list(box, src=0, group=self._group)
        if error is not None:
            raise error
        if box[1] is not None:
            raise {c.__name__: c for c in _AGREED_ERRORS}.get(box[2], RuntimeError)(box[1])
        return box[0]

    def _gather(self, item: Any) -> list[Any]:
        """Every rank's item, on every rank (one all_gather_object on the dedicated group)."""
        if not self._distributed:
            return [item]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, item, group=self._group)
        return out

    def _agree_ok(self, error: str | None, what: str, step: int) -> None:
        """Every rank says whether its part succeeded; if any failed, every rank raises the same error."""
        reports = self._gather((error, self._host))
        failed = [(r, host, err) for r, (err, host) in enumerate(reports) if err is not None]
        if failed:
            raise SaveFailed(f"checkpoint step {step} was not committed: {what} failed on "
                                  + "; ".join(f"rank {r} ({host}): {err}" for r, host, err in failed)
                                  + ". Training state is unchanged; free the space or fix the directory, and the "
                                  "next save tries again (the last committed checkpoint is intact)", step)

    # ---- save -----------------------------------------------------------------------------------------------
    def due(self, step: int, total_steps: int) -> bool:
        return self.cfg.enabled and (step % self.cfg.every == 0 or step == total_steps)

    def save(self, step: int, *, sharded: dict, per_rank: dict,
             before_commit: Callable[[], None] | None = None,
             native: Callable[[Path], None] | None = None,
             throttle: Callable | None = None) -> float:
        """Save ``step``; returns the seconds training was blocked (async: waiting + staging only).

        ``native(dir)``: an engine's own checkpoint writer (DeepSpeed), run on every rank into the uncommitted
        directory before the DCP write, in the caller's thread even when async (it is collective and reads live
        state); its files are fsynced, verified and committed with the rest. ``throttle(nbytes)``: called before
        every chunk this rank writes (chaos' slow_io), with a function that reports the write as moving.

        Raises ``SaveFailed`` (on every rank alike) when this save, or the async save before it, committed
        nothing; a failed async save does not stop this one from being started first."""
        t0 = time.perf_counter()
        earlier: SaveFailed | None = None
        try:
            self.wait()  # one save in flight at most; this also re-raises a background failure
        except SaveFailed as e:
            earlier = e
        block_s = self._save(step, sharded, per_rank, before_commit, native, throttle, t0)
        if earlier is not None:
            raise earlier
        return block_s

    def _save(self, step, sharded, per_rank, before_commit, native, throttle, t0: float) -> float:
        tmp, final = self.dir / f".tmp-step_{step:06d}.{self.job.tag}", self.dir / f"step_{step:06d}"
        if final.exists():
            raise CheckpointError(f"checkpoint {final} already exists (from an earlier run); refusing to "
                                  f"overwrite it: set fault.checkpoint.dir to a new directory")
        save_io = SaveIO(tmp, self.progress, throttle)
        error = None
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            if native is not None:
                with save_io.opaque(f"checkpoint step {step}: the engine's own writer"):
                    native(tmp)
                    _fsync_tree(tmp)
            # Serialised now (the caller may change its objects as soon as we return) and checked to load with
            # weights_only=True: a state that could not be resumed safely is refused here, not at resume.
            buf = io.BytesIO()
            torch.save(per_rank, buf)
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            save_io.write_file(tmp / f"rank{self.rank:05d}.pt", buf.getvalue())
        except Exception as e:  # noqa: BLE001 (every local failure must reach the agreement below)
            error = f"{type(e).__name__}: {e}"
        # Before any collective of the save: a rank whose write failed must not skip DCP's collectives.
        self._agree_ok(error, "writing a rank's own state", step)
        writer = _Writer(tmp, save_io)
        no_dist = not self._distributed
        if self.cfg.mode == "async":
            # Staging (the host copy) happens inside async_save; the DCP thread writes that copy.
            try:
                upload = dcp.async_save(sharded, storage_writer=writer, process_group=self._group, no_dist=no_dist)
            except CheckpointException as e:  # a BaseException: raised on every rank alike
                raise SaveFailed(f"checkpoint step {step} was not committed: staging failed ({_dcp_failure(e)})",
                                 step) from None
            upload = getattr(upload, "upload_completion", upload)  # an AsyncSaveResponse with some stagers
            block_s = time.perf_counter() - t0
            self._pending = self._pool.submit(self._finish, step, tmp, final, save_io, upload.result,
                                              before_commit, t0, block_s)
            return block_s
        self._finish(step, tmp, final, save_io,
                     lambda: dcp.save(sharded, storage_writer=writer, process_group=self._group, no_dist=no_dist),
                     before_commit, t0, None)
        return time.perf_counter() - t0

    def _finish(self, step: int, tmp: Path, final: Path, save_io: SaveIO, write: Callable[[], Any],
                before_commit: Callable[[], None] | None, t0: float, block_s: float | None) -> None:
        """DCP's write (collective; it raises on every rank alike), this rank's fsync, then one gather of every
        rank's files or error, and the commit on rank 0."""
        error = None
        try:
            write()
            save_io.fsync_written()
            if before_commit is not None:
                before_commit()  # fault injection: may raise, or SIGKILL this process
        except CheckpointException as e:  # DCP's: raised on every rank, naming the ranks whose write failed
            own = e.failures.get(self.rank)
            error = _OTHER_RANK if own is None else f"{type(own[0]).__name__}: {own[0]}"
        except Exception as e:  # noqa: BLE001 (reported to every rank by the gather below, so that none hangs)
            error = f"{type(e).__name__}: {e}"
        reports = self._gather((error, self._host, save_io.written))
        failed = [(r, host, err) for r, (err, host, _) in enumerate(reports) if err not in (None, _OTHER_RANK)]
        if failed or any(err == _OTHER_RANK for err, _, _ in reports):
            raise SaveFailed(f"checkpoint step {step} was not committed: writing {tmp} failed on "
                             + "; ".join(f"rank {r} ({host}): {err}" for r, host, err in failed)
                             + "; the last committed checkpoint is intact and the next save tries again", step)
        self._agree(lambda: self._commit(step, tmp, final, reports, t0, block_s))

    def _commit(self, step: int, tmp: Path, final: Path, reports: list, t0: float, block_s: float | None) -> None:
        files: dict[str, dict] = {}
        unseen = []
        for r, (_, host, written) in enumerate(reports):
            for name, info in written.items():
                files[name] = info
                f = tmp / name
                if not f.is_file() or f.stat().st_size != info["bytes"]:
                    unseen.append((name, r, host))
        if unseen:
            name, r, host = unseen[0]
            raise CheckpointError(_not_shared(self.dir, self._host, len(unseen), f"{name} from rank {r} on {host}")
                                  + ". Nothing was committed")
        self._lease.check()  # a job that lost its lease never commits into another job's directory
        try:
            save_io = SaveIO(tmp, self.progress, None)
            for p in sorted(tmp.rglob("*")):  # files no rank claimed: DCP's .metadata (if untracked), DeepSpeed's
                name = str(p.relative_to(tmp))
                if p.is_file() and name not in files:
                    files[name] = {"bytes": p.stat().st_size, "sha256": save_io.sha256(p)}
            manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                        "dp_of_rank": self.dp_of_rank, "fingerprint": self.fingerprint, "time": time.time(),
                        "torch": torch.__version__, "job": self.job.job, "lineage": self.lineage[-100:],
                        "files": dict(sorted(files.items()))}
            _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            os.rename(tmp, final)  # the commit: step_N appears complete, or not at all
            _fsync_dir(self.dir)
        except OSError as e:  # a full disk at the manifest: nothing committed, the tmp dir is removed next start
            raise SaveFailed(f"checkpoint step {step} was not committed: the commit on rank 0 failed "
                             f"({e.strerror or e}); the last committed checkpoint is intact and the next save "
                             "tries again", step) from None
        write_s = time.perf_counter() - t0
        nbytes = sum(f["bytes"] for f in files.values())
        log.info("checkpoint step %d committed to %s (%.1f MB, %.2f s)", step, final, nbytes / 1e6, write_s)
        if self.events is not None:
            self.events.emit("checkpoint_commit", durable=True, step=step, path=str(final),
                             block_s=write_s if block_s is None else block_s, write_s=write_s, bytes=nbytes)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints of this job's lineage and fingerprint; never touch another job's."""
        def ours(p: Path) -> bool:
            m = self._manifest_of(p)
            return m.get("fingerprint") == self.fingerprint and m.get("job") in self.lineage
        for old in [p for p in newest_committed(self.dir) if ours(p)][self.cfg.keep:]:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)  # disappears atomically; a kill mid-delete leaves only trash, removed at start
            shutil.rmtree(trash)

    @staticmethod
    def _manifest_of(path: Path) -> dict:
        try:
            m = json.loads(safe_load.read_manifest(path))
            return m if isinstance(m, dict) else {}
        except (OSError, ValueError):
            return {}

    def wait(self) -> None:
        """Block until the in-flight async save (if any) has committed; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._give_back()

    def _give_back(self) -> None:
        """Rank 0: remove this job's failed saves' leftovers and release the lease (no save is in flight)."""
        if self._lease is None:
            return
        for tmp in self.dir.glob(f".tmp-step_*.{self.job.tag}"):
            shutil.rmtree(tmp, ignore_errors=True)
        self._lease.release()
        self._lease = None

    # ---- load -----------------------------------------------------------------------------------------------
    def load(self, sharded: dict | Callable[[], dict], native: Callable[[Path], None] | None = None,
             native_check: Callable[[Path], None] | None = None) -> Loaded | None:
        """Load the checkpoint ``cfg.resume`` names into ``sharded`` (in place); None: start fresh.

        Every check runs before anything is copied into ``sharded`` (fault.safe_load); a checkpoint that fails
        one, or whose load still fails, is set aside and the next older one tried (``resume=auto`` or a checkpoints
        dir; a checkpoint named alone is refused instead). ``sharded`` may be a function that makes the state
        dict, called only once a checkpoint has passed: an engine's state dict of a fresh optimizer is not free
        (torch's get_state_dict initialises an empty AdamW state by stepping it with zero gradients, which would
        put its step count one ahead for the whole run). ``native(dir)``: an engine's own checkpoint reader
        (DeepSpeed), called on every rank after the DCP load; ``native_check(dir)``: its check that the files are
        safe to read (ValueError if not), run with the other checks."""
        if not self.cfg.enabled or self.cfg.resume == "never":
            return None
        candidates, fallback = self._agree(self._candidates)
        skipped: list[tuple[Path, str]] = []
        state: dict | None = None
        for path in map(Path, candidates):
            reason, manifest, per_rank = self._verify_everywhere(path, native_check)
            if reason is None:
                state = state if state is not None else (sharded() if callable(sharded) else sharded)
                # A load that fails after verification may have copied some tensors: the next candidate's load
                # overwrites every entry (DCP loads the whole state dict), and without one the job stops below.
                reason = self._load_into(path, state, manifest, native)
            if reason is None:
                self._agree(lambda used=path: self._report_fallbacks(skipped, used=used))
                ancestors = [j for j in manifest.get("lineage", [manifest.get("job")]) if j]
                self.lineage = list(dict.fromkeys([*ancestors, self.job.job]))  # a restart is not a new ancestor
                return Loaded(step=int(manifest["step"]), path=path, per_rank=per_rank, sharded=state)
            self._agree(lambda p=path, why=reason: self._set_aside(p, why, fallback))
            skipped.append((path, reason))
        self._agree(lambda: self._report_fallbacks(skipped, used=None))
        if skipped:
            raise CheckpointError(f"all {len(skipped)} committed checkpoints in {self.dir} are corrupt or refused "
                                  "(renamed to *.corrupt-*); not starting fresh silently, which would lose the run's "
                                  f"progress: {_FRESH}")
        return None

    def _candidates(self) -> tuple[list[str], bool]:
        """Checkpoints to try, newest first, and whether falling back to an older one is allowed."""
        if self.cfg.resume == "auto":
            found = newest_committed(self.dir)
            if not found and (aside := sorted(self.dir.glob("step_*.corrupt-*"))):
                # Every checkpoint was set aside by an earlier start: a restart must not begin again from step 0.
                raise CheckpointError(f"every checkpoint in {self.dir} was set aside as corrupt or refused "
                                      f"({', '.join(p.name for p in aside[-3:])}); not starting fresh silently, "
                                      f"which would lose the run's progress: {_FRESH}")
            return [str(p) for p in found], True
        p = Path(self.cfg.resume).expanduser().resolve()  # a link the user names (latest -> step_N) is theirs
        if (p / MANIFEST).is_file():
            return [str(p)], False  # the user named this one: no silent fallback
        if newest_committed(p):
            return [str(q) for q in newest_committed(p)], True
        what = "does not exist" if not p.exists() else "is not a checkpoint"
        raise CheckpointError(f"fault.checkpoint.resume={p} {what}: expected a directory holding {MANIFEST} "
                              "(one checkpoint) or step_* directories (a checkpoints dir); or use auto or never")

    def _verify_everywhere(self, path: Path, native_check) -> tuple[str | None, dict | None, dict | None]:
        """Rank 0 checks the tree and ``.metadata`` and hands out the hashing; every rank hashes its share and reads
        its per-rank file; all agree. Returns (why it is refused or None, the manifest, this rank's per-rank state).
        A checkpoint of another configuration raises CheckpointError (never a fallback)."""
        verdict = self._agree(lambda: self._inspect(path, native_check))
        if isinstance(verdict, str):
            return verdict, None, None
        manifest, shares = verdict
        error, per_rank = None, None
        try:
            for name in shares[self.rank]:
                if hash_confined(path, name, self.progress) != manifest["files"][name]["sha256"]:
                    raise Refused(f"{name} fails its sha256 check")
            per_rank = load_per_rank(path / f"rank{self._source_rank(manifest):05d}.pt")
            if not isinstance(per_rank, dict):
                raise Refused("a per-rank file does not hold a dict")
        except Exception as e:  # noqa: BLE001 (a tampered manifest can fail anywhere; every rank must reach the wait)
            error = str(e) if isinstance(e, Refused) else f"{type(e).__name__}: {str(e)[:300]}"
        self._wait_for_verification(path, manifest, shares)
        errors = [(r, e) for r, e in enumerate(self._gather(error)) if e is not None]
        if not errors:
            return None, manifest, per_rank
        r, why = errors[0]
        return (f"{why} (seen by rank {r})" if self._distributed else why), manifest, per_rank

    def _inspect(self, path: Path, native_check) -> str | tuple[dict, list[list[str]]]:
        """Rank 0's checks that need no hashing; the reason as a string if refused, else the manifest and every
        rank's share of the files to hash."""
        try:
            manifest, sizes = inspect_checkpoint(path, native_check)
        except Refused as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 (whatever a crafted file trips over is a refusal, not a crash)
            return f"{type(e).__name__}: {str(e)[:300]}"
        self._check_compatible(path, manifest)
        files = {n: sizes[n] for n in manifest["files"]} if self.cfg.verify else {}
        return manifest, fair_shares(files, self.world_size)

    def _wait_for_verification(self, path: Path, manifest: dict, shares: list[list[str]]) -> None:
        """Wait for every rank's hashing, as long as its bytes take at ``verify_min_mb_s`` (not the group's fixed
        timeout): a rank that is stuck is named, a large checkpoint is not cut short."""
        if not self._distributed:
            return
        most = max(sum(manifest["files"][n]["bytes"] for n in share) for share in shares)
        timeout = 60.0 + most / (self.cfg.verify_min_mb_s * 1e6)
        try:
            dist.monitored_barrier(group=self._group, timeout=timedelta(seconds=timeout), wait_all_ranks=True)
        except RuntimeError as e:
            raise CheckpointError(f"verifying {path} did not finish within {timeout:.0f} s ({most / 1e9:.1f} GB on "
                                  f"the busiest rank at fault.checkpoint.verify_min_mb_s={self.cfg.verify_min_mb_s}):"
                                  f" {str(e).splitlines()[0][:300]}; lower verify_min_mb_s if the storage is that "
                                  "slow") from None

    def _load_into(self, path: Path, state: dict, manifest: dict, native) -> str | None:
        """DCP's load (and the engine's own) of a verified checkpoint; why it failed (the same on every rank)."""
        error = None
        try:
            safe_load.load(state, path, verified=safe_load.listed_sizes(manifest), process_group=self._group,
                           no_dist=not self._distributed)
            if native is not None:
                native(path)
        except CheckpointException as e:  # a BaseException, raised by DCP on every rank alike
            error = _dcp_failure(e)
        except Exception as e:  # noqa: BLE001 (an engine's reader may fail on one rank only: the gather must see it)
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        errors = [(r, e) for r, e in enumerate(self._gather(error)) if e is not None]
        return f"loading failed on rank {errors[0][0]}: {errors[0][1]}" if errors else None

    def _set_aside(self, path: Path, reason: str, fallback: bool) -> None:
        if not fallback:
            raise CheckpointError(f"checkpoint {path} is refused ({reason}); name another checkpoint in "
                                  "fault.checkpoint.resume, or its checkpoints dir to fall back")
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.rename(path, aside)  # never picked again, never overwritten, kept for inspection
        log.warning("checkpoint %s refused (%s): renamed it to %s, falling back to an older one", path, reason,
                    aside.name)

    def _report_fallbacks(self, skipped: list[tuple[Path, str]], used: Path | None) -> None:
        for path, reason in skipped:
            if self.events is not None:
                self.events.emit("checkpoint_fallback", skipped=str(path), reason=reason,
                                 used=None if used is None else str(used))
        if skipped and used is not None:
            log.warning("resuming from %s after skipping %d corrupt or refused checkpoint(s)", used, len(skipped))

    @staticmethod
    def _old_dp(manifest: dict) -> list[int]:
        return manifest.get("dp_of_rank") or list(range(manifest["world_size"]))  # older manifests: pure dp

    def _source_rank(self, manifest: dict) -> int:
        """The writer rank whose per-rank state this rank takes: the first with this rank's dp coordinate."""
        return self._old_dp(manifest).index(self.dp_of_rank[self.rank])

    def _check_compatible(self, path: Path, manifest: dict) -> None:
        old_dp, new_dp = len(set(self._old_dp(manifest))), len(set(self.dp_of_rank))
        if old_dp != new_dp:
            raise CheckpointError(
                f"checkpoint {path} was written with {old_dp} data-parallel replicas ({manifest['world_size']} "
                f"ranks), this job has {new_dp} ({self.world_size} ranks): each replica's data position and RNG "
                f"cannot be mapped onto another data-parallel size; resume with dp={old_dp} (world = {old_dp} x "
                f"parallel.tp x parallel.pp; tp and pp may change), train with data.shard=rows (one global data "
                f"stream: resumable under any dp at the same global batch), or {_FRESH}")
        old, new = _flatten(manifest["fingerprint"]), _flatten(self.fingerprint)
        diff = [f"{k}: checkpoint {old.get(k)!r}, this run {new.get(k)!r}"
                for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        if diff:
            raise CheckpointError(f"checkpoint {path} was written with another configuration ({'; '.join(diff)}); "
                                  f"restore those settings to resume, or {_FRESH} (resume=never alone refuses a "
                                  "dir that holds checkpoints)")


# ---- what the training loop holds ------------------------------------------------------------------------------
class Stateful(Protocol):
    """torch.distributed.checkpoint.stateful.Stateful's shape: a part of the job that saves and restores itself."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


@dataclass
class FnState:
    """A Stateful made of two functions (an engine's ``local_state`` / ``load_local_state``)."""
    get: Callable[[], dict]
    set: Callable[[dict], None]

    def state_dict(self) -> dict:
        return self.get()

    def load_state_dict(self, state_dict: dict) -> None:
        self.set(state_dict)


class NativeFormat(Protocol):
    """An engine's own checkpoint format (DeepSpeed's), written and read inside the directory the manager verifies
    and commits."""

    def native_save(self, path: Path) -> None: ...

    def native_load(self, path: Path, trust_pickle: bool = False) -> None: ...

    def native_check(self, path: Path) -> None: ...


@dataclass
class CheckpointParts:
    """What a checkpoint holds, as torchtitan's checkpointer takes it: the sharded state (model and optimizer,
    through DCP), each rank's own Stateful parts by name (``rank<N>.pt``: data position, an engine's schedule and
    scaler), an engine's own format, and what must run once everything is back (an engine's priming step). The
    random generators are always saved, and restored last, after anything that may draw from them."""
    sharded: Callable[[], dict]  # the DCP state, made when needed (a fresh optimizer's state dict is not free)
    load_sharded: Callable[[dict], None]  # put a loaded DCP state back into the model and optimizer
    local: dict[str, Stateful]
    native: NativeFormat | None = None
    trust_pickle: bool = False  # the native format read with its own full unpickler (fault.checkpoint.trust_pickle)
    after_load: Callable[[], None] | None = None


class Checkpointer:
    """The training loop's checkpointing: ``load()`` once at start, ``save(step)`` after every optimizer step (it
    saves when due), ``wait()``/``close()`` at the end. The per-rank keys of a save and a resume live here only."""

    def __init__(self, manager: CheckpointManager, parts: CheckpointParts):
        self.manager, self.parts = manager, parts

    def load(self) -> Loaded | None:
        """Resume from the checkpoint the config names (None: start fresh); every part put back."""
        p = self.parts
        native = None if p.native is None else functools.partial(p.native.native_load, trust_pickle=p.trust_pickle)
        check = None if p.native is None or p.trust_pickle else p.native.native_check
        loaded = self.manager.load(p.sharded, native=native, native_check=check)
        if loaded is None:
            return None
        p.load_sharded(loaded.sharded)
        for name, part in p.local.items():
            part.load_state_dict(loaded.per_rank[name])
        if p.after_load is not None:
            p.after_load()
        set_rng_state(loaded.per_rank["rng"])
        return loaded

    def save(self, step: int, total_steps: int, *, before_commit: Callable[[], None] | None = None,
             throttle: Callable | None = None) -> float | None:
        """Save ``step`` when due (None otherwise); the seconds training was blocked. Raises SaveFailed."""
        if not self.manager.due(step, total_steps):
            return None
        p = self.parts
        per_rank = {"step": step, **{name: part.state_dict() for name, part in p.local.items()}, "rng": rng_state()}
        return self.manager.save(step, sharded=p.sharded(), per_rank=per_rank, before_commit=before_commit,
                                 native=None if p.native is None else p.native.native_save, throttle=throttle)

    def due(self, step: int, total_steps: int) -> bool:
        return self.manager.due(step, total_steps)

    def wait(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()

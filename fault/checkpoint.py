"""Checkpoints that survive crashes: sharded, verified, committed atomically, optionally written asynchronously.

Start with ``CheckpointManager``: the trainer calls ``due``/``save`` after optimizer steps, ``load`` once at start
and ``wait``/``close`` at the end.

Layout of ``<dir>`` (default ``<run_dir>/checkpoints``; it must be on a filesystem every rank sees)::

    step_000100/                 a committed checkpoint
        .metadata, __<r>_0.distcp    torch.distributed.checkpoint (DCP): model/optimizer tensors, sharded per rank
        rank00000.pt, ...            torch.save of each rank's own state (data position, RNG, scheduler, scaler)
        manifest.json                format tag, step, world_size, fingerprint, {file: {bytes, sha256}}
    .tmp-step_000110/            a save in progress, or one killed before its commit: never read, removed at start
    step_000090.corrupt-<time>/  a checkpoint that failed verification, kept for post-mortems and never picked again

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
- No code in checkpoints. Loading never unpickles arbitrary objects: the per-rank files hold tensors and plain
  types and are loaded with ``weights_only=True``, and DCP's ``.metadata`` is unpickled with an allow-list of DCP's
  own metadata classes; anything else is refused. (The sha256 manifest does not help here: whoever writes the files
  writes the manifest.) DeepSpeed's own checkpoint files are read by DeepSpeed, which unpickles them fully.
- Verification. Disks, networks and chaos drills still corrupt committed files, so ``load`` checks the manifest,
  the file sizes and (``verify``) their sha256, and falls back to the next older checkpoint with a warning and a
  ``checkpoint_fallback`` event. A corrupt checkpoint is renamed aside, not deleted: the data stays for inspection.
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
  checkpoints written with this run's fingerprint; all checkpoints corrupt is an error, not a silent fresh start.
- ``mode=off`` does nothing at all (no directory, no collectives, ``load`` returns None).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import StorageMeta

from fault.events import EventLog
from fault.progress import Progress

log = logging.getLogger(__name__)
# DCP warns on every save/load without a process group, even when no_dist=True says that is the intent; one
# process is a supported set-up here, so the warning would only bury the log.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)

FORMAT = "chuanliu-checkpoint/1"
MANIFEST = "manifest.json"
MODES = ("off", "sync", "async")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FRESH = "to start fresh, set fault.checkpoint.dir to a new directory (the existing checkpoints are kept)"


class CheckpointError(ValueError):
    """Bad input (configuration, directory, checkpoint): the message says what is wrong and what to do."""


class _Corrupt(Exception):
    """A checkpoint directory that fails verification; the message is the reason."""


@dataclass(kw_only=True)
class CheckpointConfig:
    mode: str = "off"  # off | sync | async (training continues while the checkpoint is written)
    every: int = 10  # save after every `every` optimizer steps, and after the last step
    keep: int = 3  # newest committed checkpoints kept (of this run's fingerprint)
    dir: str | None = None  # None: <run_dir>/checkpoints
    resume: str = "auto"  # auto: newest valid checkpoint in dir, else fresh | never | a checkpoint(s) dir path
    verify: bool = True  # check the sha256 of every file at load (sizes are always checked)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CheckpointError(f"fault.checkpoint.mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.every < 1 or self.keep < 1:
            raise CheckpointError(f"fault.checkpoint.every ({self.every}) and keep ({self.keep}) must be >= 1")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def file_sha256(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, read in chunks; ``on_chunk(nbytes)`` after each (a save reports its progress)."""
    if on_chunk is None:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            on_chunk(len(chunk))
    return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


CHUNK = 1 << 20  # bytes per write and per progress report
_OTHER_RANK = "(another rank's write failed)"


class SaveIO:
    """The I/O of one save as the watchdog and chaos see it: every chunk written or hashed is reported as progress
    (``Progress.io``), passes through an optional throttle (chaos' ``slow_io``), and every file this rank writes is
    hashed as it is written. ``written`` maps file names (relative to the checkpoint directory) to bytes and
    sha256."""

    def __init__(self, root: Path, progress: Progress | None, throttle: Callable | None):
        self.root, self.progress, self.throttle = root, progress, throttle
        self.written: dict[str, dict] = {}

    def report(self, nbytes: int, what: str) -> None:
        if self.progress is not None:
            self.progress.io(nbytes, what)

    @contextlib.contextmanager
    def opaque(self, what: str):
        with self.progress.opaque(what) if self.progress is not None else contextlib.nullcontext():
            yield

    def write_file(self, path: Path, data: bytes) -> None:
        with self.open(path) as f:
            f.write(data)

    @contextlib.contextmanager
    def open(self, path: Path):
        with open(path, "wb") as raw:
            stream = _HashingStream(raw, self, str(Path(path).relative_to(self.root)))
            yield stream
            stream.finish()

    def fsync_written(self) -> None:
        """Flush what this rank wrote (files, then their directories) before the ranks agree the save is done."""
        with self.opaque(f"fsync of {len(self.written)} file(s)"):
            for name in self.written:
                _fsync_path(self.root / name)
            for d in {(self.root / n).parent for n in self.written}:
                _fsync_dir(d)

    def sha256(self, path: Path) -> str:
        return file_sha256(path, lambda n: self.report(n, f"sha256 {path.name}"))


class _HashingStream(io.RawIOBase):
    """A write-only file for DCP and torch.save: writes in chunks, throttled, reported, hashed on the way. Both
    writers write sequentially (torch's zip writer checks it); a seek marks the running hash invalid and the file is
    hashed again from disk when it closes."""

    def __init__(self, raw, owner: SaveIO, name: str):
        super().__init__()
        self.raw, self.owner, self.name = raw, owner, name
        self.hash, self.nbytes, self.sequential = hashlib.sha256(), 0, True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), CHUNK):
            chunk = view[i:i + CHUNK]
            if self.owner.throttle is not None:
                self.owner.throttle(len(chunk), lambda: self.owner.report(0, f"writing {self.name} (slow)"))
            self.raw.write(chunk)
            self.hash.update(chunk)
            self.nbytes += len(chunk)
            self.owner.report(len(chunk), f"writing {self.name}")
        return len(view)

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.sequential = False
        return self.raw.seek(offset, whence)

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:  # DCP closes its transform wrappers; the file closes when its context ends
        pass

    def finish(self) -> None:
        self.raw.flush()
        path = self.owner.root / self.name
        digest = self.hash.hexdigest() if self.sequential else self.owner.sha256(path)
        self.owner.written[self.name] = {"bytes": path.stat().st_size, "sha256": digest}


class _SaveFS(FileSystem):
    """DCP's file system with every file this rank writes going through SaveIO."""

    def __init__(self, save_io: SaveIO):
        super().__init__()
        self.save_io = save_io

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.save_io.open(Path(path)) as stream:
            yield stream

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name, then renames it
        super().rename(path, new_path)
        io_ = self.save_io
        old = str(Path(path).relative_to(io_.root))
        if old in io_.written:
            io_.written[str(Path(new_path).relative_to(io_.root))] = io_.written.pop(old)


class _Writer(dcp.FileSystemWriter):
    def __init__(self, path: Path, save_io: SaveIO):
        super().__init__(path, sync_files=False)  # SaveIO.fsync_written syncs, reported as an opaque call
        self.fs = _SaveFS(save_io)


# What DCP's .metadata may reference: its own metadata classes, torch sizes, dtypes and layouts, paths.
_METADATA_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # any class defined there (dataclasses, an enum)
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module in _METADATA_ALLOWED:
            allowed = _METADATA_ALLOWED[module]
            if allowed is None and module.startswith("torch.distributed.checkpoint") and isinstance(
                    getattr(importlib.import_module(module), name, None), type):
                return getattr(importlib.import_module(module), name)
            if allowed is not None and name in allowed:
                return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader with ``.metadata`` unpickled through an allow-list (DCP itself uses ``pickle.load``, which runs
    whatever code the file names); tensors are already read with ``weights_only=True``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refusing to load {path}: it references {e}, which is not one of DCP's metadata "
                                  "types, and unpickling it could run code; torch.distributed.checkpoint never "
                                  "writes that, so the file was tampered with or comes from elsewhere: resume only "
                                  "checkpoints from people you trust") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_per_rank(path: Path) -> dict:
    """A rank's own state (data position, RNG, schedule, scaler): tensors and plain types only, loaded with
    ``weights_only=True``, so a shared checkpoint cannot run code when it is resumed."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {path}: it holds objects beyond tensors and plain types, and "
                              f"unpickling them could run code ({first[:300]}); a chuanliu checkpoint never does, "
                              "so this file was written by something else or tampered with: resume only "
                              "checkpoints from people you trust, or set fault.checkpoint.resume to another "
                              "checkpoint") from None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (an engine's own writer, DeepSpeed's, does not)."""
    for d, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(d) / f)
        _fsync_dir(Path(d))


def _not_shared(directory: Path, host: str, n: int, example: str) -> str:
    return (f"checkpoint directory {directory} is not shared between the ranks: rank 0 on {host} cannot see {n} "
            f"file(s) other ranks wrote (e.g. {example}). Put the run directory, or fault.checkpoint.dir, on a file "
            "system every node mounts (NFS, Lustre, GPFS, a cloud bucket's POSIX mount); otherwise a resume finds "
            "half a checkpoint")


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, *, run_dir: Path, rank: int, world_size: int,
                 fingerprint: dict, events: EventLog | None = None, progress: Progress | None = None,
                 dp_of_rank: list[int] | None = None):
        """dp_of_rank: every rank's data-parallel coordinate (tensor and pipeline ranks of one replica share it);
        None: every rank its own. A checkpoint's per-rank state (data position, RNG) is read from a rank with the
        same coordinate, so a job may resume under another tp x pp layout as long as dp is the same."""
        self.cfg, self.rank, self.world_size, self.events, self.progress = cfg, rank, world_size, events, progress
        self.dp_of_rank = list(dp_of_rank) if dp_of_rank is not None else list(range(world_size))
        self._host = socket.gethostname()
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back from JSON
        self._distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self._group = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        if not cfg.enabled:
            return
        if self._distributed:
            # Collective: every rank builds it, in the same order. The description names it in torch's flight
            # recorder, so the watchdog can tell a stuck save from a stuck training step.
            self._group = dist.new_group(backend="gloo", group_desc="checkpoint")
        if cfg.mode == "async":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        # The broadcast doubles as the barrier: no rank goes on before rank 0 has prepared the directory.
        self._agree(self._prepare)
        if self._distributed:
            self._check_shared()

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
        for stale in sorted([*d.glob(".tmp-step_*"), *d.glob(".trash-*")]):
            log.warning("removing %s: a checkpoint save or prune that was killed before it finished", stale)
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
        box: list[Any] = [None, None, None]  # result, error message, whether it was a CheckpointError
        error: BaseException | None = None
        if self.rank == 0:
            try:
                box[0] = fn()
            except Exception as e:  # noqa: BLE001 (any error: the other ranks must hear of it, or they wait forever)
                error, box[1], box[2] = e, str(e), isinstance(e, CheckpointError)
        if self._distributed:
            dist.broadcast_object_list(box, src=0, group=self._group)
        if error is not None:
            raise error
        if box[1] is not None:
            raise (CheckpointError if box[2] else RuntimeError)(box[1])
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
            raise CheckpointError(f"checkpoint step {step} was not committed: {what} failed on "
                                  + "; ".join(f"rank {r} ({host}): {err}" for r, host, err in failed)
                                  + ". Training state is unchanged; free the space or fix the directory, and the "
                                  "next save tries again (the last committed checkpoint is intact)")

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
        every chunk this rank writes (chaos' slow_io), with a function that reports the write as moving."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at most; this also re-raises a background failure
        tmp, final = self.dir / f".tmp-step_{step:06d}", self.dir / f"step_{step:06d}"
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
            upload = dcp.async_save(sharded, storage_writer=writer, process_group=self._group, no_dist=no_dist)
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
            raise RuntimeError(f"checkpoint step {step} was not committed: writing {tmp} failed on "
                               + "; ".join(f"rank {r} ({host}): {err}" for r, host, err in failed))
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
        save_io = SaveIO(tmp, self.progress, None)
        for p in sorted(tmp.rglob("*")):  # files no rank claimed: DCP's .metadata (if untracked), DeepSpeed's
            name = str(p.relative_to(tmp))
            if p.is_file() and name not in files:
                files[name] = {"bytes": p.stat().st_size, "sha256": save_io.sha256(p)}
        manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                    "dp_of_rank": self.dp_of_rank, "fingerprint": self.fingerprint, "time": time.time(),
                    "torch": torch.__version__, "files": dict(sorted(files.items()))}
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)  # the commit: step_N appears complete, or not at all
        _fsync_dir(self.dir)
        write_s = time.perf_counter() - t0
        nbytes = sum(f["bytes"] for f in files.values())
        log.info("checkpoint step %d committed to %s (%.1f MB, %.2f s)", step, final, nbytes / 1e6, write_s)
        if self.events is not None:
            self.events.emit("checkpoint_commit", durable=True, step=step, path=str(final),
                             block_s=write_s if block_s is None else block_s, write_s=write_s, bytes=nbytes)
        self._prune()

    def _prune(self) -> None:
        ours = [p for p in newest_committed(self.dir) if self._fingerprint_of(p) == self.fingerprint]
        for old in ours[self.cfg.keep:]:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)  # disappears atomically; a kill mid-delete leaves only trash, removed at start
            shutil.rmtree(trash)

    @staticmethod
    def _fingerprint_of(path: Path) -> dict | None:
        try:
            return json.loads((path / MANIFEST).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            return None

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

    # ---- load -----------------------------------------------------------------------------------------------
    def load(self, sharded: dict | Callable[[], dict], native: Callable[[Path], None] | None = None) -> Loaded | None:
        """Load the checkpoint ``cfg.resume`` names into ``sharded`` (in place); None: start fresh.

        ``sharded`` may be a function that makes the state dict, called only once a checkpoint was chosen: an
        engine's state dict of a fresh optimizer is not free (torch's get_state_dict initialises an empty AdamW
        state by stepping it with zero gradients, which would put its step count one ahead for the whole run).
        ``native(dir)``: an engine's own checkpoint reader (DeepSpeed), called on every rank after the DCP load."""
        if not self.cfg.enabled or self.cfg.resume == "never":
            return None
        chosen = self._agree(self._choose)
        if chosen is None:
            return None
        if callable(sharded):
            sharded = sharded()
        path, step = Path(chosen[0]), chosen[1]
        SafeReader(path).read_metadata()  # refuse a tampered .metadata here, with our message, not inside DCP
        dcp.load(sharded, storage_reader=SafeReader(path), process_group=self._group,
                 no_dist=not self._distributed)
        if native is not None:
            native(path)
        source = self._source_rank(json.loads((path / MANIFEST).read_text()))
        per_rank = load_per_rank(path / f"rank{source:05d}.pt")
        return Loaded(step=step, path=path, per_rank=per_rank, sharded=sharded)

    def _candidates(self) -> tuple[list[Path], bool]:
        """Checkpoints to try, newest first, and whether falling back to an older one is allowed."""
        if self.cfg.resume == "auto":
            return newest_committed(self.dir), True
        p = Path(self.cfg.resume).expanduser()
        if (p / MANIFEST).is_file():
            return [p], False  # the user named this one: no silent fallback
        if newest_committed(p):
            return newest_committed(p), True
        what = "does not exist" if not p.exists() else "is not a checkpoint"
        raise CheckpointError(f"fault.checkpoint.resume={p} {what}: expected a directory holding {MANIFEST} "
                              "(one checkpoint) or step_* directories (a checkpoints dir); or use auto or never")

    def _choose(self) -> tuple[str, int] | None:
        candidates, fallback = self._candidates()
        skipped: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                manifest = self._verify(path)
            except _Corrupt as e:
                if not fallback:
                    raise CheckpointError(f"checkpoint {path} is corrupt ({e}); name another checkpoint in "
                                          "fault.checkpoint.resume, or its checkpoints dir to fall back") from e
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                os.rename(path, aside)  # never picked again, never overwritten, kept for inspection
                log.warning("checkpoint %s is corrupt (%s): renamed it to %s, falling back to an older one",
                            path, e, aside.name)
                skipped.append((path, str(e)))
                continue
            self._check_compatible(path, manifest)
            self._report_fallbacks(skipped, used=path)
            return str(path), int(manifest["step"])
        self._report_fallbacks(skipped, used=None)
        if skipped:
            raise CheckpointError(f"all {len(skipped)} committed checkpoints in {self.dir} are corrupt (renamed "
                                  "to *.corrupt-*); not starting fresh silently, which would lose the run's "
                                  f"progress: {_FRESH}")
        return None

    def _report_fallbacks(self, skipped: list[tuple[Path, str]], used: Path | None) -> None:
        for path, reason in skipped:
            if self.events is not None:
                self.events.emit("checkpoint_fallback", skipped=str(path), reason=reason,
                                 used=None if used is None else str(used))
        if skipped and used is not None:
            log.warning("resuming from %s after skipping %d corrupt checkpoint(s)", used, len(skipped))

    def _verify(self, path: Path) -> dict:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise _Corrupt(f"{MANIFEST} is missing") from None
        except (OSError, ValueError) as e:
            raise _Corrupt(f"{MANIFEST} is unreadable: {e}") from None
        keys = ("format", "step", "world_size", "fingerprint", "files")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not all(k in manifest for k in keys):
            raise _Corrupt(f"{MANIFEST} is not a complete {FORMAT} manifest")
        try:
            self._check_files(path, manifest)
        except (KeyError, TypeError, AttributeError) as e:  # a manifest with the right keys but wrong shapes
            raise _Corrupt(f"{MANIFEST} is malformed ({e!r})") from None
        return manifest

    def _check_files(self, path: Path, manifest: dict) -> None:
        files = manifest["files"]
        needed = [".metadata"] + [f"rank{r:05d}.pt" for r in range(manifest["world_size"])]
        if missing := [n for n in needed if n not in files]:
            raise _Corrupt(f"{MANIFEST} lists no {', '.join(missing)}")
        for name, info in files.items():
            f = path / name
            if not f.is_file():
                raise _Corrupt(f"{name} is missing")
            if f.stat().st_size != info["bytes"]:
                raise _Corrupt(f"{name} has {f.stat().st_size} bytes, the manifest says {info['bytes']}")
            if self.cfg.verify and SaveIO(path, self.progress, None).sha256(f) != info["sha256"]:
                raise _Corrupt(f"{name} fails its sha256 check")

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

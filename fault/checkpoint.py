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
- Atomic commit. All ranks write into ``.tmp-step_N`` (files fsynced), agree that every rank finished, and only
  then rank 0 writes the manifest, fsyncs it and renames the directory to ``step_N`` (a rename is atomic on POSIX)
  and fsyncs the parent. A ``step_N`` directory therefore always holds a complete checkpoint, whatever moment a
  process is killed at; ``load`` never has to guess whether a save finished.
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

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
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

from fault.events import EventLog

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
    """Every generator a training step may draw from: python, numpy, torch CPU and all CUDA devices."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, *, run_dir: Path, rank: int, world_size: int,
                 fingerprint: dict, events: EventLog | None = None):
        self.cfg, self.rank, self.world_size, self.events = cfg, rank, world_size, events
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back from JSON
        self._distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self._group = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        if not cfg.enabled:
            return
        if self._distributed:
            self._group = dist.new_group(backend="gloo")  # collective: every rank builds it, in the same order
        if cfg.mode == "async":
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        # The broadcast doubles as the barrier: no rank goes on before rank 0 has prepared the directory.
        self._agree(self._prepare)

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

    def _all_ok(self, ok: bool) -> bool:
        if not self._distributed:
            return ok
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._group)
        return bool(flag.item())

    # ---- save -----------------------------------------------------------------------------------------------
    def due(self, step: int, total_steps: int) -> bool:
        return self.cfg.enabled and (step % self.cfg.every == 0 or step == total_steps)

    def save(self, step: int, *, sharded: dict, per_rank: dict,
             before_commit: Callable[[], None] | None = None,
             native: Callable[[Path], None] | None = None) -> float:
        """Save ``step``; returns the seconds training was blocked (async: waiting + staging only).

        ``native(dir)``: an engine's own checkpoint writer (DeepSpeed), run on every rank into the uncommitted
        directory before the DCP write, in the caller's thread even when async (it is collective and reads live
        state); its files are verified and committed with the rest."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at most; this also re-raises a background failure
        tmp, final = self.dir / f".tmp-step_{step:06d}", self.dir / f"step_{step:06d}"
        if final.exists():
            raise CheckpointError(f"checkpoint {final} already exists (from an earlier run); refusing to "
                                  f"overwrite it: set fault.checkpoint.dir to a new directory")
        tmp.mkdir(exist_ok=True)
        if native is not None:
            native(tmp)
        buf = io.BytesIO()
        torch.save(per_rank, buf)  # serialised now: the caller may change its objects as soon as we return
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        no_dist = not self._distributed
        if self.cfg.mode == "async":
            # Staging (the host copy) happens inside async_save; the DCP thread writes that copy.
            upload = dcp.async_save(sharded, storage_writer=writer, process_group=self._group, no_dist=no_dist)
            upload = getattr(upload, "upload_completion", upload)  # an AsyncSaveResponse with some stagers
            block_s = time.perf_counter() - t0
            self._pending = self._pool.submit(self._finish, step, tmp, final, buf.getvalue(), upload.result,
                                              before_commit, t0, block_s)
            return block_s
        self._finish(step, tmp, final, buf.getvalue(),
                     lambda: dcp.save(sharded, storage_writer=writer, process_group=self._group, no_dist=no_dist),
                     before_commit, t0, None)
        return time.perf_counter() - t0

    def _finish(self, step: int, tmp: Path, final: Path, per_rank: bytes, write: Callable[[], Any],
                before_commit: Callable[[], None] | None, t0: float, block_s: float | None) -> None:
        """Write this rank's files, agree that every rank did, commit on rank 0, agree that it did."""
        ok = False
        try:
            _write_file(tmp / f"rank{self.rank:05d}.pt", per_rank)
            write()
            if before_commit is not None:
                before_commit()  # fault injection: may raise, or SIGKILL this process
            ok = True
        finally:
            all_wrote = self._all_ok(ok)  # reached even when this rank failed, so that no rank hangs
        if not all_wrote:
            raise RuntimeError(f"checkpoint step {step} was not committed: a rank failed while writing {tmp}")
        committed = self.rank != 0
        try:
            if self.rank == 0:
                self._commit(step, tmp, final, t0, block_s)
                committed = True
        finally:
            all_committed = self._all_ok(committed)
        if not all_committed:
            raise RuntimeError(f"checkpoint step {step} was not committed: rank 0 failed to commit {tmp}")

    def _commit(self, step: int, tmp: Path, final: Path, t0: float, block_s: float | None) -> None:
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                    "fingerprint": self.fingerprint, "time": time.time(), "torch": torch.__version__,
                    "files": files}
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
        dcp.load(sharded, storage_reader=dcp.FileSystemReader(path), process_group=self._group,
                 no_dist=not self._distributed)
        if native is not None:
            native(path)
        # weights_only=False: the per-rank dict holds numpy RNG state and other objects; the file was written by
        # this module and its sha256 checked against the manifest.
        per_rank = torch.load(path / f"rank{self.rank:05d}.pt", weights_only=False)
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
            if self.cfg.verify and file_sha256(f) != info["sha256"]:
                raise _Corrupt(f"{name} fails its sha256 check")

    def _check_compatible(self, path: Path, manifest: dict) -> None:
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(f"checkpoint {path} was written by {manifest['world_size']} ranks, this job "
                                  f"has {self.world_size}: per-rank state (data position, RNG) cannot be mapped; "
                                  f"run with {manifest['world_size']} ranks, or {_FRESH}")
        old, new = _flatten(manifest["fingerprint"]), _flatten(self.fingerprint)
        diff = [f"{k}: checkpoint {old.get(k)!r}, this run {new.get(k)!r}"
                for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        if diff:
            raise CheckpointError(f"checkpoint {path} was written with another configuration ({'; '.join(diff)}); "
                                  f"restore those settings to resume, or {_FRESH} (resume=never alone refuses a "
                                  "dir that holds checkpoints)")

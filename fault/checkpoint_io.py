"""Checkpoint I/O: every byte a save writes or a load verifies passes through here, reported and hashed.

``SaveIO`` is one save's I/O as the watchdog and chaos see it (progress per chunk, an optional throttle, sha256
computed while writing); ``_Writer`` is DCP's FileSystemWriter writing through it; ``hash_confined`` hashes a file
of a checkpoint being verified (opened without following links, fault.safe_load). The manager that decides what to
save and load is fault.checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from fault import safe_load
from fault.progress import Progress


def _fsync_dir(path: Path) -> None:  # a file or a directory
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
    with open(path, "rb") as f:
        return _sha256_of(f, on_chunk)


def _sha256_of(f, on_chunk: Callable[[int], None] | None) -> str:
    if on_chunk is None:
        return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    while chunk := f.read(CHUNK):
        h.update(chunk)
        on_chunk(len(chunk))
    return h.hexdigest()


CHUNK = 1 << 20  # bytes per write and per progress report


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
                _fsync_dir(self.root / name)
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


def hash_confined(root: Path, name: str, progress: Progress | None) -> str:
    """sha256 of a checkpoint file opened without following links, reporting its bytes as progress."""
    with safe_load.open_confined(root, name) as f:
        return _sha256_of(f, None if progress is None else lambda n: progress.io(n, f"verifying {name}"))


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (an engine's own writer, DeepSpeed's, does not)."""
    for d, _, files in os.walk(root):
        for f in files:
            _fsync_dir(Path(d) / f)
        _fsync_dir(Path(d))

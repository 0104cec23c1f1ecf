"""Reading a checkpoint that someone else may have written: nothing in it runs code, nothing outside it is read.

Start with ``inspect``: every check that needs no hashing (the files on disk against the manifest, DCP's
``.metadata`` against the files), run before anything is loaded. ``SafeReader`` + ``SafePlanner`` are what
``dcp.load`` is then given. Every reader of chuanliu checkpoints (the trainer's resume, experiments.quality) goes
through them.

The threat: whoever can write a checkpoint directory (a colleague's run dir, a shared bucket, a drill's output) also
writes its manifest, so checksums prove nothing about intent. What such a writer could do, and what stops it:

- Run code through pickle. DCP unpickles ``.metadata`` with ``pickle.load`` and reads every non-tensor item (an
  optimizer's lr and betas, any int or string in a state dict) with ``torch.load(weights_only=False)``. Here
  ``.metadata`` goes through an allow-list of DCP's own metadata classes, and every bytes item through
  ``torch.load(weights_only=True)`` (tensors and plain types only); a bytes item is also read and checked before the
  load starts, so a refusal never leaves a half-loaded model. The per-rank ``rank*.pt`` files are read with
  ``weights_only=True`` too (fault.checkpoint).
- Swap a tensor for an object. A ``.metadata`` that declares a weight as a bytes item (or a plain value as a tensor)
  is refused before DCP plans the load.
- Read files outside the checkpoint. Manifest names and ``.metadata`` storage paths must be plain relative names
  that stay inside the directory; symlinks, hard links (a second name for a file elsewhere) and special files are
  refused anywhere in the tree; DCP's reader opens only the files that passed these checks, without following a
  symlink.
- Hide a file from verification. Every file in the tree must be listed in the manifest (a shard left out of it was
  never hashed), and every file ``.metadata`` reads must be listed.

Not protected: a directory changed by its writer *while* a job loads it (checks then reads; only the last path
component is opened without following links), and the checkpoint's *values* (weights poisoned on purpose load like
any other weights). DeepSpeed's own files are checked by its engine (comm/engines/deepspeed.py).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper, as its default planner uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest of a million files is ~100 MB of JSON; this one is read whole
TRUST = "resume only checkpoints from people you trust"


class Refused(ValueError):
    """A checkpoint that must not be loaded: the message says what is wrong with it (one line)."""


# ---- files -------------------------------------------------------------------------------------------------------
def plain_name(name: Any) -> str:
    """A manifest or storage name as a safe relative POSIX path, or Refused: no absolute path, no '..', no '.',
    no empty component, no backslash or NUL (what would leave the directory or name it twice)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise Refused(f"file name {name!r} is not a plain relative path")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")) or not parts:
        raise Refused(f"file name {name!r} leaves the checkpoint directory or is not normalised")
    return name


def scan(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (relative name -> bytes), walked without following links. Refused: a root
    or entry that is a symlink, a hard link (a file with another name elsewhere: its content is not the
    checkpoint's to give), a device, FIFO or socket."""
    if root.is_symlink():
        raise Refused(f"{root.name} is a symlink ({os.readlink(root)}); a checkpoint is a real directory")
    files: dict[str, int] = {}

    def walk(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                name = f"{prefix}{e.name}"
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise Refused(f"{name} is a symlink (to {os.readlink(e.path)}); checkpoints hold no links")
                if stat.S_ISDIR(st.st_mode):
                    walk(Path(e.path), f"{name}/")
                elif not stat.S_ISREG(st.st_mode):
                    raise Refused(f"{name} is not a regular file")
                elif st.st_nlink > 1:
                    raise Refused(f"{name} is a hard link ({st.st_nlink} names): its content may belong to a file "
                                  "outside the checkpoint; copy the checkpoint with cp -r to break the links")
                else:
                    files[name] = st.st_size
    walk(root, "")
    return files


def open_confined(root: Path, name: str) -> io.BufferedReader:
    """Open ``root/name`` for reading, ``name`` a plain name, the file itself never followed if it is a link."""
    fd = os.open(root / plain_name(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise Refused(f"{name} is not a plain regular file")
    return os.fdopen(fd, "rb")


def read_manifest(root: Path) -> bytes:
    if root.is_symlink():  # checked first: nothing is read through a checkpoint directory that is a link
        raise Refused(f"{root.name} is a symlink ({os.readlink(root)}); a checkpoint is a real directory")
    with open_confined(root, MANIFEST) as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise Refused(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    return data


def check_tree(root: Path, listed: dict[str, dict]) -> dict[str, int]:
    """The tree on disk against the manifest's ``files``: names plain, every file listed, every listed file there
    with its size. Returns the sizes."""
    for name in listed:
        plain_name(name)
    on_disk = scan(root)
    on_disk.pop(MANIFEST, None)
    if unlisted := sorted(set(on_disk) - set(listed)):
        raise Refused(f"{unlisted[0]} is not listed in {MANIFEST} ({len(unlisted)} such file(s)): an unlisted file "
                      "was never verified")
    for name, info in listed.items():
        if name not in on_disk:
            raise Refused(f"{name} is missing")
        if on_disk[name] != info["bytes"]:
            raise Refused(f"{name} has {on_disk[name]} bytes, the manifest says {info['bytes']}")
    return on_disk


# ---- DCP's .metadata ---------------------------------------------------------------------------------------------
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


def read_metadata(root: Path) -> Metadata:
    """DCP's ``.metadata`` through the allow-list, checked to be DCP's Metadata."""
    try:
        with open_confined(root, ".metadata") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise Refused(f".metadata references {e}, which is not one of DCP's metadata types, and unpickling it "
                      "could run code; torch.distributed.checkpoint never writes that, so the file was tampered with "
                      f"or comes from elsewhere: {TRUST}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise Refused(f".metadata is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise Refused(".metadata does not hold DCP's Metadata")
    return metadata


def check_metadata(metadata: Metadata, sizes: dict[str, int]) -> None:
    """Every storage entry reads a listed file, inside it, with no transform (chuanliu writes none: a transform
    names an extension to run on the bytes)."""
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        try:
            plain_name(name)
        except Refused as e:
            raise Refused(f".metadata: storage of {getattr(index, 'fqn', index)!r}: {e}") from None
        if name not in sizes:
            raise Refused(f".metadata: {getattr(index, 'fqn', index)!r} is stored in {name}, which is not a "
                          "listed file of the checkpoint")
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length <= sizes[name] - offset):
            raise Refused(f".metadata: {getattr(index, 'fqn', index)!r} reads bytes {offset}..+{length} of {name}, "
                          f"which has {sizes[name]}")
        if getattr(info, "transform_descriptors", None):
            raise Refused(f".metadata: {name} asks for transforms {list(info.transform_descriptors)}; chuanliu "
                          "writes none")


def load_bytes_safely(data: io.BytesIO | bytes, what: str) -> Any:
    """A DCP bytes item (a non-tensor value of a state dict): tensors and plain types only."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Refused(f"the value of {what!r} holds objects beyond tensors and plain types, and unpickling them "
                      f"could run code ({first[:200]}): {TRUST}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise Refused(f"the value of {what!r} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def check_bytes_items(root: Path, metadata: Metadata) -> int:
    """Read every bytes item the checkpoint stores, as the load will (weights_only), before anything is loaded:
    a refusal here leaves the live model untouched. They are small (an optimizer's hyperparameters). Returns how
    many there were."""
    n = 0
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", str(index))
        if not isinstance(metadata.state_dict_metadata.get(fqn), BytesStorageMetadata):
            continue
        with open_confined(root, info.relative_path) as f:
            f.seek(info.offset)
            load_bytes_safely(f.read(info.length), fqn)
        n += 1
    return n


# ---- what dcp.load is given ----------------------------------------------------------------------------------------
class _ConfinedFS(FileSystem):
    """DCP's file system for reading one checkpoint: only names that passed ``check_tree``, never through a link."""

    def __init__(self, root: Path, allowed: set[str] | None):
        super().__init__()
        self.root, self.allowed = Path(root), allowed

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if "r" not in mode or any(c in mode for c in "wa+"):
            raise Refused(f"a checkpoint being loaded is opened read-only, not {mode!r}")
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        name = plain_name(name.replace(os.sep, "/"))
        if self.allowed is not None and name not in self.allowed:
            raise Refused(f"{name} was not verified and is not read")
        with open_confined(self.root, name) as f:
            yield f


class SafeReader(dcp.FileSystemReader):
    """DCP's reader for an untrusted directory: ``.metadata`` through the allow-list and checked against the files,
    and only ``verified`` files opened (name -> bytes, as ``check_tree`` held them against the disk; None: every
    plain file of the tree, walked here)."""

    def __init__(self, path: str | os.PathLike, verified: dict[str, int] | None = None):
        super().__init__(path)
        self.verified = verified
        self.fs = _ConfinedFS(Path(path), None if verified is None else set(verified))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        root = Path(self.path)
        metadata = read_metadata(root)
        check_metadata(metadata, scan(root) if self.verified is None else self.verified)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner with bytes items read ``weights_only=True`` (DCP reads them with
    ``weights_only=False``) and the checkpoint's declared kinds held against the state dict being loaded: a tensor
    must be stored as a tensor, a plain value as bytes; else the load is refused while planning, before any read."""

    def create_local_plan(self):
        for fqn, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                continue  # DCP reports missing keys itself
            if isinstance(md, BytesStorageMetadata) == _is_tensor(obj):
                want, got = ("a tensor", "a pickled object") if _is_tensor(obj) else ("a plain value", "a tensor")
                raise Refused(f".metadata declares {fqn!r} as {got}, but it is {want} in the model/optimizer: the "
                              f"file was tampered with or belongs to another program; {TRUST}")
        return super().create_local_plan()

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        if read_item.type != LoadItemType.BYTE_IO:
            raise Refused(f"{read_item.dest_index.fqn!r} is not a bytes item")
        obj = load_bytes_safely(value, read_item.dest_index.fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _is_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) or type(obj).__name__ in ("ShardedTensor", "DTensor")


def listed_sizes(manifest: dict) -> dict[str, int]:
    """A verified manifest's files and their sizes: what SafeReader may open."""
    return {name: info["bytes"] for name, info in manifest["files"].items()}


def load(state: dict, root: Path, *, verified: dict[str, int] | None = None, allow_partial_load: bool = False,
         **kwargs: Any) -> None:
    """``dcp.load`` of ``root`` into ``state`` (in place) through SafeReader and SafePlanner; ``verified``: the
    files already checked (``listed_sizes``), so no rank walks the tree again; ``kwargs``: dcp.load's
    (process_group, no_dist)."""
    dcp.load(state, storage_reader=SafeReader(root, verified),
             planner=SafePlanner(allow_partial_load=allow_partial_load), **kwargs)

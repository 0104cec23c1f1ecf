"""Peak memory of the process: CUDA's max allocated on a GPU, peak resident set size on a CPU."""
from __future__ import annotations

import os
import resource
import sys
from typing import Callable

import torch


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def peak_memory_fn(device: torch.device) -> Callable[[], int]:
    """A function returning peak bytes so far on ``device`` (chosen once, so the step loop does not branch)."""
    if device.type == "cuda":
        return lambda: torch.cuda.max_memory_allocated(device)
    return _peak_rss_bytes


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SavedTensorMeter:
    """Activation memory of a forward pass: bytes of tensors autograd saves for backward.

    Deterministic on any device (no allocator statistics needed): every tensor autograd saves passes through
    a saved-tensors pack hook, is deduplicated by storage (views of one buffer count once) and counted unless
    it is a parameter. A checkpoint's inputs are saved that way too, so recomputation shows up as the
    memory it really keeps.
    Use one ``with meter:`` per micro-batch forward; ``peak_bytes`` is the largest so far, ``last_bytes`` the
    latest. Transient buffers freed before backward (a chunk's logits) are not counted: they are never saved.
    """

    def __init__(self, params):
        # Sharded engines (FSDP2) hold DTensor parameters: their local shard is the storage.
        self._param_storages = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in params}
        self.last_bytes = 0
        self.peak_bytes = 0

    def reset_peak(self) -> None:
        self.peak_bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A parameter or a view of one (a transposed weight), incl. FSDP2's all-gathered parameters, which live in
        # buffers other than the shards the meter was given.
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses (fp8) without a plain storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self._param_storages:
            self._seen[key] = nbytes
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.last_bytes = sum(self._seen.values())
        self.peak_bytes = max(self.peak_bytes, self.last_bytes)
        self._seen = {}

"""Peak memory of the process: CUDA's max allocated on a GPU, peak resident set size on a CPU."""
from __future__ import annotations

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
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

"""DDP communication hooks running chuanliu's collectives, with overlap control and exposed-communication timing.

    reduce_hook(state, bucket)   runs state.reduce on the bucket: comm/algorithm=flat gives the backend's
                                 all-reduce (plus the emulated inter-node delay, if any), hierarchical the
                                 two-level all-reduce (comm.hierarchical)

Each hook hands its bucket to one worker thread per state and returns a torch Future that the thread completes,
so collectives run in bucket order while autograd keeps computing: that is the overlap. With overlap off the
hook only queues buckets and the last one releases them all: every reduction runs after the backward compute.

Per step the state measures:
    total_s    time spent inside collectives (sum over buckets)
    exposed_s  time from the moment the last bucket became ready (backward compute done) until its reductions
               finished: communication nothing could hide. It includes the gaps between collectives (thread
               hand-off, Python), so with overlap off exposed_s is total_s or a little more (exposed_frac >= 1).
Why a thread and not Future.then chaining: the hierarchical algorithm is three dependent collectives on
different groups, and the emulated slow link sleeps; both would block autograd's thread inside a callback.
"""
# No `from __future__ import annotations`: DDP.register_comm_hook checks the hooks' annotations at runtime and
# refuses string ones ("bucket annotation should be dist.GradBucket").
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from comm.hierarchical import flat_all_reduce, hierarchical_all_reduce
from comm.slowlink import SlowLink
from comm.topology import HierarchicalGroups


@dataclass(kw_only=True)
class AlgorithmConfig:
    name: str = "native"  # native (DDP's built-in all-reduce; no comm timing), flat or hierarchical

    def __post_init__(self) -> None:
        if self.name not in ("native", "flat", "hierarchical"):
            raise ValueError(f"comm.algorithm.name={self.name!r} is unknown; use native, flat or hierarchical")


@dataclass(kw_only=True)
class OverlapConfig:
    enabled: bool = True  # reduce each bucket as soon as it is ready during backward; false = all after backward


@dataclass
class CommState:
    """State shared by a hook's calls: what to run, where, and this step's timings."""

    reduce: Callable[[torch.Tensor], None]  # in-place SUM all-reduce of a flat tensor
    world_size: int
    overlap: bool
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "chuanliu-comm"))
    pending: list = field(default_factory=list)  # overlap off: (tensor, future) waiting for the last bucket
    lock: threading.Lock = field(default_factory=threading.Lock)
    total_s: float = 0.0
    last_ready: float = 0.0
    last_done: float = 0.0

    def _run(self, tensor: torch.Tensor, fut: torch.futures.Future) -> None:
        try:
            t0 = time.perf_counter()
            self.reduce(tensor)
            t1 = time.perf_counter()
            with self.lock:
                self.total_s += t1 - t0
                self.last_done = max(self.last_done, t1)
            fut.set_result(tensor)
        except Exception as e:  # surfaces in backward instead of hanging it
            fut.set_exception(e)

    def submit(self, tensor: torch.Tensor, last: bool) -> "torch.futures.Future[torch.Tensor]":
        fut = torch.futures.Future()
        self.last_ready = time.perf_counter()
        tensor.div_(self.world_size)  # DDP expects the average
        if self.overlap:
            self.executor.submit(self._run, tensor, fut)
            return fut
        self.pending.append((tensor, fut))
        if last:  # backward compute is over: release every queued bucket, in order
            for t, f in self.pending:
                self.executor.submit(self._run, t, f)
            self.pending = []
        return fut

    def step_stats(self) -> dict[str, float]:
        """This step's comm timings (call after backward), then reset for the next step."""
        with self.lock:
            total, exposed = self.total_s, max(0.0, self.last_done - self.last_ready)
            self.total_s = self.last_ready = self.last_done = 0.0
        return {"comm/total_s": total, "comm/exposed_s": exposed,
                "comm/exposed_frac": exposed / total if total > 0 else 0.0}


def reduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state.submit(bucket.buffer(), bucket.is_last())


def build_comm_hook(algorithm: AlgorithmConfig, overlap: OverlapConfig, groups: HierarchicalGroups,
                    link: SlowLink) -> "tuple[Callable, CommState] | None":
    """The (hook, state) pair for DDP.register_comm_hook, or None for DDP's native all-reduce."""
    if algorithm.name == "native":  # the engine's own reduction (overlap=off is each engine's to honour or refuse)
        if link.enabled:
            raise ValueError("the emulated slow link (comm.link) sits in chuanliu's collectives; use "
                             "comm/algorithm=flat or hierarchical with it")
        return None
    topo = groups.topology
    if algorithm.name == "flat":
        reduce = lambda t: flat_all_reduce(t, link=link, topo=topo)  # noqa: E731
    else:
        reduce = lambda t: hierarchical_all_reduce(t, groups, link=link)  # noqa: E731
    return reduce_hook, CommState(reduce=reduce, world_size=topo.world_size, overlap=overlap.enabled)

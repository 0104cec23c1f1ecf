"""DDP communication hooks running chuanliu's collectives, with overlap control and exposed-communication timing.

    reduce_hook(state, bucket)   averages the bucket and runs state.reduce on it: the all-reduce the
                                 comm/algorithm option's ``build`` returns (comm/hierarchical.py: flat, the
                                 backend's all-reduce plus the emulated inter-node delay; hierarchical, two-level)

Each hook hands its bucket to one worker thread per state and returns a torch Future that the thread completes
once the bucket is really reduced, so collectives run in bucket order while autograd keeps computing: that is
the overlap. With overlap off the hook only queues buckets and the last one releases them all: every reduction
runs after the backward compute.

Per step the state measures (with a timer chosen once from the training device, ``build_timer``):
    total_s    time spent reducing buckets (averaging and collectives, summed over buckets)
    exposed_s  time from the moment the last bucket became ready (backward compute done) until its reductions
               finished: communication nothing could hide. It includes the gaps between collectives (thread
               hand-off, Python), so with overlap off exposed_s is total_s or a little more (exposed_frac >= 1).
Where the time comes from:
    CPU (gloo)   collectives return when done: the host clock (perf_counter) around them.
    CUDA (NCCL)  collectives return once their kernels are queued, so the host clock would time launches. The
                 worker reduces on its own CUDA stream, which first waits on an event recorded on autograd's
                 stream when the bucket was handed over (its gradients are written); CUDA events around the
                 reduction give total_s, the handover event to the reduction's end event gives exposed_s, and the
                 worker waits for the end event before completing the Future, so DDP never reads unfinished sums.
A ``reduce`` may also return an async work (anything with ``wait()``): it is waited on inside the timed span.
Why a thread and not Future.then chaining: the hierarchical algorithm is three dependent collectives on
different groups, and the emulated slow link sleeps; both would block autograd's thread inside a callback.
"""
# No `from __future__ import annotations`: DDP.register_comm_hook checks the hooks' annotations at runtime and
# refuses string ones ("bucket annotation should be dist.GradBucket").
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from comm.slowlink import SlowLink
from comm.topology import HierarchicalGroups


@dataclass(kw_only=True)
class AlgorithmConfig:
    """The comm/algorithm group's base, and its ``native`` option: the engine's own reduction (DDP's built-in
    all-reduce, C++, overlapped), no chuanliu hook and so no comm timing. Every other option is a subclass (one
    class and one YAML naming it as ``_target_``) whose ``build`` returns the in-place SUM all-reduce the hook
    runs; comm/hierarchical.py holds ``flat`` and ``hierarchical``."""

    name: str = "native"  # the option's name, for logs and summary.json; the YAML's _target_ chooses the class
    # How analysis.predictor models this algorithm on a cluster: "nccl" (the library's ring/tree) or
    # "hierarchical" (two-level: intra-node reduce-scatter, inter-node all-reduce, intra-node all-gather).
    predictor_collective: ClassVar[str] = "nccl"
    overlaps_always: ClassVar[bool] = True  # the engine's own reduction overlaps whatever comm/overlap says

    def __post_init__(self) -> None:
        own = next(f.default for f in dataclasses.fields(self) if f.name == "name")
        if self.name != own:
            raise ValueError(f"comm.algorithm.name={self.name!r} does not choose the algorithm (this option is "
                             f"{own!r}, class {type(self).__name__}); select it with comm/algorithm={self.name}")

    def build(self, groups: HierarchicalGroups, link: SlowLink) -> "Callable[[torch.Tensor], object] | None":
        """The all-reduce chuanliu's hook runs, or None: the engine reduces by itself."""
        if link.enabled:
            raise ValueError("the emulated slow link (comm.link) sits in chuanliu's collectives; use "
                             "comm/algorithm=flat or hierarchical with it")
        return None


@dataclass(kw_only=True)
class OverlapConfig:
    enabled: bool = True  # reduce each bucket as soon as it is ready during backward; false = all after backward


class HostTimer:
    """CPU (gloo): a collective returns when it is done, so the host clock times it."""

    def ready(self, tensor: torch.Tensor) -> float:
        return time.perf_counter()  # CPU gradients are written once autograd hands the bucket over

    def run(self, reduce: Callable[[torch.Tensor], object], tensor: torch.Tensor,
            ready: float) -> tuple[float, float]:
        """Runs ``reduce(tensor)`` to completion; (seconds inside it, seconds from ``ready`` to its end)."""
        t0 = time.perf_counter()
        _finish(reduce(tensor))
        t1 = time.perf_counter()
        return t1 - t0, t1 - ready


class CudaTimer:
    """CUDA (NCCL): reduces on a side stream and times it with CUDA events (module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def ready(self, tensor: torch.Tensor) -> torch.cuda.Event:
        # Called on autograd's thread: its current stream is the one that wrote the bucket's gradients.
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def run(self, reduce: Callable[[torch.Tensor], object], tensor: torch.Tensor,
            ready: torch.cuda.Event) -> tuple[float, float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)  # the gradients must be written before they are reduced
            tensor.record_stream(self.stream)  # the allocator must not reuse the bucket while this stream uses it
            start.record(self.stream)
            _finish(reduce(tensor))  # an NCCL work's wait() makes this stream (not the host) wait for it
            end.record(self.stream)
        end.synchronize()  # the sums are in memory: only now may the Future complete
        return start.elapsed_time(end) / 1e3, ready.elapsed_time(end) / 1e3  # ms -> s


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for ``device``'s queued work (a no-op on a CPU, whose collectives return when done); chosen once, so a
    timed loop never branches on the device."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def build_timer(device: torch.device) -> "HostTimer | CudaTimer":
    """The clock for collectives on ``device``'s tensors, chosen once so the hook never branches on it."""
    return CudaTimer(device) if device.type == "cuda" else HostTimer()


def _finish(work: object) -> None:
    if work is not None:  # an async work (async_op=True): its time belongs to the collective
        work.wait()


@dataclass
class CommState:
    """State shared by a hook's calls: what to run, where, and this step's timings."""

    reduce: Callable[[torch.Tensor], object]  # in-place SUM all-reduce of a flat tensor; may return a work
    world_size: int
    overlap: bool
    timer: "HostTimer | CudaTimer" = field(default_factory=HostTimer)  # build_timer(training device)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "chuanliu-comm"))
    pending: list = field(default_factory=list)  # overlap off: (tensor, future) waiting for the last bucket
    lock: threading.Lock = field(default_factory=threading.Lock)
    total_s: float = 0.0
    exposed_s: float = 0.0

    def _average_and_reduce(self, tensor: torch.Tensor) -> object:
        tensor.div_(self.world_size)  # DDP expects the average; on CUDA this runs on the comm stream too
        return self.reduce(tensor)

    def _run(self, tensor: torch.Tensor, fut: torch.futures.Future, ready) -> None:
        try:
            busy, since_ready = self.timer.run(self._average_and_reduce, tensor, ready)
            with self.lock:
                self.total_s += busy
                # One worker runs buckets in order, so the last write is the last bucket's: from the moment it
                # was ready to the end of the step's communication.
                self.exposed_s = since_ready
            fut.set_result(tensor)
        except Exception as e:  # surfaces in backward instead of hanging it
            fut.set_exception(e)

    def submit(self, tensor: torch.Tensor, last: bool) -> "torch.futures.Future[torch.Tensor]":
        fut = torch.futures.Future()
        if self.overlap:
            self.executor.submit(self._run, tensor, fut, self.timer.ready(tensor))
            return fut
        self.pending.append((tensor, fut))
        if last:  # backward compute is over: release every queued bucket, in order
            # All wait on the last bucket's mark: on a GPU the host runs ahead, and an earlier bucket's own
            # mark would let its reduction overlap the rest of the backward kernels.
            ready = self.timer.ready(tensor)
            for t, f in self.pending:
                self.executor.submit(self._run, t, f, ready)
            self.pending = []
        return fut

    def step_stats(self) -> dict[str, float]:
        """This step's comm timings (call after backward), then reset for the next step."""
        with self.lock:
            total, exposed = self.total_s, self.exposed_s
            self.total_s = self.exposed_s = 0.0
        return {"comm/total_s": total, "comm/exposed_s": exposed,
                "comm/exposed_frac": exposed / total if total > 0 else 0.0}


def reduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state.submit(bucket.buffer(), bucket.is_last())


def build_comm_hook(algorithm: AlgorithmConfig, overlap: OverlapConfig, groups: HierarchicalGroups,
                    link: SlowLink, device: torch.device = torch.device("cpu"),
                    ) -> "tuple[Callable, CommState] | None":
    """The (hook, state) pair for DDP.register_comm_hook, or None for the engine's own all-reduce (overlap=off is
    then each engine's to honour or refuse). ``device``: where the gradients live (it picks the timer)."""
    reduce = algorithm.build(groups, link)
    if reduce is None:
        return None
    return reduce_hook, CommState(reduce=reduce, world_size=groups.topology.world_size, overlap=overlap.enabled,
                                  timer=build_timer(device))

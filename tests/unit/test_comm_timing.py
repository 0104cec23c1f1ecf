"""Timing collectives (comm/hooks.py, comm/buckets.py, comm/bench.py) so that communication, not its launch, counts.

CPU: the hook's timer must wait for an asynchronous collective (one that returns before its work is done, as
NCCL's do) before it stops the clock and completes the Future; total/exposed follow the overlap setting;
``comm.bench`` runs on gloo and refuses nccl without a GPU in one clear sentence. GPU (``-m gpu``, skipped
elsewhere): the CUDA timer orders the reduction after autograd's stream and times it with events, DDP with the
hook on a one-process NCCL group trains exactly as without it, the bucket probe fits a positive beta on the
device, and ``comm.bench --backend nccl`` runs as one process.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from comm.buckets import measure_alpha_beta
from comm.hierarchical import FlatAllReduce
from comm.hooks import CommState, CudaTimer, HostTimer, OverlapConfig, build_comm_hook, build_timer
from comm.slowlink import LinkConfig, SlowLink
from comm.topology import Topology, TopologyConfig, build_groups, discover_topology
from tests.helpers import REPO, free_port

DELAY_S = 0.05  # how long a fake collective's transfer lasts: far above thread hand-off and Python overheads
WORLD = 3


class _LateWork:
    """An asynchronous "collective": the call returns at once and the sum lands DELAY_S later on another thread,
    as a queued NCCL kernel finishes after all_reduce has returned."""

    def __init__(self, tensor: torch.Tensor):
        self.thread = threading.Thread(target=self._sum, args=(tensor,))
        self.thread.start()

    @staticmethod
    def _sum(tensor: torch.Tensor) -> None:
        time.sleep(DELAY_S)  # the transfer itself, not a synchronisation
        tensor.mul_(WORLD)  # every rank holds the same average, so the sum is WORLD times it

    def wait(self) -> None:
        self.thread.join(timeout=10)


def _sync_reduce(tensor: torch.Tensor) -> None:
    """A synchronous collective (gloo's kind) that takes DELAY_S."""
    SlowLink(LinkConfig(inter_alpha_us=1.0)).wait(DELAY_S)
    tensor.mul_(WORLD)


def _state(reduce, overlap: bool) -> CommState:
    return CommState(reduce=reduce, world_size=WORLD, overlap=overlap, timer=build_timer(torch.device("cpu")))


def test_an_async_collective_is_timed_to_its_completion_and_the_future_waits_for_it():
    state = _state(lambda t: _LateWork(t), overlap=True)
    x = torch.full((1000,), 6.0)
    out = state.submit(x, last=True).wait()
    # Averaged (6 / 3), then summed over 3 identical ranks: 6 only once the late work has landed.
    assert torch.equal(out, torch.full((1000,), 6.0))
    stats = state.step_stats()
    assert stats["comm/total_s"] >= DELAY_S and stats["comm/exposed_s"] >= DELAY_S


def test_overlap_on_exposes_only_the_last_bucket():
    state = _state(_sync_reduce, overlap=True)
    first = state.submit(torch.ones(10), last=False)
    first.wait()  # the first bucket's reduction ran while "backward" went on: hidden
    state.submit(torch.ones(10), last=True).wait()
    stats = state.step_stats()
    assert stats["comm/total_s"] >= 2 * DELAY_S
    assert DELAY_S <= stats["comm/exposed_s"] < 0.75 * stats["comm/total_s"]
    assert state.step_stats() == {"comm/total_s": 0.0, "comm/exposed_s": 0.0, "comm/exposed_frac": 0.0}  # reset


def test_overlap_off_reduces_after_the_last_bucket_and_exposes_everything():
    state = _state(_sync_reduce, overlap=False)
    first = state.submit(torch.full((10,), 3.0), last=False)
    assert not first.done()  # queued until backward is over
    last = state.submit(torch.full((10,), 6.0), last=True)
    assert torch.equal(first.wait(), torch.full((10,), 3.0)) and torch.equal(last.wait(), torch.full((10,), 6.0))
    stats = state.step_stats()
    assert stats["comm/total_s"] >= 2 * DELAY_S
    assert stats["comm/exposed_frac"] >= 1.0  # the span from the last ready bucket holds both reductions


def test_a_failed_collective_fails_the_future():
    def broken(tensor):
        raise RuntimeError("link down")

    with pytest.raises(RuntimeError, match="link down"):
        _state(broken, overlap=True).submit(torch.ones(3), last=True).wait()


def test_the_timer_is_chosen_once_from_the_device():
    assert isinstance(build_timer(torch.device("cpu")), HostTimer)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    groups = build_groups(discover_topology(TopologyConfig()))
    _, state = build_comm_hook(FlatAllReduce(), OverlapConfig(), groups, SlowLink(LinkConfig()))
    assert isinstance(state.timer, HostTimer)


# ---------------------------------------------------------------- comm.bench

def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "comm.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_bench_runs_on_gloo_as_one_process(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench("--backend", "gloo", "--min-bytes", "4K", "--max-bytes", "16K", "--warmup", "1", "--iters", "2",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "gloo on cpu" in proc.stdout
    report = json.loads(out.read_text())
    assert report["backend"] == "gloo" and report["device"].startswith("cpu") and report["world"] == 1
    assert [r["size"] for r in report["rows"]] == [4096, 16384]
    assert all(r[a]["wrong"] == 0 for r in report["rows"] for a in ("flat", "hierarchical"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is")
def test_bench_refuses_nccl_without_a_gpu_and_says_what_to_use():
    proc = _bench("--backend", "nccl")
    assert proc.returncode == 2
    assert "--backend nccl needs a CUDA GPU" in proc.stderr and "use --backend gloo" in proc.stderr


# ---------------------------------------------------------------- GPU (skipped, never faked, without one)

CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms of GPU spinning at ~2 GHz; the host returns at once


def _gpu_sleep_s() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(CYCLES)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@pytest.fixture(scope="module")
def nccl_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    yield device
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timer_waits_for_the_producer_and_times_the_gpu_work():
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    sleep_s = _gpu_sleep_s()

    def slow_reduce(tensor):  # queued GPU work: the call returns long before it is done
        torch.cuda._sleep(CYCLES)
        tensor.add_(1)

    state = CommState(reduce=slow_reduce, world_size=1, overlap=True, timer=build_timer(device))
    assert isinstance(state.timer, CudaTimer)
    x = torch.zeros(1 << 20, device=device)
    torch.cuda._sleep(CYCLES)  # autograd's stream is still busy when the bucket is handed over ...
    x.fill_(3.0)  # ... and writes the gradients last
    out = state.submit(x, last=True).wait()
    # Read on the default stream without synchronising: the Future must complete only after the sums landed.
    assert torch.equal(out.cpu(), torch.full((1 << 20,), 4.0))  # 3 + 1: the reduction ran after the fill
    stats = state.step_stats()
    assert stats["comm/total_s"] >= 0.8 * sleep_s  # the GPU work, not its microsecond launch
    # From the bucket's readiness (the producer's sleep and fill done) to the end: the producer's sleep is not in it.
    assert 0.8 * sleep_s <= stats["comm/exposed_s"] < 1.6 * sleep_s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overlap, reduce", [(True, "flat"), (False, "flat"), (True, "nccl_async")])
def test_ddp_with_the_hook_on_nccl_trains_as_without_it(nccl_group, overlap, reduce):
    device = nccl_group
    torch.manual_seed(0)
    ref = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)]).to(device)  # 6 x 257 KiB of fp32 grads
    model = copy.deepcopy(ref)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index], bucket_cap_mb=0.25,
                                              gradient_as_bucket_view=True)
    topo = Topology(rank=0, world_size=1, node_of_rank=(0,), simulated=True, source="test")
    hook, state = build_comm_hook(FlatAllReduce(), OverlapConfig(enabled=overlap), build_groups(topo),
                                  SlowLink(LinkConfig()), device)
    if reduce == "nccl_async":  # NCCL itself, returning its work: the comm stream must wait on it
        state.reduce = lambda t: dist.all_reduce(t, async_op=True)
    ddp.register_comm_hook(state, hook)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ddp, ref)]
    for step in range(2):  # DDP rebuilds its buckets after the first step
        x = torch.randn(32, 256, device=device)
        for m, opt in zip((ddp, ref), opts):
            opt.zero_grad(set_to_none=False)
            m(x).square().mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), f"step {step}"  # one rank: the average of one is itself
        stats = state.step_stats()
        assert stats["comm/total_s"] > 0 and stats["comm/exposed_s"] > 0
        for opt in opts:
            opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bucket_probe_runs_on_the_gpu_and_fits_a_positive_beta(nccl_group):
    devices = set()

    def reduce(tensor):
        devices.add(tensor.device.type)
        dist.all_reduce(tensor)  # NCCL refuses CPU tensors: the probe must be on the GPU
        tensor.mul_(1.0)  # one rank's all-reduce moves no data; this read + write grows with size as a transfer

    sizes = [64 * 2**10, 4 * 2**20, 64 * 2**20, 256 * 2**20]
    alpha, beta = measure_alpha_beta(reduce, sizes, iters=3, device=nccl_group)
    assert devices == {"cuda"}
    # Timed to completion, 256 MiB take ~0.1 ms or more; timing launches only would give beta ~ 0, i.e. an
    # impossible bandwidth far above any GPU's memory (~5e12 B/s).
    assert beta > 0 and 1 / beta < 5e13 and alpha >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_runs_on_nccl_as_one_process(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench("--backend", "nccl", "--max-bytes", "1M", "--warmup", "2", "--iters", "5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["backend"] == "nccl" and report["device"] == torch.cuda.get_device_name(0)
    assert all(r[a]["wrong"] == 0 and r[a]["time_us"] > 0 for r in report["rows"] for a in ("flat", "hierarchical"))

"""The straggler timer on a real FSDP2 model (2 gloo processes): a rank waiting in FSDP2's parameter all-gather
for a late peer is waiting, not computing; its compute time must not include the wait."""
import datetime
import os
import time

import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn

LATE_S = 1.5


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from fault.watchdog import ComputeTimer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    timer = ComputeTimer(torch.device("cpu"))
    timer.exclude_engine_hooks(model)
    x = torch.randn(16, 64)
    model(x).sum().backward()  # warm-up
    dist.barrier()
    if rank == 1:
        time.sleep(LATE_S)  # rank 0 enters the forward at once and waits in the root's all-gather
    t0 = time.perf_counter()
    with timer():
        y = model(x)
    wall = time.perf_counter() - t0
    y.sum().backward()
    torch.save({"wall": wall, "compute": timer.take(), "hooked": timer.hooked_modules}, f"{out}/r{rank}.pt")
    dist.destroy_process_group()


def test_compute_time_leaves_out_waiting_in_fsdp2_all_gathers(tmp_path):
    spawn(_worker, (free_port(), str(tmp_path)), 2, timeout_s=90)
    waiting = torch.load(tmp_path / "r0.pt")
    assert waiting["hooked"] == 5  # the root and the four layers carry FSDP2's pre-forward hooks
    assert waiting["wall"] > LATE_S * 0.8  # the forward really waited for the late rank ...
    assert waiting["compute"] < 0.3 * LATE_S, waiting  # ... and the timer did not count the wait

"""All-reduce benchmark in the nccl-tests style: flat vs hierarchical, side by side.

    torchrun --standalone --nproc_per_node=4 -m comm.bench --nodes 2 --min-bytes 4K --max-bytes 16M
    torchrun --standalone --nproc_per_node=4 -m comm.bench --nodes 2 --inter-alpha-us 50 --inter-gbps 3
    python -m comm.bench --backend nccl          # one process (world size 1): checks the NCCL path on one GPU

--backend is nccl where CUDA is available (tensors on cuda:LOCAL_RANK), gloo (CPU tensors) otherwise. Without
torchrun's environment the benchmark is a one-process group.

For each size (--min-bytes to --max-bytes, times --step-factor): --warmup untimed iterations, then --iters timed
ones; time_us is the mean per iteration (nccl-tests reports the mean too), measured between barriers on rank 0
(on nccl after waiting for the GPU: collectives return once their kernels are queued).
    algbw = size / time                       (GB/s, 1e9 bytes)
    busbw = algbw * 2 (n - 1) / n             (nccl-tests PERFORMANCE.md, all-reduce: comparable with link speed)
    wrong = elements differing from the exact expected sum (inputs are small integers, so any order is exact)
With an emulated slow inter-node link (comm.slowlink), model_us is the alpha-beta prediction: the loopback part
fitted on this run's undelayed flat times (t = 2(n-1)·a + 2(n-1)/n·bytes·b, least squares) plus the injected
inter-node delay for the algorithm's traffic. Writes --json if given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.distributed as dist

from comm.hierarchical import flat_all_reduce, hierarchical_all_reduce
from comm.hooks import synchronizer
from comm.slowlink import LinkConfig, SlowLink, flat_inter_node_delay, hierarchical_inter_node_delay
from comm.topology import TopologyConfig, build_groups, discover_topology

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def sizes(lo: int, hi: int, factor: float) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n = int(n * factor)
    return out


def time_one(reduce, count: int, dtype: torch.dtype, warmup: int, iters: int,
             device: torch.device = torch.device("cpu")) -> tuple[float, int]:
    """Mean seconds per all-reduce and the number of wrong elements in the last result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = synchronizer(device)
    x = torch.empty(count, dtype=dtype, device=device)
    for _ in range(warmup):
        x.fill_(rank + 1)
        reduce(x)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        x.fill_(rank + 1)  # a few µs: the same cost in every algorithm's column
        reduce(x)
    sync()  # the last all-reduce has finished, not just been queued
    dist.barrier()
    elapsed = (time.perf_counter() - t0) / iters
    wrong = int((x != world * (world + 1) // 2).sum())
    return elapsed, wrong


def fit_alpha_beta(rows: list[dict], world: int) -> tuple[float, float]:
    """Least-squares (a, b) of t = 2(p-1)·a + 2(p-1)/p·bytes·b over undelayed flat measurements."""
    xs = torch.tensor([[2 * (world - 1), 2 * (world - 1) / world * r["size"]] for r in rows], dtype=torch.float64)
    ts = torch.tensor([r["time_us"] * 1e-6 for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(xs, ts.unsqueeze(1)).solution.squeeze(1).clamp(min=0).tolist()
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="16M")
    p.add_argument("--step-factor", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--nodes", type=int, default=None, help="virtual nodes (default: discover real nodes)")
    p.add_argument("--inter-alpha-us", type=float, default=0.0)
    p.add_argument("--inter-gbps", type=float, default=0.0)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="nccl" if torch.cuda.is_available() else "gloo",
                   help="nccl: CUDA tensors on cuda:LOCAL_RANK (default with a GPU); gloo: CPU tensors")
    p.add_argument("--json", "--out", dest="json", default=None)
    args = p.parse_args()
    if args.backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        p.error("--backend nccl needs a CUDA GPU and a torch built with NCCL (none here); use --backend gloo")

    device = init_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = discover_topology(TopologyConfig(nodes=args.nodes))
    groups = build_groups(topo)
    link = SlowLink(LinkConfig(inter_alpha_us=args.inter_alpha_us, inter_gbps=args.inter_gbps))
    off = SlowLink(LinkConfig())
    dtype = _DTYPES[args.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    algorithms = {"flat": lambda lk: (lambda t: flat_all_reduce(t, link=lk, topo=topo)),
                  "hierarchical": lambda lk: (lambda t: hierarchical_all_reduce(t, groups, link=lk))}
    rows = []
    for size in sizes(parse_size(args.min_bytes), parse_size(args.max_bytes), args.step_factor):
        count = max(1, size // esize)
        row = {"size": count * esize, "count": count, "dtype": args.dtype}
        for name, make in algorithms.items():
            t, wrong = time_one(make(link), count, dtype, args.warmup, args.iters, device)
            algbw = row["size"] / t / 1e9
            row[name] = {"time_us": t * 1e6, "algbw": algbw, "busbw": algbw * 2 * (world - 1) / world, "wrong": wrong}
            if link.enabled:  # the same algorithm without the injected delay, for the model fit
                row[name]["undelayed_us"] = time_one(make(off), count, dtype, 1, max(3, args.iters // 4),
                                                     device)[0] * 1e6
        rows.append(row)
    if link.enabled:
        a, b = fit_alpha_beta([{"size": r["size"], "time_us": r["flat"]["undelayed_us"]} for r in rows], world)
        for r in rows:
            base = 2 * (world - 1) * a + 2 * (world - 1) / world * r["size"] * b
            r["flat"]["model_us"] = 1e6 * (base + flat_inter_node_delay(link, r["size"], topo))
            r["hierarchical"]["model_us"] = 1e6 * (base + hierarchical_inter_node_delay(link, r["size"], topo))
    if rank == 0:
        report(rows, args, topo, world, link.enabled, device_name(device))
    dist.destroy_process_group()


def init_group(backend: str) -> torch.device:
    """The process group (torchrun's environment, else one process) and the device its tensors live on."""
    timeout = datetime.timedelta(seconds=float(os.environ.get("CHUANLIU_PG_TIMEOUT_S", 300)))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # NCCL and the barrier use the current device
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # a plain `python -m comm.bench`: a world of one, so a one-GPU machine can run it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def report(rows: list[dict], args, topo, world: int, modelled: bool, device: str) -> None:
    print(f"# all-reduce, {world} ranks, {topo.describe()}, {args.backend} on {device}, {args.dtype}; "
          f"warmup {args.warmup}, "
          f"iters {args.iters}" + (f"; emulated inter-node link {args.inter_alpha_us} us, {args.inter_gbps} GB/s"
                                   if modelled else ""))
    cols = ["time_us", "algbw", "busbw", "wrong"] + (["model_us"] if modelled else [])
    head = f"{'size':>10} {'count':>9} {'dtype':>8}"
    for name in ("flat", "hierarchical"):
        head += " |" + "".join(f"{name[:4] + ':' + c:>14}" for c in cols)
    print(head)
    for r in rows:
        line = f"{r['size']:>10} {r['count']:>9} {r['dtype']:>8}"
        for name in ("flat", "hierarchical"):
            v = r[name]
            line += " |" + "".join(f"{v[c]:>14.2f}" if c != "wrong" else f"{v[c]:>14d}" for c in cols)
        print(line)
    big = rows[-1]
    if big["flat"]["busbw"] > 0:  # one rank moves no data: busbw is 0 (nccl-tests' factor 2(n-1)/n)
        print(f"# largest size: hierarchical/flat busbw = {big['hierarchical']['busbw'] / big['flat']['busbw']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "world": world, "topology": topo.describe(),
                       "backend": args.backend, "device": device, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

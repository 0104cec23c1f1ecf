"""All-reduce benchmark in the nccl-tests style: flat vs hierarchical, side by side.

    torchrun --standalone --nproc_per_node=4 -m comm.bench --nodes 2 --min-bytes 4K --max-bytes 16M
    torchrun --standalone --nproc_per_node=4 -m comm.bench --nodes 2 --inter-alpha-us 50 --inter-gbps 3

For each size (--min-bytes to --max-bytes, times --step-factor): --warmup untimed iterations, then --iters timed
ones; time_us is the mean per iteration (nccl-tests reports the mean too), measured between barriers on rank 0.
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
import time

import torch
import torch.distributed as dist

from comm.hierarchical import flat_all_reduce, hierarchical_all_reduce
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


def time_one(reduce, count: int, dtype: torch.dtype, warmup: int, iters: int) -> tuple[float, int]:
    """Mean seconds per all-reduce and the number of wrong elements in the last result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.empty(count, dtype=dtype)
    for _ in range(warmup):
        x.fill_(rank + 1)
        reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        x.fill_(rank + 1)  # a few µs: the same cost in every algorithm's column
        reduce(x)
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
    p.add_argument("--json", default=None)
    args = p.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("CHUANLIU_PG_TIMEOUT_S",
                                                                                              300))))
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
            t, wrong = time_one(make(link), count, dtype, args.warmup, args.iters)
            algbw = row["size"] / t / 1e9
            row[name] = {"time_us": t * 1e6, "algbw": algbw, "busbw": algbw * 2 * (world - 1) / world, "wrong": wrong}
            if link.enabled:  # the same algorithm without the injected delay, for the model fit
                row[name]["undelayed_us"] = time_one(make(off), count, dtype, 1, max(3, args.iters // 4))[0] * 1e6
        rows.append(row)
    if link.enabled:
        a, b = fit_alpha_beta([{"size": r["size"], "time_us": r["flat"]["undelayed_us"]} for r in rows], world)
        for r in rows:
            base = 2 * (world - 1) * a + 2 * (world - 1) / world * r["size"] * b
            r["flat"]["model_us"] = 1e6 * (base + flat_inter_node_delay(link, r["size"], topo))
            r["hierarchical"]["model_us"] = 1e6 * (base + hierarchical_inter_node_delay(link, r["size"], topo))
    if rank == 0:
        report(rows, args, topo, world, link.enabled)
    dist.destroy_process_group()


def report(rows: list[dict], args, topo, world: int, modelled: bool) -> None:
    print(f"# all-reduce, {world} ranks, {topo.describe()}, gloo, {args.dtype}; warmup {args.warmup}, "
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
    print(f"# largest size: hierarchical/flat busbw = {big['hierarchical']['busbw'] / big['flat']['busbw']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "world": world, "topology": topo.describe(),
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

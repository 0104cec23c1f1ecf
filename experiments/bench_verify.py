"""Checkpoint verification at load: rank 0 hashing every file (serial) against every rank hashing a fair share.

    python -m experiments.bench_verify --gb 10 --ranks 4 --repeats 3 --out docs/benchmarks/verify_<date>.json

A real checkpoint of about ``--gb`` GB (1 GB = 1e9 bytes) is written by the project's own writer
(``CheckpointManager.save``, mode sync) from ``--ranks`` gloo processes, each holding its own model/optimizer-like
tensors (one ``__<r>_0.distcp`` of gb/ranks per rank). It is written as one data-parallel replica over the ranks
(``dp_of_rank=[0]*ranks``, a tensor-parallel-like layout) so that 1, 2 and ``--ranks`` ranks may all verify it
(a checkpoint of dp=4 refuses a 1-rank reader: ``_check_compatible``).

Then, with the page cache warm (every file hashed once first; ``fincore`` says how much is resident), in rounds
(each variant once per round, a fresh job each time, so drifts of the host's speed hit every variant alike):
- ``serial``: one process, world 1, ``CheckpointManager._verify_everywhere``: rank 0 hashes every file (the old
  serial check, plus the new structural checks);
- ``old_loop``: the check before the change, for reference: ``file_sha256`` of every manifest file, one process;
- ``dist<N>``: N gloo processes, each calling ``_verify_everywhere`` after a barrier; wall time from the barrier to
  the last rank done (all on one host: one clock);
- ``dist<N>_1core``: the same with every rank pinned to one core: if verification is CPU-bound (hashing), this
  takes about as long as ``serial``.
Inside every rank a ``Progress`` records the first and last hashed chunk, which gives each rank's own hash rate.
On one host the speed-up is bounded by min(ranks, cores, the storage's parallel read rate / one stream's rate).
The host may be shared: each timed run first waits (``--quiet-wait``) for the host's CPUs to be idle and records
the CPU the rest of the host used meanwhile (``others_cpu_s``); medians are given over every round and over the
clean rounds (the rest of the host under 10% of its CPUs).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
BLOCK = 1 << 16  # elements of the small block every tensor is filled with (no minutes of RNG)
TENSOR = 1 << 26  # elements per tensor (256 MiB of fp32)
FINGERPRINT = {"bench": "verify"}


def _host_cpu() -> tuple[float, float]:
    """Seconds of CPU the whole host has been busy (all processes, all cores) and stolen by the hypervisor."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / hz, (f[7] if len(f) > 7 else 0) / hz


# ---- workers (spawned: module-level, picklable) ---------------------------------------------------------------------
def _init(rank: int, world: int, port: int, cpus: list[int] | None) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if cpus:
        os.sched_setaffinity(0, cpus)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))


def _state(rank: int, nbytes: int) -> dict:
    """A model/optimizer-like state dict of fp32 tensors, this rank's own keys, about ``nbytes`` in all."""
    numel = nbytes // 4 // BLOCK * BLOCK
    block = torch.arange(BLOCK, dtype=torch.float32) * (rank + 1) / BLOCK
    kinds = ("weight", "exp_avg", "exp_avg_sq")
    model, optim, i = {}, {}, 0
    while numel > 0:
        n = min(TENSOR, numel)
        t = torch.empty(n)
        t.view(-1, BLOCK).copy_(block + i)  # broadcast: memory bandwidth, not RNG
        kind = kinds[i % 3]
        (model if kind == "weight" else optim)[f"rank{rank}.layers.{i // 3}.{kind}"] = t
        numel -= n
        i += 1
    return {"model": model, "optim": {"state": optim, "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95]}]}}


def _write_worker(rank: int, world: int, port: int, ckpt_dir: str, nbytes: int, out: str) -> None:
    import torch.distributed as dist

    from fault.checkpoint import CheckpointConfig, CheckpointManager, rng_state

    _init(rank, world, port, None)
    t0 = time.perf_counter()
    sharded = _state(rank, nbytes)
    fill_s = time.perf_counter() - t0
    mgr = CheckpointManager(CheckpointConfig(mode="sync", dir=ckpt_dir), run_dir=Path(ckpt_dir), rank=rank,
                            world_size=world, fingerprint=FINGERPRINT, dp_of_rank=[0] * world,
                            job="bench-verify-write")
    if world > 1:
        dist.barrier()
    t1 = time.perf_counter()
    mgr.save(1, sharded=sharded, per_rank={"rank": rank, "step": 1, "rng": rng_state()})
    save_s = time.perf_counter() - t1
    mgr.close()
    Path(out, f"write-rank{rank}.json").write_text(json.dumps({"fill_s": fill_s, "save_s": save_s}))
    if world > 1:
        dist.destroy_process_group()


def _verify_worker(rank: int, world: int, port: int, ckpt_dir: str, variant: str, cpus: list[int] | None,
                   out: str) -> None:
    import torch.distributed as dist

    from fault.checkpoint import CheckpointConfig, CheckpointManager, file_sha256, newest_committed
    from fault.progress import Progress

    class Timed(Progress):  # the trainer passes the watchdog's Progress; this one also notes when hashing ran
        def __init__(self) -> None:
            super().__init__()
            self.first = self.last = None

        def io(self, nbytes: int, what: str) -> None:
            now = time.perf_counter()
            self.first = now if self.first is None else self.first
            self.last = now
            super().io(nbytes, what)

    _init(rank, world, port, cpus)
    rec = Timed()
    mgr = CheckpointManager(CheckpointConfig(mode="sync", dir=ckpt_dir), run_dir=Path(ckpt_dir), rank=rank,
                            world_size=world, fingerprint=FINGERPRINT, progress=rec, dp_of_rank=[0] * world,
                            job=f"bench-verify-{variant}")
    path = newest_committed(Path(ckpt_dir))[0]
    if world > 1:
        dist.barrier()
    start, p0, cpu0, host0 = time.time(), time.perf_counter(), time.process_time(), _host_cpu()
    reason, manifest, _ = mgr._verify_everywhere(path, None)
    p1, cpu1, host1 = time.perf_counter(), time.process_time(), _host_cpu()
    end = time.time()
    if reason is not None:
        raise RuntimeError(f"verification refused {path}: {reason}")
    row = {"rank": rank, "start": start, "end": end, "wall_s": p1 - p0, "hashed_bytes": rec.io_bytes,
           "hash_s": (rec.last - rec.first) if rec.first is not None else 0.0,
           "before_hash_s": (rec.first - p0) if rec.first is not None else None,
           "cpus": sorted(os.sched_getaffinity(0)), "cpu_s": cpu1 - cpu0,
           "host_busy_s": host1[0] - host0[0], "host_steal_s": host1[1] - host0[1]}
    if variant == "serial":  # the check before the change, in the same process: every file, one after another
        q0, cpu0, host0 = time.perf_counter(), time.process_time(), _host_cpu()
        for name, info in manifest["files"].items():
            if file_sha256(path / name) != info["sha256"]:
                raise RuntimeError(f"{name} fails its sha256 check")
        host1 = _host_cpu()
        row["old_loop"] = {"wall_s": time.perf_counter() - q0,
                           "others_cpu_s": host1[0] - host0[0] - (time.process_time() - cpu0),
                           "steal_s": host1[1] - host0[1]}
    mgr.close()
    Path(out, f"{variant}-rank{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


# ---- the driver -----------------------------------------------------------------------------------------------------
def _run(fn, world: int, args: tuple, timeout_s: float) -> None:
    from tests.helpers import free_port, spawn

    spawn(fn, (world, free_port(), *args), nprocs=world, timeout_s=timeout_s)


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def _sha256_rate(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """One core's sha256 rate over a 1 GiB buffer in memory, median of ``repeats``."""
    buf = bytes(nbytes)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        hashlib.sha256(buf).digest()
        rates.append(nbytes / (time.perf_counter() - t0))
    return statistics.median(rates)


def _resident(files: list[Path]) -> int | None:
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", *map(str, files)], capture_output=True,
                             text=True, check=True).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def _wait_quiet(max_s: float, busy_frac: float = 0.1) -> float:
    """Wait (at most max_s) until the host's CPUs are idle but for ``busy_frac`` over one second: other jobs on
    this machine (outside this process tree, even outside this container) would otherwise time-share the cores the
    ranks hash on. Returns the seconds waited."""
    t0, ncpu = time.perf_counter(), os.cpu_count() or 1
    while time.perf_counter() - t0 < max_s:
        b0 = _host_cpu()[0]
        time.sleep(1.0)
        if _host_cpu()[0] - b0 <= busy_frac * ncpu:
            break
    return time.perf_counter() - t0


def _clean(run: dict) -> bool:
    """Whether the rest of the host used under 10% of its CPUs while this run was timed."""
    return run.get("others_cpu_s") is not None and run["others_cpu_s"] <= 0.1 * run["wall_s"] * (os.cpu_count() or 1)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=10.0, help="checkpoint size, GB (1e9 bytes)")
    p.add_argument("--ranks", type=int, default=4, help="ranks that write the checkpoint and verify it")
    p.add_argument("--scaling", type=int, nargs="*", default=[2], help="other rank counts to verify with")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each variant once per round, median reported")
    p.add_argument("--dir", default="/tmp/bench_verify", help="where the checkpoint is written (deleted at the end)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each timed run, wait up to this long for the host's other load to stop")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse one of the same size)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / f"verify_{time.strftime('%Y-%m-%d')}.json"))
    a = p.parse_args()

    from fault.checkpoint import file_sha256, newest_committed

    root = Path(a.dir)
    ckpt_dir, results = root / "checkpoints", root / "results"
    total = int(a.gb * GB)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    reuse = a.keep and bool(newest_committed(ckpt_dir))
    if not reuse and free < 1.2 * total:
        sys.exit(f"{root} has {free / GB:.1f} GB free, the checkpoint needs {total / GB:.1f} GB (+20%)")
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": _lscpu_model(), "cpu_count": os.cpu_count(),
              "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "torch": torch.__version__, "command": " ".join(["python -m experiments.bench_verify", *sys.argv[1:]]),
              "gb": a.gb, "ranks": a.ranks, "repeats": a.repeats, "dir": str(root),
              "filesystem_free_gb": round(free / GB, 1), "loadavg_start": _loadavg()}
    print(f"{result['cpu']}, {result['cpu_count']} cores ({result['cpus_usable']} usable), torch {torch.__version__}")
    try:
        # ---- write --------------------------------------------------------------------------------------------
        if reuse:
            print(f"reusing {newest_committed(ckpt_dir)[0]}")
        else:
            shutil.rmtree(root)
            results.mkdir(parents=True)
            t0 = time.perf_counter()
            _run(_write_worker, a.ranks, (str(ckpt_dir), total // a.ranks, str(results)), timeout_s=3600)
            rows = [json.loads((results / f"write-rank{r}.json").read_text()) for r in range(a.ranks)]
            result["write"] = {"wall_s": time.perf_counter() - t0, "fill_s_max": max(r["fill_s"] for r in rows),
                               "save_s_max": max(r["save_s"] for r in rows)}
            print(f"wrote the checkpoint: {result['write']['wall_s']:.1f} s (save {result['write']['save_s_max']:.1f} "
                  "s on the slowest rank)", flush=True)
        results.mkdir(parents=True, exist_ok=True)
        path = newest_committed(ckpt_dir)[0]
        manifest = json.loads((path / "manifest.json").read_text())
        files = {n: i["bytes"] for n, i in manifest["files"].items()}
        nbytes = sum(files.values())
        result.update(path=str(path), files=len(files), total_bytes=nbytes,
                      largest_files=sorted(files.values(), reverse=True)[:a.ranks])

        # ---- page cache warm, one core's sha256 rate --------------------------------------------------------------
        t0 = time.perf_counter()
        for n in files:
            file_sha256(path / n)
        result["warmup_hash_s"] = time.perf_counter() - t0
        result["resident_bytes_before"] = _resident([path / n for n in files])
        _wait_quiet(a.quiet_wait)
        result["sha256_one_core_gb_s"] = _sha256_rate() / GB
        resident = (result["resident_bytes_before"] or 0) / GB
        print(f"{len(files)} files, {nbytes / GB:.2f} GB, {resident:.2f} GB resident in the page cache;"
              f" sha256 on one core {result['sha256_one_core_gb_s']:.2f} GB/s", flush=True)

        # ---- rounds ---------------------------------------------------------------------------------------------
        one = [min(os.sched_getaffinity(0))]
        variants = [("serial", 1, None), (f"dist{a.ranks}", a.ranks, None),
                    *[(f"dist{n}", n, None) for n in a.scaling if n != a.ranks],
                    (f"dist{a.ranks}_1core", a.ranks, one)]
        runs: dict[str, list[dict]] = {v: [] for v, _, _ in variants}
        runs["old_loop"] = []
        for rnd in range(a.repeats):
            for variant, world, cpus in variants:
                for f in results.glob(f"{variant}-rank*.json"):
                    f.unlink()
                waited = _wait_quiet(a.quiet_wait)
                _run(_verify_worker, world, (str(ckpt_dir), variant, cpus, str(results)), timeout_s=900)
                ranks = [json.loads((results / f"{variant}-rank{r}.json").read_text()) for r in range(world)]
                run = {"wall_s": max(r["end"] for r in ranks) - min(r["start"] for r in ranks),
                       "max_rank_wall_s": max(r["wall_s"] for r in ranks),
                       # CPU the rest of the host used meanwhile (rank 0's view of the host minus every rank's own)
                       "others_cpu_s": ranks[0]["host_busy_s"] - sum(r["cpu_s"] for r in ranks),
                       "steal_s": ranks[0]["host_steal_s"], "waited_quiet_s": waited,
                       "per_rank": [{k: r[k] for k in ("hashed_bytes", "hash_s", "before_hash_s", "cpus")}
                                    | {"hash_gb_s": r["hashed_bytes"] / r["hash_s"] / GB if r["hash_s"] else None}
                                    for r in ranks]}
                runs[variant].append(run)
                print(f"round {rnd + 1} {variant:<12} {run['wall_s']:6.2f} s  others' CPU "
                      f"{run['others_cpu_s']:5.1f} s  steal {run['steal_s']:4.1f} s  per-rank hash GB/s "
                      + " ".join(f"{x['hash_gb_s']:.2f}" for x in run["per_rank"] if x["hash_gb_s"]), flush=True)
                if variant == "serial":
                    old = ranks[0]["old_loop"]
                    runs["old_loop"].append(old)
                    print(f"round {rnd + 1} {'old_loop':<12} {old['wall_s']:6.2f} s  others' CPU "
                          f"{old['others_cpu_s']:5.1f} s", flush=True)
        result["resident_bytes_after"] = _resident([path / n for n in files])

        # ---- summary ----------------------------------------------------------------------------------------------
        # Medians over every round, and over the clean rounds only (the rest of the host under 10% of its CPUs):
        # this machine is shared, and a run that time-shares its cores with another job measures that job.
        order = ["old_loop", "serial", *[v for v, _, _ in variants if v != "serial"]]
        ranks_of = {"old_loop": 1, **{v: w for v, w, _ in variants}}
        cores = {"old_loop": 1, **{v: min(w, len(c) if c else len(os.sched_getaffinity(0))) for v, w, c in variants}}
        med = {v: statistics.median(r["wall_s"] for r in runs[v]) for v in order}
        clean = {v: [r["wall_s"] for r in runs[v] if _clean(r)] for v in order}
        clean_med = {v: statistics.median(w) if w else None for v, w in clean.items()}
        summary = {}
        for v in order:
            walls = [r["wall_s"] for r in runs[v]]
            rates = [x["hash_gb_s"] for r in runs[v] if _clean(r) for x in r.get("per_rank", []) if x["hash_gb_s"]]
            summary[v] = {"ranks": ranks_of[v], "cores": cores[v], "median_s": med[v], "min_s": min(walls),
                          "max_s": max(walls), "speedup_vs_serial": med["serial"] / med[v],
                          "clean_rounds": len(clean[v]), "clean_median_s": clean_med[v],
                          "clean_gb_s": nbytes / clean_med[v] / GB if clean_med[v] else None,
                          "clean_speedup_vs_serial": (clean_med["serial"] / clean_med[v]
                                                      if clean_med[v] and clean_med["serial"] else None),
                          "clean_per_rank_hash_gb_s_median": statistics.median(rates) if rates else None,
                          "others_cpu_s": [round(r["others_cpu_s"], 2) for r in runs[v]]}
        result["runs"], result["summary"] = runs, summary
        result["bound_on_this_host"] = min(a.ranks, len(os.sched_getaffinity(0)))
        main_v = summary[f"dist{a.ranks}"]
        result["goal_3x_met"] = (main_v["clean_speedup_vs_serial"] or main_v["speedup_vs_serial"]) >= 3.0
        result["loadavg_end"] = _loadavg()

        def f(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)
        print(f"\n{'variant':<12} {'ranks':>5} {'cores':>5} {'clean':>5} {'clean s':>8} {'GB/s':>6} {'x serial':>8} "
              f"{'rank GB/s':>9} | {'all s':>6} {'min-max s':>12} {'x serial':>8}")
        for v, s in summary.items():
            print(f"{v:<12} {s['ranks']:>5} {s['cores']:>5} {s['clean_rounds']:>5} {f(s['clean_median_s']):>8} "
                  f"{f(s['clean_gb_s']):>6} {f(s['clean_speedup_vs_serial']):>8} "
                  f"{f(s['clean_per_rank_hash_gb_s_median']):>9} | {s['median_s']:>6.2f} "
                  f"{s['min_s']:>5.2f}-{s['max_s']:<6.2f} {s['speedup_vs_serial']:>8.2f}")
        print(f"\n{nbytes / GB:.2f} GB, {len(files)} files; the speed-up on this host is bounded by "
              f"min(ranks, cores) = {result['bound_on_this_host']}; 3x goal met: {result['goal_3x_met']}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

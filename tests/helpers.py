"""Helpers shared by tests: running the real entry points."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_entry(args: list[str], *, timeout: float = 240, torchrun_nproc: int = 0) -> subprocess.CompletedProcess:
    """Run ``experiments.train`` as a user would (optionally under torchrun), from the repo root."""
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}",
               "-m", "experiments.train", *args]
    else:
        cmd = [sys.executable, "-m", "experiments.train", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run fn(rank, *args) in ``nprocs`` spawned processes; raise if one fails or all have not ended in time."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    # join() returns False each time one process exits while others still run, and raises if one failed.
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{nprocs} workers did not finish within {timeout_s:.0f} s")

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

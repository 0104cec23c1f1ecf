"""Shared test set-up: caches, wandb and run directories go to temporary folders, never to ~ or the repo."""
from __future__ import annotations

import os

import pytest
import torch

@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update({
        "CHUANLIU_CACHE": str(root / "cache"),  # built-in corpus, tokenizers, CPU peak: built once per session
        "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_CONFIG_DIR": str(root / "wandb_cfg"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"), "WANDB_SILENT": "true",
        "CHUANLIU_PG_TIMEOUT_S": "60",  # a failed collective must not hang a test for 10 minutes
        "TMPDIR": str(root / "tmp"),
    })
    (root / "tmp").mkdir()
    yield root
    os.environ.clear()
    os.environ.update(saved)


# The lanes: files of whole runs through the entry points (several processes, sweeps, drills) are `slow`;
# `make test-fast` leaves them out (unit tests and a distributed smoke test, a few minutes), `make test` runs all.
SLOW_FILES = {"test_drills.py", "test_drills_parallel.py", "test_parallel.py", "test_autotune.py", "test_sweeps.py",
              "test_engines.py", "test_checkpoint_attacks.py", "test_launchers.py", "test_techniques.py"}


def pytest_collection_modifyitems(config, items):
    """Whole-run integration files are `slow` (SLOW_FILES); `gpu`-marked tests run where CUDA is (`make gpu-check`
    selects them with -m gpu) and skip elsewhere."""
    for item in items:
        if item.path.name in SLOW_FILES and item.path.parent.name == "integration":
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (skipped, never faked)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

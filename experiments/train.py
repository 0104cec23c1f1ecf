"""Train a Baichuan-architecture model and measure tokens/s, TFLOPS and MFU.

    python -m experiments.train                                   # tiny model, built-in corpus, CPU or GPU
    python -m experiments.train model=small train.steps=100
    python -m experiments.train -m experiment=autotune             # an Optuna search (experiments/autotune.py)
    torchrun --standalone --nproc_per_node=2 -m experiments.train  # DDP, gloo on CPU / NCCL on GPU
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.autotune import run_trial
from experiments.dist import init_distributed
from experiments.trainer import run_training


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the steady-state median tokens/s: the objective of a sweeper (experiment=autotune)."""
    init_distributed()  # a no-op if done below; a task of Hydra's submitit launcher joins its group here
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("autotune") is not None:  # memory cap first: an infeasible trial is recorded, never launched
        return run_trial(cfg, run_dir, run_training)
    summary = run_training(cfg, run_dir)
    return float(summary.get("median", {}).get("perf/tokens_per_s", 0.0))


if __name__ == "__main__":
    init_distributed()  # before Hydra, so every rank resolves the same run directory
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

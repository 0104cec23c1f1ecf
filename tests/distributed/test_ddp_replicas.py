"""Two real processes (gloo) train through the trainer; the test itself compares their parameters."""
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers import REPO, free_port, spawn

WORLD = 2


def _worker(rank: int, port: int, out_dir: str, cache: str) -> None:
    from hydra import compose, initialize_config_dir

    import experiments.dist  # noqa: F401  (registers the config resolvers)
    from experiments.trainer import build_run, train_loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CHUANLIU_CACHE=cache, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["train.steps=3", "train.grad_accum_steps=2", "logging=disabled",
                                           "train.micro_batch_size=4"])
    run = build_run(cfg, Path(out_dir) / "run")
    initial = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
    train_loop(run)
    torch.save({"initial": initial, "final": run.engine.module.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_with_gradient_accumulation_keeps_replicas_identical(tmp_path):
    spawn(_worker, (free_port(), str(tmp_path), os.environ["CHUANLIU_CACHE"]), WORLD, timeout_s=180)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, p0 in states[0]["final"].items():
        assert torch.equal(p0, states[1]["final"][name]), name
        assert torch.equal(states[0]["initial"][name], states[1]["initial"][name]), name
    moved = [n for n, p in states[0]["final"].items() if not torch.equal(p, states[0]["initial"][n])]
    assert len(moved) == len(states[0]["final"])  # every parameter was trained

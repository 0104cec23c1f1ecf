"""Which rank a process is, under each launcher chuanliu supports: torchrun/DeepSpeed (RANK, WORLD_SIZE, ...) and a
task of Hydra's submitit launcher on Slurm (SLURM_* variables, read through submitit). No process group is made."""
import os

import pytest

from experiments.dist import dist_info

SLURM_TASK_5_OF_16 = {  # what Slurm gives task 5 of a 2-node x 8-task job
    "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the whole environment is restored afterwards (submitit's export() sets variables
    that monkeypatch does not know about, and they must not leak into later tests' subprocesses)."""
    saved = dict(os.environ)
    for key in (*LAUNCHER_VARS, *SLURM_TASK_5_OF_16):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_torchrun_variables(clean_env):
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        clean_env.setenv(key, value)
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)


def test_a_submitit_slurm_task_knows_its_rank_before_any_launcher_variable(clean_env):
    for key, value in SLURM_TASK_5_OF_16.items():
        clean_env.setenv(key, value)
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 16, 5, 8)
    assert not info.is_main


def test_submitit_exports_what_env_init_needs(clean_env):
    import submitit.helpers

    for key, value in SLURM_TASK_5_OF_16.items():
        clean_env.setenv(key, value)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "16"
    assert dist_info().rank == 5  # from RANK now, the same answer


def test_no_launcher_is_one_process(clean_env):
    info = dist_info()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)

"""Process-group start-up and the run directory every rank agrees on.

torchrun (or the DeepSpeed launcher, or Slurm through srun) starts the processes; Hydra runs inside each.
Each rank would resolve ``${now:...}`` on its own and could pick a different run directory (a known Hydra
pitfall), so before Hydra starts, rank 0's timestamp is broadcast over the process group and put in
CHUANLIU_RUN_STAMP, which the ``chuanliu_stamp`` resolver in conf/config.yaml reads.

When torchrun's elastic agent restarts the workers after a fault (``--max-restarts``), the new workers must land
in the same run directory to find its checkpoints. The agent's run id (TORCHELASTIC_RUN_ID: a fresh uuid per
``--standalone`` launch, the user's ``--rdzv-id`` otherwise, e.g. $SLURM_JOB_ID, which survives a requeue) is the
same across restarts, so rank 0 keeps the stamp in ``<cache>/elastic/<run id>.stamp`` and reuses it.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fault.progress import enable_flight_recorder

STAMP_ENV = "CHUANLIU_RUN_STAMP"
TIMEOUT_ENV = "CHUANLIU_PG_TIMEOUT_S"  # process-group timeout; tests set it short


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    env = os.environ
    if "RANK" not in env and env.get("SUBMITIT_EXECUTOR"):  # a task of Hydra's submitit launcher (Slurm/local)
        return _submitit_info()
    world = int(env.get("WORLD_SIZE", 1))
    return DistInfo(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))


def _submitit_info() -> DistInfo:
    import submitit  # noqa: PLC0415  (hydra-submitit-launcher's dependency)

    job = submitit.JobEnvironment()
    return DistInfo(rank=job.global_rank, local_rank=job.local_rank, world_size=job.num_tasks,
                    local_world_size=job.num_tasks // job.num_nodes)


def init_distributed() -> DistInfo:
    """Join the launcher's process group (env://) when WORLD_SIZE > 1, and share rank 0's run stamp.

    Launchers: torchrun and the DeepSpeed launcher set RANK/WORLD_SIZE/MASTER_*; a task of Hydra's submitit
    launcher (hydra/launcher=submitit_slurm, one task per GPU) gets them from submitit's own
    TorchDistributedEnvironment (Slurm's node list and task ids). Idempotent: the training job calls it again.
    """
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit.helpers  # noqa: PLC0415

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
            backend = "cpu:gloo,cuda:nccl"  # NCCL for GPU tensors, gloo for CPU-side objects
        else:
            backend = "gloo"
        enable_flight_recorder()  # per-group collective counts: the watchdog blames the rank that never entered
        dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(timeout), rank=info.rank,
                                world_size=info.world_size)
        if STAMP_ENV not in os.environ:
            stamp = [_elastic_stamp() if info.is_main else None]
            dist.broadcast_object_list(stamp, src=0)
            os.environ[STAMP_ENV] = stamp[0]
    elif STAMP_ENV not in os.environ:
        os.environ[STAMP_ENV] = _elastic_stamp()
    return info


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store (env://), with its keys scoped to this restart attempt where that is safe.

    torch 2.13's elastic agent shares one TCP store across restarts (unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
    so a restarted rank can read the gloo address a dead rank of the previous attempt published and fail with
    "Gloo connectFullMesh failed ... Connection refused" (seen here on 2 of 3 restarts; pytorch/pytorch#167288
    reports the same with NCCL). With one agent (torchrun --standalone, one node) every worker gets the same
    TORCHELASTIC_RESTART_COUNT, so a prefix per attempt makes each attempt start from empty keys. With several
    agents the counts can differ (an agent restarted for a membership change does not count it), so a prefix
    could split the ranks; there, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the launcher's environment (each
    round then gets a fresh store) -- rank 0 warns when it is missing.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # no launcher store, or a fresh one per round
    if int(env.get("GROUP_WORLD_SIZE", 1)) == 1:
        return dist.PrefixStore(f"chuanliu/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and int(env.get("RANK", 0)) == 0:
        warnings.warn("several torchrun agents share one store across restarts: a restarted job may fail to "
                      "connect (stale addresses); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
                      stacklevel=2)
    return store


def _elastic_stamp() -> str:
    """This launch's stamp: the one stored for this elastic run id if the agent restarted us, else now."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none" or not run_id.replace("-", "").replace("_", "").isalnum():
        return _now_stamp()
    from systems.data import resolve_cache_dir

    path = resolve_cache_dir("~/.cache/chuanliu") / "elastic" / f"{run_id}.stamp"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _now_stamp()
    path.write_text(stamp)
    return stamp


def _now_stamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _run_stamp() -> str:
    return os.environ.get(STAMP_ENV) or _now_stamp()


def _rank0_only(value: str) -> str | None:
    """``value`` on rank 0, None elsewhere: only rank 0 writes Hydra's .hydra/ files."""
    return value if dist_info().is_main else None


def _rank_suffix() -> str:
    rank = dist_info().rank
    return "" if rank == 0 else f"_rank{rank}"


def _sweep_group() -> str | None:
    """The wandb group of a Hydra multirun job: its sweep directory's name (runs of one sweep share it)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return f"sweep-{os.path.basename(hc.sweep.dir)}" if hc.mode == RunMode.MULTIRUN else None


def register_resolvers() -> None:
    for name, fn in {"chuanliu_stamp": _run_stamp, "chuanliu_rank0": _rank0_only,
                     "chuanliu_rank_suffix": _rank_suffix, "chuanliu_sweep_group": _sweep_group}.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
    from experiments.config import register_schemas  # noqa: PLC0415  (the option YAMLs' defaults)

    register_schemas()


register_resolvers()

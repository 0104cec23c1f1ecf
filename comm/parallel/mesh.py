"""The parallel layout: how many ranks replicate (dp), pipeline (pp) and split tensors (tp), and the device mesh.

Ranks are laid out row-major over ("dp", "pp", "tp"): tp is innermost, so a tensor-parallel group is consecutive
ranks, which launchers place on one node (tp exchanges activations every layer and needs the fast link). With
world 8, tp=2, pp=2: tp groups [0,1] [2,3] [4,5] [6,7]; pp groups [0,2] [1,3] [4,6] [5,7]; dp groups [0,4] [1,5] ...
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree: ranks that split each layer's weights (must divide n_heads)
    pp: int = 1  # pipeline-parallel degree: ranks that each hold a slice of the layers
    sequence_parallel: bool = False  # with tp>1: split norms/residual activations along the sequence too
    pp_schedule: str = "1F1B"  # pipeline schedule name (GPipe, 1F1B, Interleaved1F1B ...)
    pp_microbatches: int | None = None  # microbatches per step under pp; None: the schedule's default (pp)
    pp_virtual_stages: int = 1  # model chunks per pp rank (interleaved schedules use >1)

    def microbatches(self, grad_accum_steps: int) -> int:
        """The pipeline schedule's microbatches per step: ``pp_microbatches``, or the step's accumulation
        micro-batches, at least one per stage (pp x virtual stages)."""
        return self.pp_microbatches or max(grad_accum_steps, self.pp * self.pp_virtual_stages)

    def layout(self, world_size: int, n_heads: int | None = None, n_layers: int | None = None) -> dict:
        """{"dp", "pp", "tp", "world"} with dp = world / (tp*pp); ValueError naming the numbers when it does not fit."""
        for name in ("tp", "pp", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ValueError(f"parallel.pp_microbatches={self.pp_microbatches} must be >= 1 or None")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        model_ranks = self.tp * self.pp
        if world_size % model_ranks:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = "
                             f"{model_ranks}; change parallel.tp/parallel.pp so their product divides {world_size}, "
                             f"or launch a multiple of {model_ranks} ranks")
        if n_heads is not None and n_heads % self.tp:
            raise ValueError(f"parallel.tp={self.tp} does not divide model.n_heads={n_heads}; each tp rank must hold "
                             f"whole attention heads: pick tp among the divisors of {n_heads}")
        if n_layers is not None and n_layers % (self.pp * self.pp_virtual_stages):
            raise ValueError(f"pp*virtual stages = {self.pp}*{self.pp_virtual_stages} = "
                             f"{self.pp * self.pp_virtual_stages} does not divide model.n_layers={n_layers}; "
                             "change parallel.pp or parallel.pp_virtual_stages so every stage gets the same layers")
        return {"world": world_size, "dp": world_size // model_ranks, "pp": self.pp, "tp": self.tp}


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str, ranks_per_node: int | None = None,
               *, n_heads: int | None = None, n_layers: int | None = None):
    """(DeviceMesh with dims ("dp", "pp", "tp"), loggable dict of every group's ranks). Needs an initialised process
    group. ``ranks_per_node``: refuse a tp group that would span nodes (tp > ranks_per_node or not dividing it)."""
    from torch.distributed.device_mesh import init_device_mesh

    lay = cfg.layout(world_size, n_heads=n_heads, n_layers=n_layers)
    if ranks_per_node is not None:
        if cfg.tp > ranks_per_node:
            raise ValueError(f"parallel.tp={cfg.tp} exceeds the {ranks_per_node} ranks per node; tensor parallelism "
                             f"talks every layer and must stay inside a node: use tp <= {ranks_per_node}")
        if ranks_per_node % cfg.tp:
            raise ValueError(f"parallel.tp={cfg.tp} does not divide the {ranks_per_node} ranks per node, so some tp "
                             f"group would straddle two nodes; pick tp among the divisors of {ranks_per_node}")
    shape = (lay["dp"], lay["pp"], lay["tp"])
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "pp", "tp"))
    return mesh, describe_groups(shape, mesh.get_rank())


def describe_groups(shape: tuple[int, int, int], rank: int) -> dict:
    """Every dim's groups as rank lists (row-major, tp innermost) and this rank's coordinates; pure, for logs."""
    grid = torch.arange(shape[0] * shape[1] * shape[2]).reshape(shape)
    out: dict = {"shape": dict(zip(("dp", "pp", "tp"), shape))}
    for d, name in enumerate(("dp", "pp", "tp")):
        out[f"{name}_groups"] = grid.movedim(d, -1).reshape(-1, shape[d]).tolist()
    coord = (grid == rank).nonzero()[0].tolist()
    out["rank"] = rank
    out["coords"] = dict(zip(("dp", "pp", "tp"), coord))
    return out

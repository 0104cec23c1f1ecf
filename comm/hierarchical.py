"""Topology-aware (two-level) all-reduce: reduce inside each node, all-reduce across nodes, spread it back.

Start at ``hierarchical_all_reduce``; it needs the process groups that ``build_groups`` (``comm/topology.py``,
re-exported here) makes from a ``Topology``. ``flat_all_reduce`` is the baseline: the backend's own all-reduce
over every rank.

Why two levels: a flat ring over p ranks pushes 2(p-1)/p·n bytes through every node's NIC in 2(p-1) messages;
the hierarchical algorithm sends only 2(m-1)/m·n bytes per NIC in 2(m-1) messages for m nodes, and keeps the
rest on the fast intra-node links. ``comm/slowlink.py`` can emulate the slow inter-node link on one machine.

Algorithms (in place, SUM; results are bit-identical on every rank, as DDP replicas need):
- nodes of equal size l: reduce-scatter within the node (this rank keeps 1/l of the sum), all-reduce that
  shard among the ranks with the same local index on every node, all-gather within the node;
- nodes of unequal size: reduce to each node's first rank, all-reduce among those leaders, broadcast back;
- one node: a plain all-reduce within it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from comm.hooks import AlgorithmConfig
from comm.slowlink import SlowLink, flat_inter_node_delay, hierarchical_inter_node_delay
# The groups live with the topology they come from; re-exported here beside the collectives that use them.
from comm.topology import HierarchicalGroups, Topology, build_groups

__all__ = ["FlatAllReduce", "HierarchicalAllReduce", "HierarchicalGroups", "build_groups", "flat_all_reduce",
           "hierarchical_all_reduce"]

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch lacks the new names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# Group-relative dst/src avoid translating to global ranks; torch releases without them take the global rank.
_HAS_GROUP_DST = "group_dst" in inspect.signature(dist.reduce).parameters


def flat_all_reduce(tensor: torch.Tensor, *, group=None, link: SlowLink | None = None,
                    topo: Topology | None = None) -> None:
    """In-place SUM by the backend's own all-reduce, then the emulated inter-node delay if ``link`` is on."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    _contiguous_in_place(tensor, lambda work: dist.all_reduce(work, group=group))
    if link is not None and topo is not None:
        link.wait(flat_inter_node_delay(link, _nbytes(tensor), topo))


def hierarchical_all_reduce(tensor: torch.Tensor, groups: HierarchicalGroups, *,
                            link: SlowLink | None = None) -> None:
    """In-place SUM in two levels (module docstring); equals ``flat_all_reduce`` up to summation order."""
    topo = groups.topology
    if topo.world_size == 1 or tensor.numel() == 0:  # every rank holds the same size, so all skip together
        return
    if topo.n_nodes == 1:
        _contiguous_in_place(tensor, lambda work: dist.all_reduce(work, group=groups.intra))
        return
    delay = hierarchical_inter_node_delay(link, _nbytes(tensor), topo)
    if topo.uniform:
        _contiguous_in_place(tensor, lambda work: _shard_all_reduce(work.view(-1), groups, link, delay))
    else:
        _contiguous_in_place(tensor, lambda work: _leader_all_reduce(work, groups, link, delay))


def _shard_all_reduce(flat: torch.Tensor, groups: HierarchicalGroups, link: SlowLink | None,
                      delay: float) -> None:
    """Equal nodes: reduce-scatter in the node, all-reduce the shard across nodes, all-gather in the node."""
    topo = groups.topology
    per_node = len(topo.ranks_on(topo.node))
    n = flat.numel()
    pad = -n % per_node  # gloo's reduce-scatter needs the input divisible by the group size
    buf = flat if pad == 0 else torch.cat([flat, flat.new_zeros(pad)])  # (per_node * shard,)
    if per_node == 1:
        shard = buf
    else:
        shard = buf.new_empty(buf.numel() // per_node)
        _reduce_scatter(shard, buf, group=groups.intra)
    dist.all_reduce(shard, group=groups.inter)
    _maybe_wait(link, delay)
    if per_node > 1:
        _all_gather(buf, shard, group=groups.intra)
    if buf is not flat:
        flat.copy_(buf[:n])


def _leader_all_reduce(work: torch.Tensor, groups: HierarchicalGroups, link: SlowLink | None,
                       delay: float) -> None:
    """Unequal nodes: reduce to each node's first rank, all-reduce among leaders, broadcast in the node."""
    topo = groups.topology
    node_ranks = topo.ranks_on(topo.node)
    leader = node_ranks[0]  # new_group sorts ranks, so the leader is group rank 0 of its node's group
    alone = len(node_ranks) == 1
    if not alone:
        if _HAS_GROUP_DST:
            dist.reduce(work, group=groups.intra, group_dst=0)
        else:
            dist.reduce(work, dst=leader, group=groups.intra)
    if topo.rank == leader:
        dist.all_reduce(work, group=groups.leaders)
        _maybe_wait(link, delay)  # the node's other ranks wait for it in the broadcast below
    if not alone:
        if _HAS_GROUP_DST:
            dist.broadcast(work, group=groups.intra, group_src=0)
        else:
            dist.broadcast(work, src=leader, group=groups.intra)


def _contiguous_in_place(tensor: torch.Tensor, op: Callable[[torch.Tensor], None]) -> None:
    # NCCL refuses non-contiguous tensors and the shard path views the tensor flat: work on a dense copy.
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    op(work)
    if work is not tensor:
        tensor.copy_(work)


def _maybe_wait(link: SlowLink | None, seconds: float) -> None:
    if link is not None:
        link.wait(seconds)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# The comm/algorithm options that run these collectives through chuanliu's DDP hook (comm/hooks.py).

@dataclass(kw_only=True)
class FlatAllReduce(AlgorithmConfig):
    """comm/algorithm=flat: the backend's all-reduce over every rank (+ the emulated inter-node delay)."""

    name: str = "flat"
    overlaps_always: ClassVar[bool] = False  # comm/overlap decides

    def build(self, groups: HierarchicalGroups, link: SlowLink) -> Callable[[torch.Tensor], None]:
        topo = groups.topology
        return lambda t: flat_all_reduce(t, link=link, topo=topo)


@dataclass(kw_only=True)
class HierarchicalAllReduce(AlgorithmConfig):
    """comm/algorithm=hierarchical: the two-level all-reduce of this module."""

    name: str = "hierarchical"
    predictor_collective: ClassVar[str] = "hierarchical"
    overlaps_always: ClassVar[bool] = False

    def build(self, groups: HierarchicalGroups, link: SlowLink) -> Callable[[torch.Tensor], None]:
        return lambda t: hierarchical_all_reduce(t, groups, link=link)

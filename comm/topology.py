"""Which rank sits on which node: the map that topology-aware collectives (``comm/hierarchical.py``) follow.

Start at ``discover_topology``: every rank calls it and gets the same ``Topology`` (plus its own rank). Real
discovery exchanges hostnames; ``TopologyConfig(nodes=N)`` instead simulates N virtual nodes on one machine by
splitting the ranks into contiguous blocks, which is how a laptop or CI machine exercises the two-level
algorithms. Where NVML and GPUs exist, ``Topology.links`` records each local GPU's NVLink and PCIe facts
(informational: nothing here depends on them). ``build_groups`` turns a ``Topology`` into the intra-node,
inter-node and leader process groups that ``comm/hierarchical.py`` runs on.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch.distributed as dist


@dataclass(kw_only=True)
class TopologyConfig:
    # Simulate this many virtual nodes on one machine: ranks split into contiguous blocks, sizes as even as
    # possible (W=3, nodes=2 -> [0,1] [2]). null = discover the real nodes by hostname.
    nodes: int | None = None

    def __post_init__(self):
        if self.nodes is not None and self.nodes < 1:
            raise ValueError(f"comm.topology.nodes={self.nodes} must be at least 1; set it to a node count "
                             "or to null to discover the real nodes.")


@dataclass(frozen=True)
class Topology:
    rank: int  # this process's global rank
    world_size: int  # ranks in the default process group
    node_of_rank: tuple[int, ...]  # node index of every rank (nodes numbered in order of their lowest rank)
    simulated: bool  # True when the nodes are virtual (TopologyConfig.nodes), False when discovered
    source: str  # how nodes were found: "hostname exchange (LOCAL_WORLD_SIZE=2)", "simulated: 2 nodes"
    links: dict = field(default_factory=dict, hash=False)  # NVML facts per local GPU index; {} without NVML

    def __post_init__(self):
        if len(self.node_of_rank) != self.world_size or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Topology needs one node per rank and a rank below world_size="
                             f"{self.world_size}; build it with discover_topology.")
        if sorted(set(self.node_of_rank)) != list(range(len(set(self.node_of_rank)))):
            raise ValueError(f"Topology.node_of_rank={self.node_of_rank} must number its nodes 0..n-1; "
                             "build it with discover_topology.")

    @cached_property
    def _blocks(self) -> tuple[tuple[int, ...], ...]:
        # Computed once: collectives ask for the node layout on every call, and large worlds make it O(W).
        blocks: list[list[int]] = [[] for _ in range(max(self.node_of_rank) + 1)]
        for rank, node in enumerate(self.node_of_rank):
            blocks[node].append(rank)
        return tuple(map(tuple, blocks))

    @property
    def n_nodes(self) -> int:
        return len(self._blocks)

    @property
    def node(self) -> int:
        """This rank's node."""
        return self.node_of_rank[self.rank]

    def ranks_on(self, node: int) -> list[int]:
        """The global ranks on ``node``, ascending."""
        return list(self._blocks[node])

    @property
    def local_rank(self) -> int:
        """This rank's index within its node."""
        return self._blocks[self.node].index(self.rank)

    @property
    def uniform(self) -> bool:
        """All nodes hold the same number of ranks (the condition for per-local-rank inter-node groups)."""
        return len({len(block) for block in self._blocks}) == 1

    def describe(self) -> str:
        """One line, e.g. ``4 ranks on 2 nodes: [0,1] [2,3] (simulated)``."""
        blocks = " ".join(_format_ranks(self.ranks_on(n)) for n in range(self.n_nodes))
        how = "simulated" if self.simulated else "discovered by hostname"
        text = f"{self.world_size} ranks on {self.n_nodes} node{'s' * (self.n_nodes != 1)}: {blocks} ({how})"
        if self.links:
            nvlinks = sorted({gpu.get("nvlinks_active") for gpu in self.links.values()}, key=str)
            text += f"; {len(self.links)} local GPU(s), active NVLinks per GPU {nvlinks}"
        return text


def _format_ranks(ranks: list[int]) -> str:
    # Long contiguous blocks (a real 8-GPU node) read better as a range; short ones stay literal.
    if len(ranks) > 4 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"[{ranks[0]}-{ranks[-1]}]"
    return "[" + ",".join(map(str, ranks)) + "]"


def discover_topology(cfg: TopologyConfig) -> Topology:
    """This rank's view of the node layout. Collective: every rank of the default process group must call it.

    With no process group initialised the world is this one process. ``cfg.nodes`` simulates that many nodes;
    otherwise ranks are grouped by hostname.
    """
    rank, world = _rank_and_world()
    if cfg.nodes is not None:
        node_of_rank = _contiguous_blocks(world, cfg.nodes)
        simulated, source = True, f"simulated: {cfg.nodes} node{'s' * (cfg.nodes != 1)}"
    else:
        node_of_rank, source = _nodes_by_hostname(rank, world)
        simulated = False
    return Topology(rank=rank, world_size=world, node_of_rank=node_of_rank, simulated=simulated,
                    source=source, links=_nvml_links())


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _contiguous_blocks(world: int, nodes: int) -> tuple[int, ...]:
    """Node of each rank when ``world`` ranks form ``nodes`` contiguous blocks (the earlier ones larger)."""
    if not 1 <= nodes <= world:
        raise ValueError(f"comm.topology.nodes={nodes} must be between 1 and the world size {world}; "
                         "lower it or set it to null to discover the real nodes.")
    base, extra = divmod(world, nodes)
    sizes = [base + (n < extra) for n in range(nodes)]
    return tuple(n for n, size in enumerate(sizes) for _ in range(size))


def _nodes_by_hostname(rank: int, world: int) -> tuple[tuple[int, ...], str]:
    hosts: list[str] = [socket.gethostname()]
    if world > 1:
        hosts = [""] * world
        dist.all_gather_object(hosts, socket.gethostname())
    index: dict[str, int] = {}  # first appearance in rank order = node number
    node_of_rank = tuple(index.setdefault(h, len(index)) for h in hosts)
    local = os.environ.get("LOCAL_WORLD_SIZE")
    on_my_host = node_of_rank.count(node_of_rank[rank])
    # The launcher's count and the hostnames should agree; when they do not (containers sharing a hostname,
    # a hand-set environment), the hostnames win, but the run should say so.
    if local is not None and local.isdigit() and int(local) != on_my_host:
        warnings.warn(f"LOCAL_WORLD_SIZE={local} but {on_my_host} rank(s) share this host's name "
                      f"({socket.gethostname()}); grouping ranks by hostname.", stacklevel=3)
    return node_of_rank, f"hostname exchange (LOCAL_WORLD_SIZE={local if local is not None else 'unset'})"


def _nvml_links() -> dict:
    """NVLink and PCIe facts for every GPU NVML sees on this node, or {} when there is no NVML or no GPU."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return {}
    try:
        return {i: _gpu_links(pynvml, pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())}
    except (pynvml.NVMLError, AttributeError):  # AttributeError: an old pynvml lacking a call; never fatal
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _gpu_links(pynvml, handle) -> dict:
    name = pynvml.nvmlDeviceGetName(handle)
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "nvlinks_active": _active_nvlinks(pynvml, handle),
        "pcie_gen": _optional(pynvml, pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        "pcie_width": _optional(pynvml, pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        "pcie_max_gen": _optional(pynvml, pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        "pcie_max_width": _optional(pynvml, pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
    }


def _active_nvlinks(pynvml, handle) -> int:
    active = 0
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
        except pynvml.NVMLError:  # links past the GPU's count (or a GPU without NVLink) answer NotSupported
            continue
    return active


def _optional(pynvml, query, handle):
    # PCIe queries fail on some virtualised or SXM-only parts; one missing fact should not hide the others.
    try:
        return query(handle)
    except pynvml.NVMLError:
        return None


# Process groups for the two-level collectives (comm/hierarchical.py re-exports these two).

@dataclass
class HierarchicalGroups:
    topology: Topology  # the layout the groups were built from
    intra: object  # ProcessGroup of this rank's node (None without a process group)
    inter: object | None  # ProcessGroup of this rank's local index on every node; None unless uniform
    leaders: object  # ProcessGroup of each node's first rank; non-members hold new_group's sentinel


def build_groups(topo: Topology) -> HierarchicalGroups:
    """Create the intra-node, inter-node and leader groups. Collective: every rank must call it, in step.

    torch.distributed.new_group must be called by every rank for every group, members or not, in the same
    order; so each rank creates all groups (nodes, then local-index peer sets, then leaders), keeps its own.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if topo.world_size != 1:
            raise ValueError(f"the topology has {topo.world_size} ranks but no process group is initialised; "
                             "call torch.distributed.init_process_group before build_groups.")
        return HierarchicalGroups(topology=topo, intra=None, inter=None, leaders=None)
    if (dist.get_world_size(), dist.get_rank()) != (topo.world_size, topo.rank):
        raise ValueError(f"the topology describes rank {topo.rank} of {topo.world_size} but this is rank "
                         f"{dist.get_rank()} of {dist.get_world_size()}; build it with discover_topology "
                         "after init_process_group.")
    nodes = [topo.ranks_on(n) for n in range(topo.n_nodes)]
    intra = _new_groups(nodes, topo.rank)
    inter = _new_groups([list(peers) for peers in zip(*nodes)], topo.rank) if topo.uniform else None
    leaders = dist.new_group(ranks=[ranks[0] for ranks in nodes], use_local_synchronization=False)
    return HierarchicalGroups(topology=topo, intra=intra, inter=inter, leaders=leaders)


def _new_groups(rank_sets: list[list[int]], rank: int):
    """Create one group per rank set (every rank takes part in every creation); return ``rank``'s."""
    mine = None
    for ranks in rank_sets:
        group = dist.new_group(ranks=ranks, use_local_synchronization=False)
        if rank in ranks:
            mine = group
    return mine

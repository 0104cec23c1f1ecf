"""Topology discovery, group building, hierarchical vs flat all-reduce and the emulated slow link.

The first tests need no processes (formulas, Topology properties, a world of one). ``test_collectives``
spawns one gloo job per world size (2, 3, 4) and runs every check inside it, because spawning costs seconds
and checks cost milliseconds: each virtual node count, tensor size and dtype, group membership, errors and the
link delay.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.hierarchical import build_groups, flat_all_reduce, hierarchical_all_reduce
from comm.slowlink import LinkConfig, SlowLink, flat_inter_node_delay, hierarchical_inter_node_delay
from comm.topology import Topology, TopologyConfig, discover_topology
from comm.topology import build_groups as topology_build_groups
from tests.helpers import free_port, spawn

SIZES = (0, 1, 7, 1000, 4097)
KINDS = ("int64", "int32", "float32_ints", "float32_random", "int64_noncontiguous")
# (world, nodes) -> node of every rank: contiguous blocks, the larger ones first.
SPLITS = {
    (2, 1): (0, 0), (2, 2): (0, 1),
    (3, 1): (0, 0, 0), (3, 2): (0, 0, 1), (3, 3): (0, 1, 2),
    (4, 1): (0, 0, 0, 0), (4, 2): (0, 0, 1, 1), (4, 3): (0, 0, 1, 2), (4, 4): (0, 1, 2, 3),
}
DESCRIPTIONS = {
    (3, 2): "3 ranks on 2 nodes: [0,1] [2] (simulated)",
    (4, 2): "4 ranks on 2 nodes: [0,1] [2,3] (simulated)",
    (4, 3): "4 ranks on 3 nodes: [0,1] [2] [3] (simulated)",
}


def _topo(node_of_rank: tuple[int, ...], rank: int = 0) -> Topology:
    return Topology(rank=rank, world_size=len(node_of_rank), node_of_rank=node_of_rank, simulated=True,
                    source=f"simulated: {max(node_of_rank) + 1} nodes")


# ---------------------------------------------------------------- no processes

def _exactly(seconds: float):
    return pytest.approx(seconds, rel=1e-12)  # float rounding only


def test_flat_and_hierarchical_delay_follow_the_alpha_beta_formulas():
    link = SlowLink(LinkConfig(inter_alpha_us=10.0, inter_gbps=2.0))
    n = 1_200_000
    two_by_two, uneven = _topo((0, 0, 1, 1)), _topo((0, 0, 1))
    # p=4 on m=2 nodes. Flat ring: 2(p-1)=6 messages of 10 us; 6·n/4 = 1.8e6 bytes at 2e9 B/s = 900 us.
    assert flat_inter_node_delay(link, n, two_by_two) == _exactly(60e-6 + 900e-6)
    # Hierarchical: 2(m-1)=2 messages; 2·n/2 = 1.2e6 bytes = 600 us.
    assert hierarchical_inter_node_delay(link, n, two_by_two) == _exactly(20e-6 + 600e-6)
    # p=3 on unequal nodes [0,1] [2]: flat 4 messages, 4·n/3 = 1.6e6 bytes; leaders the same as m=2.
    assert flat_inter_node_delay(link, n, uneven) == _exactly(40e-6 + 800e-6)
    assert hierarchical_inter_node_delay(link, n, uneven) == _exactly(20e-6 + 600e-6)
    # p=8 on m=4: flat 14 messages, 14·n/8 = 2.1e6 bytes; hierarchical 6 messages, 6·n/4 = 1.8e6 bytes.
    eight = _topo((0, 0, 1, 1, 2, 2, 3, 3))
    assert flat_inter_node_delay(link, n, eight) == _exactly(140e-6 + 1050e-6)
    assert hierarchical_inter_node_delay(link, n, eight) == _exactly(60e-6 + 900e-6)


def test_delay_is_zero_without_a_link_or_a_node_boundary():
    link = SlowLink(LinkConfig(inter_alpha_us=10.0, inter_gbps=2.0))
    one_node = _topo((0, 0, 0, 0))
    assert flat_inter_node_delay(link, 1e6, one_node) == 0.0
    assert hierarchical_inter_node_delay(link, 1e6, one_node) == 0.0
    off = SlowLink(LinkConfig())
    assert not off.enabled and off.delay_s(6, 1e6) == 0.0
    assert flat_inter_node_delay(off, 1e6, _topo((0, 1))) == 0.0
    assert flat_inter_node_delay(None, 1e6, _topo((0, 1))) == 0.0
    latency_only = SlowLink(LinkConfig(inter_alpha_us=5.0))
    assert latency_only.enabled and latency_only.delay_s(4, 1e9) == _exactly(20e-6)
    bandwidth_only = LinkConfig(inter_gbps=1.0).build()
    assert bandwidth_only.enabled and bandwidth_only.delay_s(4, 1e6) == _exactly(1e-3)


def test_wait_lasts_at_least_the_requested_time():
    link = SlowLink(LinkConfig(inter_alpha_us=1.0))
    for seconds in (50e-6, 300e-6, 2e-3):
        t0 = time.perf_counter()
        link.wait(seconds)
        assert time.perf_counter() - t0 >= seconds


def test_bad_config_values_name_their_key():
    with pytest.raises(ValueError, match=r"comm\.link\.inter_gbps"):
        LinkConfig(inter_gbps=-1.0)
    with pytest.raises(ValueError, match=r"comm\.link\.inter_alpha_us"):
        LinkConfig(inter_alpha_us=-5.0)
    with pytest.raises(ValueError, match=r"comm\.topology\.nodes"):
        TopologyConfig(nodes=0)


def test_topology_properties_and_description():
    topo = _topo((0, 0, 0, 1, 1), rank=4)
    assert (topo.n_nodes, topo.node, topo.local_rank, topo.uniform) == (2, 1, 1, False)
    assert topo.ranks_on(0) == [0, 1, 2] and topo.ranks_on(1) == [3, 4]
    assert topo.describe() == "5 ranks on 2 nodes: [0,1,2] [3,4] (simulated)"
    wide = _topo(tuple(r // 8 for r in range(16)), rank=9)
    assert wide.uniform and wide.local_rank == 1
    assert wide.describe() == "16 ranks on 2 nodes: [0-7] [8-15] (simulated)"
    interleaved = Topology(rank=1, world_size=4, node_of_rank=(0, 1, 0, 1), simulated=False, source="test")
    assert interleaved.ranks_on(1) == [1, 3] and interleaved.local_rank == 0 and interleaved.uniform
    assert interleaved.describe() == "4 ranks on 2 nodes: [0,2] [1,3] (discovered by hostname)"


def test_a_world_of_one_without_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    topo = discover_topology(TopologyConfig())
    assert (topo.world_size, topo.n_nodes, topo.node_of_rank, topo.simulated) == (1, 1, (0,), False)
    assert topo.source.startswith("hostname exchange") and isinstance(topo.links, dict)
    with pytest.raises(ValueError, match=r"comm\.topology\.nodes"):
        discover_topology(TopologyConfig(nodes=2))
    groups = build_groups(topo)
    assert (groups.intra, groups.inter, groups.leaders) == (None, None, None)
    assert topology_build_groups is build_groups  # both import paths name the same function
    x, link = torch.arange(5.0), SlowLink(LinkConfig(inter_alpha_us=1e6))
    hierarchical_all_reduce(x, groups, link=link)
    flat_all_reduce(x, link=link, topo=topo)
    assert torch.equal(x, torch.arange(5.0))


def test_a_world_of_one_with_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        topo = discover_topology(TopologyConfig(nodes=1))
        groups = build_groups(topo)
        assert dist.get_process_group_ranks(groups.intra) == [0]
        assert dist.get_process_group_ranks(groups.inter) == [0]
        x = torch.arange(5)
        hierarchical_all_reduce(x, groups)
        flat_all_reduce(x)
        assert torch.equal(x, torch.arange(5))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- real processes

def _rank_data(kind: str, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s input; every rank rebuilds all the others', so each computes the exact sum itself."""
    g = torch.Generator().manual_seed(10_000 * size + 100 * KINDS.index(kind) + rank)
    if kind == "int64":
        return torch.randint(-10**12, 10**12, (size,), generator=g, dtype=torch.int64)
    if kind == "int32":
        return torch.randint(-10**6, 10**6, (size,), generator=g, dtype=torch.int32)
    if kind == "float32_ints":  # small integers: every summation order is exact in fp32
        return torch.randint(-1000, 1000, (size,), generator=g).float()
    if kind == "float32_random":
        return torch.randn(size, generator=g)
    # A transposed (columns, 3) view: not contiguous, so the collectives must work on a copy and write back.
    return torch.randint(-1000, 1000, (3, size), generator=g, dtype=torch.int64).t()


def _check_sums(groups, world: int, rank: int) -> None:
    for size in SIZES:
        for kind in KINDS:
            inputs = [_rank_data(kind, size, r) for r in range(world)]
            expected = sum(x.double() if kind == "float32_random" else x for x in inputs)
            hier, flat = inputs[rank].clone(), inputs[rank].clone()  # clone keeps a transposed view's strides
            assert hier.is_contiguous() == (kind != "int64_noncontiguous" or size <= 1)
            hierarchical_all_reduce(hier, groups)
            flat_all_reduce(flat)
            where = f"{kind} size {size} on {groups.topology.describe()}"
            if kind == "float32_random":
                torch.testing.assert_close(hier, flat, rtol=1e-5, atol=1e-5, msg=where)
                torch.testing.assert_close(hier.double(), expected, rtol=1e-5, atol=1e-5, msg=where)
                _check_identical_on_every_rank(hier, world, where)
            else:
                assert hier.dtype == inputs[rank].dtype and torch.equal(hier, flat), where
                assert torch.equal(hier, expected), where


def _check_identical_on_every_rank(x: torch.Tensor, world: int, where: str) -> None:
    # DDP replicas stay identical only if every rank receives bit-identical sums.
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    assert all(torch.equal(g, gathered[0]) for g in gathered), where


def _check_membership(groups) -> None:
    topo = groups.topology
    nodes = [topo.ranks_on(n) for n in range(topo.n_nodes)]
    assert dist.get_process_group_ranks(groups.intra) == nodes[topo.node]
    if topo.uniform:
        assert dist.get_process_group_ranks(groups.inter) == [ranks[topo.local_rank] for ranks in nodes]
    else:
        assert groups.inter is None
    leaders = [ranks[0] for ranks in nodes]
    if topo.rank in leaders:
        assert dist.get_process_group_ranks(groups.leaders) == leaders
    else:
        assert groups.leaders == dist.GroupMember.NON_GROUP_MEMBER


def _check_real_discovery(world: int) -> None:
    topo = discover_topology(TopologyConfig())
    assert (topo.node_of_rank, topo.simulated, topo.n_nodes) == ((0,) * world, False, 1)
    assert topo.source == f"hostname exchange (LOCAL_WORLD_SIZE={world})"
    ranks = ",".join(map(str, range(world)))
    assert topo.describe().startswith(f"{world} ranks on 1 node: [{ranks}] (discovered by hostname)")
    os.environ["LOCAL_WORLD_SIZE"] = str(world + 1)  # what a launcher with a wrong count would say
    try:
        with pytest.warns(UserWarning, match="LOCAL_WORLD_SIZE"):
            assert discover_topology(TopologyConfig()).n_nodes == 1  # hostnames win
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = str(world)


def _check_simulated(topo: Topology, world: int, nodes: int, rank: int) -> None:
    assert (topo.node_of_rank, topo.simulated, topo.rank) == (SPLITS[world, nodes], True, rank)
    assert topo.source == f"simulated: {nodes} node{'s' * (nodes != 1)}"
    if (world, nodes) in DESCRIPTIONS:
        assert topo.describe().startswith(DESCRIPTIONS[world, nodes])


def _check_slow_link(groups, world: int) -> None:
    topo = groups.topology
    # 10 ms per message dwarfs a loopback all-reduce of 16 kB, so a skipped delay cannot pass unnoticed.
    link = SlowLink(LinkConfig(inter_alpha_us=10_000.0, inter_gbps=0.01))  # 10 MB/s
    x = torch.ones(4097)
    dist.barrier()  # start together: a rank still in an earlier collective must not lend this one its time
    t0 = time.perf_counter()
    flat_all_reduce(x, link=link, topo=topo)
    flat_s = time.perf_counter() - t0
    assert flat_s >= flat_inter_node_delay(link, x.nbytes, topo) > 0
    dist.barrier()
    t0 = time.perf_counter()
    hierarchical_all_reduce(x, groups, link=link)
    hier_s = time.perf_counter() - t0
    assert hier_s >= hierarchical_inter_node_delay(link, x.nbytes, topo) > 0
    assert torch.equal(x, torch.full((4097,), float(world * world)))  # summed twice


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    _check_real_discovery(world)
    for nodes in range(1, world + 1):
        topo = discover_topology(TopologyConfig(nodes=nodes))
        _check_simulated(topo, world, nodes, rank)
        groups = build_groups(topo)
        _check_membership(groups)
        _check_sums(groups, world, rank)
        if nodes == 2:
            _check_slow_link(groups, world)
    with pytest.raises(ValueError, match=r"comm\.topology\.nodes=%d must be between 1 and" % (world + 1)):
        discover_topology(TopologyConfig(nodes=world + 1))
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.ok").write_text("ok")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_collectives(world, tmp_path):
    spawn(_worker, (world, free_port(), str(tmp_path)), world, timeout_s=120)
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == [f"rank{r}.ok" for r in range(world)]

"""Collectives as NCCL runs them: rings over rails, double binary trees, NVLink within a node.

Start at ``collective_s(kind, n_bytes, cluster, ranks, algo)``. What a multi-node ring really costs:

    NCCL builds one ring per channel through each node's GPUs over NVLink and leaves the node through the NIC of
    the ring's rail (rail-aligned: GPU i of every node talks through NIC i). With k rings over k NICs each NIC
    carries 1/k of the data, so the ring's bus bandwidth is the node's *aggregate* NIC bandwidth (capped by
    NVLink), not one GPU's share of it: 8 x 200 Gb/s HDR gives ~185 GB/s of all-reduce busbw, as nccl-tests show
    on such clusters (docs/predictor.md, the collective validation). Time = latency + factor * n / busbw, with
    nccl-tests' factors: all-reduce 2(p-1)/p, all-gather and reduce-scatter (p-1)/p.

    Latency follows NCCL's own tuning model (src/graph/tuning.cc, Simple and LL128 protocols): a ring all-reduce
    pays a base latency plus one hop per step, 2(p-1) steps of which 2 x nodes cross the network; a tree
    all-reduce pays 2 x ((ranks per node - 1) intra hops + log2(nodes) network hops). Rings win at large messages
    on few nodes, trees on many nodes (a 1024-GPU Simple ring pays ~8 ms per collective). ``algo='auto'`` picks
    the fastest (algorithm, protocol), as NCCL's tuner does; trees exist only for all-reduce. Tree bandwidth is
    0.92 of the ring's (NCCL scales tree busbw down by the same factor in its tuner).

    chuanliu's ``hierarchical`` all-reduce (comm/hierarchical.py) is written out as its three NCCL calls:
    intra-node reduce-scatter, inter-node all-reduce of n/g bytes per rail, intra-node all-gather.

    Trees also move less data across the network: on two nodes each node sends n bytes where a ring sends ~2n, so
    2-node all-reduce busbw exceeds the NIC line rate. H100/H200 SXM add NVLink SHARP (NVLS: the NVSwitch
    reduces; ~480 GB/s busbw in a node) and NVLSTree across nodes; NCCL takes them for large all-reduces.

Left out: InfiniBand SHARP (CollNet), NCCL's LL protocol, PAT, per-version tuning differences (published runs of
one cluster vary 2x with the NCCL and plugin versions: docs/predictor.md), and congestion across jobs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.predictor.inputs import GB, Cluster

KINDS = ("allreduce", "allgather", "reducescatter")
# NCCL's tuning model (src/graph/tuning.cc, 2.18-2.21), microseconds: base latency per (algorithm, protocol) and
# per-hop latency by link. LL128 pays less per hop than Simple at ~92% of its bandwidth (NCCL enables it on
# NVLink A100/H100 systems); NCCL picks the (algorithm, protocol) with the least modelled time, as here.
BASE_LAT_US = {("ring", "simple"): 8.4, ("ring", "ll128"): 10.0, ("tree", "simple"): 0.0, ("tree", "ll128"): 4.4}
HOP_LAT_US = {("ring", "simple", "nvlink"): 3.4, ("ring", "simple", "net"): 9.6,
              ("ring", "ll128", "nvlink"): 1.9, ("ring", "ll128", "net"): 4.0,
              ("tree", "simple", "nvlink"): 28.0, ("tree", "simple", "net"): 28.0,
              ("tree", "ll128", "nvlink"): 1.25, ("tree", "ll128", "net"): 8.5}
PROTOCOL_BW = {"simple": 1.0, "ll128": 0.92}
PROTOCOLS = tuple(PROTOCOL_BW)
TREE_BW_FACTOR = 0.92
NVLS_LAT_US = 40.0  # NCCL's NVLS base latency (tuning.cc, Simple): worth it only for large messages


@dataclass(frozen=True)
class Cost:
    """t(n) = latency_s + factor * n / busbw_Bps for one collective of n bytes over ``ranks`` GPUs."""

    algo: str
    latency_s: float
    busbw_Bps: float
    factor: float

    def time_s(self, n_bytes: float) -> float:
        return 0.0 if self.factor == 0 else self.latency_s + self.factor * n_bytes / self.busbw_Bps


def _factor(kind: str, p: int) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; choose one of {KINDS}")
    return 0.0 if p <= 1 else (2.0 if kind == "allreduce" else 1.0) * (p - 1) / p


def _span(cluster: Cluster, ranks: int) -> tuple[int, int]:
    """(nodes, GPUs per node) a group of ``ranks`` consecutive ranks spans."""
    per_node = min(ranks, cluster.gpus_per_node)
    return math.ceil(ranks / per_node), per_node


def ring_busbw_Bps(cluster: Cluster, ranks: int) -> float:
    nodes, _ = _span(cluster, ranks)
    nvlink = cluster.gpu.nvlink_busbw_gbps * GB
    return nvlink if nodes == 1 else min(nvlink, cluster.node_net_Bps)


def tree_net_busbw_Bps(cluster: Cluster, ranks: int) -> float:
    """Bus bandwidth the network allows a double-binary-tree all-reduce. Each node sends c x n bytes: on two
    nodes c = 1 (each tree root exchanges half the data once each way), from four nodes on c = 2 (an interior
    node forwards to two children), where a ring sends 2(p-1)/p x n. So on two nodes a tree moves ~1.9x the
    ring's busbw through the same NICs (busbw above the NIC line rate, as published 2-node runs show)."""
    nodes, _ = _span(cluster, ranks)
    c = min(2.0, nodes / 2)
    return _factor("allreduce", ranks) * cluster.node_net_Bps / c


def cost(kind: str, cluster: Cluster, ranks: int, algo: str, proto: str = "simple") -> Cost:
    """One NCCL collective with a given algorithm (ring, tree, nvls, nvlstree) and protocol (simple, ll128)."""
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown NCCL protocol {proto!r}; choose one of {PROTOCOLS}")
    factor = _factor(kind, ranks)
    nodes, per_node = _span(cluster, ranks)
    nvlink = cluster.gpu.nvlink_busbw_gbps * GB
    if algo == "ring":
        steps = (2 if kind == "allreduce" else 1) * (ranks - 1)
        inter = (2 if kind == "allreduce" else 1) * nodes if nodes > 1 else 0
        lat = (BASE_LAT_US["ring", proto] + (steps - inter) * HOP_LAT_US["ring", proto, "nvlink"]
               + inter * HOP_LAT_US["ring", proto, "net"])
        return Cost(f"ring/{proto}", lat * 1e-6, ring_busbw_Bps(cluster, ranks) * PROTOCOL_BW[proto], factor)
    if kind != "allreduce" or algo not in ("tree", "nvls", "nvlstree"):
        if algo in ("tree", "nvls", "nvlstree"):
            raise ValueError(f"NCCL has no {algo} {kind} here; use algo ring or auto")
        raise ValueError(f"unknown NCCL algorithm {algo!r}; choose ring, tree, nvls, nvlstree or auto")
    levels = math.ceil(math.log2(nodes)) if nodes > 1 else 0
    net_hops = levels * HOP_LAT_US["tree", proto, "net"]
    if algo == "tree":
        lat = BASE_LAT_US["tree", proto] + 2 * ((per_node - 1) * HOP_LAT_US["tree", proto, "nvlink"] + net_hops)
        bw = min(nvlink, tree_net_busbw_Bps(cluster, ranks)) if nodes > 1 else nvlink
        return Cost(f"tree/{proto}", lat * 1e-6, TREE_BW_FACTOR * bw * PROTOCOL_BW[proto], factor)
    nvls = cluster.gpu.nvls_busbw_gbps * GB  # NVLink SHARP: the NVSwitch reduces, so the node's GPUs send once
    if not nvls or proto != "simple":
        raise ValueError(f"{cluster.gpu.name} has no NVLink SHARP (NVLS needs NVSwitch gen 3: H100/H200 SXM)")
    if algo == "nvls":
        return Cost("nvls/simple", NVLS_LAT_US * 1e-6, nvls if nodes == 1 else min(nvls, ring_busbw_Bps(
            cluster, ranks)), factor)
    return Cost("nvlstree/simple", (NVLS_LAT_US + 2 * net_hops) * 1e-6,
                min(nvls, TREE_BW_FACTOR * tree_net_busbw_Bps(cluster, ranks)) if nodes > 1 else nvls, factor)


def best_cost(kind: str, n_bytes: float, cluster: Cluster, ranks: int, algo: str = "auto") -> Cost:
    """The algorithm and protocol NCCL would pick for this size (``auto``), or the algorithm set (NCCL_ALGO)."""
    nodes = _span(cluster, ranks)[0]
    if algo == "auto":
        algos = ["ring"]
        if kind == "allreduce":
            algos += ["tree"] if nodes > 1 else []
            algos += (["nvls"] if nodes == 1 else ["nvlstree"]) if cluster.gpu.nvls_busbw_gbps else []
    else:
        algos = ["ring" if (algo != "ring" and kind != "allreduce") else algo]
    options = [cost(kind, cluster, ranks, a, p) for a in algos for p in PROTOCOLS
               if not (a.startswith("nvls") and p != "simple")]
    return min(options, key=lambda c: c.time_s(n_bytes))


def collective_s(kind: str, n_bytes: float, cluster: Cluster, ranks: int | None = None, algo: str = "auto",
                 collective: str = "nccl") -> float:
    """Seconds for one collective of ``n_bytes`` (the full buffer) over ``ranks`` GPUs (default: all)."""
    p = cluster.gpus if ranks is None else ranks
    if p <= 1:
        return 0.0
    if collective == "nccl":
        return best_cost(kind, n_bytes, cluster, p, algo).time_s(n_bytes)
    if collective != "hierarchical":
        raise ValueError(f"unknown collective {collective!r}; choose nccl or hierarchical")
    nodes, g = _span(cluster, p)
    if nodes == 1 or kind != "allreduce":  # chuanliu's hierarchical path covers all-reduce; else NCCL's
        return best_cost(kind, n_bytes, cluster, p, algo).time_s(n_bytes)
    intra = best_cost("reducescatter", n_bytes, cluster, g, "ring")
    inter = best_cost("allreduce", n_bytes / g, rail_cluster(cluster, nodes), nodes, algo)
    return 2 * intra.time_s(n_bytes) + inter.time_s(n_bytes / g)


def rail_cluster(cluster: Cluster, nodes: int) -> Cluster:
    """The same-local-rank GPUs of ``nodes`` nodes as a group of their own: one GPU per node, each with its rail's
    share of the node's NICs (what the inter-node step of a hierarchical or hybrid-sharded collective runs on)."""
    return Cluster(name="rail", gpu=cluster.gpu, gpus=nodes, gpus_per_node=1, nics_per_node=1,
                   nic_gbps=cluster.nics_per_node * cluster.nic_gbps / cluster.gpus_per_node,
                   net_efficiency=cluster.net_efficiency)


def busbw_gbps(kind: str, n_bytes: float, cluster: Cluster, ranks: int | None = None, algo: str = "auto") -> float:
    """nccl-tests' busbw (GB/s) the model predicts: factor * n / time."""
    p = cluster.gpus if ranks is None else ranks
    t = collective_s(kind, n_bytes, cluster, p, algo)
    return _factor(kind, p) * n_bytes / t / GB if t > 0 else math.inf


def alpha_beta(kind: str, n_bytes: float, cluster: Cluster, ranks: int, algo: str, collective: str
               ) -> tuple[float, float]:
    """A linear (alpha, beta) fit of the collective around ``n_bytes``, for comm/buckets.py's simulation."""
    t1, t2 = (collective_s(kind, n, cluster, ranks, algo, collective) for n in (n_bytes, 2 * n_bytes))
    beta = max(0.0, (t2 - t1) / n_bytes)
    return max(0.0, t1 - beta * n_bytes), beta

"""Pipeline parallelism: each schedule's bubble and in-flight micro-batches, and the sends between stages.

Start at ``SCHEDULES``. Notation: p stages, m micro-batches per step (per pipeline), v model chunks per GPU;
T_F, T_B, T_W one stage's forward, input-gradient backward and weight-gradient backward of one micro-batch
(T_B + T_W is the whole backward, recomputation included). The ideal step is m (T_F + T_B + T_W); the bubble is
the idle time a schedule adds to it, in the papers' own terms:

    schedule     bubble time                    fraction of the ideal         in flight on stage 1
    gpipe        (p-1)(T_F+T_B+T_W)             (p-1)/m                       m
    1f1b         (p-1)(T_F+T_B+T_W)             (p-1)/m                       min(p, m)
    interleaved  (p-1)(T_F+T_B+T_W)/v           (p-1)/(v m)                   min(p, m) (1 + (p-1)/(p v))
    zb_h1        (p-1)(T_F+T_B-T_W)             (p-1)/(3m) at T_F=T_B=T_W     min(p, m)
    zb_h2        (p-1)(T_F+T_B-2T_W), >= 0      0 at T_F=T_B=T_W              min(2p-1, m)
    zb_v         (p-1)(T_F+T_B-2T_W)/2, >= 0    0 at T_F=T_B=T_W              min(p, m)

Sources: GPipe, Huang et al. 2019, with the bubble as Narayanan et al. 2021 §2.2.1 state it; 1F1B is
PipeDream-Flush, Narayanan et al. 2021 §2.2.1; interleaved, Narayanan et al. 2021 §2.2.2 (m divisible by p),
its memory factor Korthikanti et al. 2022 §4.2.3; zb_h1 and zb_h2, Qi et al. 2024 (Zero Bubble Pipeline
Parallelism, ICLR) §2.1-2.2; zb_v, Qi et al., arXiv 2401.10241 v2 (2 chunks per GPU, twice the sends).

The zero-bubble rows' numbers at T_F = T_B = T_W are the authors' (their schedule table: 1F1B (p-1)/m, ZB-H1
(p-1)/3m, ZB-H2 and ZB-V 0; activation memory 1x, 1x, 2x, 1x of 1F1B; P2P volume 1x, 1x, 1x, 2x). ZB-V away from
equal times is our assumption: ZB-H2's expression on its half-size chunks. The zero-bubble schedules also assume
the optimizer step's global synchronisation is bypassed (their post-validation); we do not charge it.

Sends: each micro-batch crosses every stage boundary once forward (activations) and once backward (their
gradient), b x s x h elements, per chunk. Megatron-LM's scatter/gather (Narayanan et al. 2021 §4.1, on by default)
has each of the tp ranks send 1/tp of it over its own rail's NIC and all-gather it over NVLink at the receiver;
without it every TP rank sends the whole tensor over its rail. Adjacent stages are on different nodes (Megatron's
rank order puts TP, then DP, innermost) unless the whole job fits on one node. Megatron-LM's sends are blocking
(2021), so they sit on the critical path: twice per micro-batch and chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.predictor import collectives as coll
from analysis.predictor.inputs import GB, Cluster


@dataclass(frozen=True)
class Schedule:
    name: str
    source: str
    chunks: str  # "one" (v = 1), "v" (any v >= 2), "two" (exactly 2)
    needs_m_divisible_by_p: bool = False

    def bubble_s(self, p: int, v: int, t_f: float, t_b: float, t_w: float) -> float:
        """Idle seconds per step of one GPU whose stage (all its chunks) takes t_f, t_b, t_w per micro-batch."""
        if p <= 1:
            return 0.0
        if self.name in ("gpipe", "1f1b"):
            return (p - 1) * (t_f + t_b + t_w)
        if self.name == "interleaved":
            return (p - 1) * (t_f + t_b + t_w) / v
        if self.name == "zb_h1":
            return (p - 1) * max(0.0, t_f + t_b - t_w)
        if self.name == "zb_h2":
            return (p - 1) * max(0.0, t_f + t_b - 2 * t_w)
        return (p - 1) * max(0.0, t_f + t_b - 2 * t_w) / 2  # zb_v

    def bubble_fraction(self, p: int, m: int, v: int = 1, t_f: float = 1.0, t_b: float = 1.0,
                        t_w: float = 1.0) -> float:
        """Bubble / ideal time, m (T_F + T_B + T_W): (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved."""
        return self.bubble_s(p, v, t_f, t_b, t_w) / (m * (t_f + t_b + t_w))

    def in_flight(self, p: int, m: int, v: int = 1) -> float:
        """Micro-batches whose activations the first stage holds at its peak (its layers' worth each)."""
        if self.name == "gpipe":
            return float(m)
        if self.name == "interleaved":
            return min(p, m) * (1 + (p - 1) / (p * v))
        if self.name == "zb_h2":
            return float(min(2 * p - 1, m))
        return float(min(p, m))


SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    Schedule("gpipe", "Huang et al. 2019 (GPipe); bubble (p-1)/m as Narayanan et al. 2021 §2.2.1 state it", "one"),
    Schedule("1f1b", "PipeDream-Flush, Narayanan et al. 2021 §2.2.1: bubble (p-1)/m, p micro-batches in flight",
             "one"),
    Schedule("interleaved", "Narayanan et al. 2021 §2.2.2: bubble (p-1)/(v m), m divisible by p; memory x "
                            "(1 + (p-1)/(p v)) (Korthikanti et al. 2022)", "v", needs_m_divisible_by_p=True),
    Schedule("zb_h1", "Qi et al. 2024 §2.1 (ZB-H1): bubble (p-1)(T_F+T_B-T_W), 1F1B's memory", "one"),
    Schedule("zb_h2", "Qi et al. 2024 §2.2 (ZB-H2): bubble (p-1)(T_F+T_B-2T_W), 2p-1 micro-batches in flight",
             "one"),
    Schedule("zb_v", "Qi et al. 2024, arXiv 2401.10241 v2 (ZB-V): zero bubble at T_F=T_B=T_W with 1F1B's memory, "
                     "2 chunks, 2x P2P", "two"),
]}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def p2p_s(n_bytes: float, cluster: Cluster, tp: int, scatter_gather: bool = True) -> float:
    """One send of an activation (or its gradient) of ``n_bytes`` between adjacent stages, as the receiving TP
    group sees it: over each rank's rail NIC (1/tp of it with scatter/gather, then an NVLink all-gather), or over
    NVLink when the whole job is on one node."""
    lat = (coll.BASE_LAT_US["ring", "simple"] + coll.HOP_LAT_US["ring", "simple", "net"]) * 1e-6
    if cluster.gpus <= cluster.gpus_per_node:
        return lat + n_bytes / (cluster.gpu.nvlink_busbw_gbps * GB)
    rail_Bps = cluster.node_net_Bps / cluster.gpus_per_node  # one GPU's share: its own NIC on a rail-aligned node
    if scatter_gather and tp > 1:
        return lat + n_bytes / tp / rail_Bps + coll.collective_s("allgather", n_bytes, cluster, tp, "ring")
    return lat + n_bytes / rail_Bps

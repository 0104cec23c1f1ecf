"""Pipeline parallelism: each schedule's bubble and in-flight micro-batches, and the sends between stages.

The schedules (``SCHEDULES``, keyed by the papers' names: gpipe, 1f1b, interleaved, looped_bfs, zb_h1, zb_h2, zb_v,
dualpipe_v) are comm/schedules.py's, the one table the trainer's pipeline reads too: their bubble in the papers'
terms (``Schedule.bubble_s``, ``bubble_fraction`` of the ideal step m (T_F + T_B + T_W)), the micro-batches in flight
on stage 1 (``in_flight``), chunks per GPU and Megatron-LM's m-divisible-by-p rule, with the sources. Only pure
formulas cross over (no torch), as analysis/ reads comm/buckets.py's bucket rules.

Sends: each micro-batch crosses every stage boundary once forward (activations) and once backward (their
gradient), b x s x h elements, per chunk. Megatron-LM's scatter/gather (Narayanan et al. 2021 §4.1, on by default)
has each of the tp ranks send 1/tp of it over its own rail's NIC and all-gather it over NVLink at the receiver;
without it every TP rank sends the whole tensor over its rail. Adjacent stages are on different nodes (Megatron's
rank order puts TP, then DP, innermost) unless the whole job fits on one node. Megatron-LM's sends are blocking
(2021), so they sit on the critical path: twice per micro-batch and chunk.
"""
from __future__ import annotations

from analysis.predictor import collectives as coll
from analysis.predictor.inputs import GB, Cluster
from comm.schedules import SCHEDULES, Schedule, get_schedule

__all__ = ["SCHEDULES", "Schedule", "get_schedule", "p2p_s"]


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

"""An emulated slow inter-node link, so one machine can show what topology-aware collectives buy on a cluster.

Start at ``LinkConfig`` (the α-β parameters) and the helpers ``flat_inter_node_delay`` and
``hierarchical_inter_node_delay``; ``comm/hierarchical.py`` calls them after its inter-node phase.

Method: a calibrated delay injector in the inter-node path. Only loopback exists here (no second NIC, no
traffic shaping), so the real collective runs over gloo on loopback and afterwards every rank sleeps for the
time the α-β model gives the bytes that would have crossed the node boundary:

    delay = messages · α + bytes_per_NIC / β

- Flat ring all-reduce of n bytes over p ranks spanning m > 1 nodes (each node a contiguous block of ranks,
  as torchrun places them): 2(p-1) steps (reduce-scatter, then all-gather), each moving n/p bytes across
  every node boundary, so per NIC direction 2(p-1)·n/p bytes in 2(p-1) messages:
  ``delay_s(2(p-1), 2(p-1)·n/p)``.
- Hierarchical all-reduce, inter-node phase: a ring all-reduce among the m nodes. With l ranks on every node,
  l peer groups run at once over the same NIC, each reducing n/l bytes: per NIC
  2(m-1)·(n/l)/m·l = 2(m-1)·n/m bytes in 2(m-1) messages: ``delay_s(2(m-1), 2(m-1)·n/m)``. Nodes of unequal
  size send the whole n through one leader per node: the same formula. The intra-node phases ride on NVLink
  or shared memory and are not delayed.

Limits:
- Bandwidth sharing is modelled by the formula, not by real packets: no congestion dynamics, no jitter, and
  every rank sleeps the same modelled time.
- Sleep precision is tens of microseconds (``time.sleep`` for the bulk, a spin on ``perf_counter`` for the
  last ~200 µs), so per-message latencies well below that are honoured in sum, not message by message.
- The delay adds to, rather than replaces, the loopback transfer time, which stays in any measurement: report
  the undelayed time beside the delayed one.
- The flat formula assumes the collective spans every rank of the topology in rank order; a subgroup or an
  interleaved rank placement crosses node boundaries differently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from comm.topology import Topology

_SPIN_S = 200e-6  # the tail of a wait spent spinning: time.sleep overshoots by up to ~100 µs on Linux


@dataclass(kw_only=True)
class LinkConfig:
    inter_alpha_us: float = 0.0  # emulated inter-node latency per message (microseconds); 0 = no emulation
    inter_gbps: float = 0.0  # emulated inter-node bandwidth per node NIC (GB/s, 1e9 bytes); 0 = unlimited

    def __post_init__(self):
        for key in ("inter_alpha_us", "inter_gbps"):
            if getattr(self, key) < 0:
                raise ValueError(f"comm.link.{key}={getattr(self, key)} is negative; set it to 0 (off) or a "
                                 "positive value.")

    def build(self) -> "SlowLink":
        return SlowLink(self)


class SlowLink:
    """Turns an α-β link model into sleeps: ``delay_s`` prices a transfer, ``wait`` spends it."""

    def __init__(self, cfg: LinkConfig):
        self.cfg = cfg
        self.alpha_s = cfg.inter_alpha_us * 1e-6
        self.bytes_per_s = cfg.inter_gbps * 1e9

    @property
    def enabled(self) -> bool:
        return self.alpha_s > 0 or self.bytes_per_s > 0

    def delay_s(self, messages: int, bytes_per_nic: float) -> float:
        """Seconds the modelled link takes for ``messages`` messages carrying ``bytes_per_nic`` per NIC."""
        bandwidth_s = bytes_per_nic / self.bytes_per_s if self.bytes_per_s > 0 else 0.0
        return messages * self.alpha_s + bandwidth_s

    def wait(self, seconds: float) -> None:
        """Block for ``seconds``, precisely: sleep for the bulk, spin on the clock for the last ~200 µs."""
        if seconds <= 0:
            return
        end = time.perf_counter() + seconds
        if seconds > _SPIN_S:
            time.sleep(seconds - _SPIN_S)
        while time.perf_counter() < end:
            pass


def flat_inter_node_delay(link: SlowLink | None, nbytes: float, topo: Topology) -> float:
    """Modelled inter-node seconds of a flat ring all-reduce of ``nbytes`` over all of ``topo``'s ranks."""
    if link is None or not link.enabled or topo.n_nodes <= 1:
        return 0.0
    steps = 2 * (topo.world_size - 1)
    return link.delay_s(steps, steps * nbytes / topo.world_size)


def hierarchical_inter_node_delay(link: SlowLink | None, nbytes: float, topo: Topology) -> float:
    """Modelled seconds of a hierarchical all-reduce's inter-node phase (a ring over nodes) of ``nbytes``."""
    if link is None or not link.enabled or topo.n_nodes <= 1:
        return 0.0
    steps = 2 * (topo.n_nodes - 1)
    return link.delay_s(steps, steps * nbytes / topo.n_nodes)

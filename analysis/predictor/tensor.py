"""Tensor- and sequence-parallel collectives of one decoder layer (Megatron-LM), on the link the TP group spans.

Without sequence parallelism (Shoeybi et al. 2019, Fig. 3; Narayanan et al. 2021 §3.2): each layer all-reduces
its b x s x h activations twice in forward (after the attention's o_proj and the MLP's down projection: the ``g``
operator) and twice in backward (the input gradients at the ``f`` operator). With sequence parallelism
(Korthikanti et al. 2022 §4.2.2) each all-reduce becomes a reduce-scatter and an all-gather of the same volume:
forward, all-gather before QKV and the MLP, reduce-scatter after o_proj and down; backward, the reverse; plus an
all-gather of the sequence-sharded input that each weight gradient needs again, which Megatron issues
asynchronously beside the input-gradient GEMM (so it only slows that GEMM: ``overlapped_s``). Full recomputation
(Megatron's checkpoint re-runs the whole layer) repeats the forward's collectives in backward; selective
recomputation repeats none. The vocabulary-parallel embedding adds one all-reduce (forward, first stage), the
LM head's input one (backward, last stage): ``edge_s``.

The TP group is ``tp`` consecutive ranks: one node's NVLink when tp <= GPUs per node, else it spans nodes
(collectives.py's rings and trees over the rails). Megatron-LM runs these on the compute stream: they are exposed.
With tp = 1 there is nothing to communicate.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.predictor import collectives as coll
from analysis.predictor.inputs import Cluster, ModelShape, Techniques


@dataclass(frozen=True)
class TensorComm:
    """Seconds per decoder layer and micro-batch on one TP rank."""

    forward_s: float  # exposed, in the forward pass
    backward_s: float  # exposed, in the backward pass (a full recomputation's forward collectives included)
    overlapped_s: float  # beside the input-gradient GEMMs (sequence parallelism's re-gathers)
    edge_s: float  # one all-reduce of b x s x h: the embedding's (forward) or the LM head input's (backward)


def layer_comm(m: ModelShape, c: Cluster, t: Techniques, tp: int, sp: bool, seq: int, mb: int) -> TensorComm:
    if tp <= 1:
        return TensorComm(0.0, 0.0, 0.0, 0.0)
    n = mb * seq * m.dim * t.act_bytes  # the full activation, the collective's whole buffer
    ar = coll.collective_s("allreduce", n, c, tp, t.nccl_algo)
    if sp:
        ag = coll.collective_s("allgather", n, c, tp, t.nccl_algo)
        rs = coll.collective_s("reducescatter", n, c, tp, t.nccl_algo)
        fwd, bwd, hidden = 2 * (ag + rs), 2 * (ag + rs), 2 * ag
    else:
        fwd, bwd, hidden = 2 * ar, 2 * ar, 0.0
    if t.recompute == "full":
        bwd += fwd
    return TensorComm(fwd, bwd, hidden, ar)

"""Will this run fit? Memory per rank before anything is allocated: the engine's states plus the activations.

    estimate_memory(...)  the engine's weights, gradients, optimizer state and buffers (its config's
                          ``state_bytes``: ZeRO stage, FSDP2 sharding over the data-parallel size) plus one
                          micro-batch's saved activations (systems.memory.activation_estimate, Korthikanti et al.'s
                          per-operator count for this model, fusion, splitting and precision) plus the largest
                          temporary of forward or backward
    check_fits(...)       refuses only a run that cannot fit on the device, saying by how much and what would

The estimate lands in summary.json (``memory_estimate``) next to the measured peak, so every run checks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.flops import total_params
from experiments.config import ConfigError
from systems.memory import activation_estimate, total_memory_bytes
from systems.model import ModelConfig

GIB = 2**30
# Of the device's memory, what the estimate may fill: the CUDA context, cuBLAS/cuDNN workspaces and the caching
# allocator's fragmentation sit outside torch's allocated bytes (a few GiB on an 80 GB card).
USABLE_FRACTION = 0.92


@dataclass(frozen=True)
class MemoryEstimate:
    states: dict[str, float]  # weights, grads, optimizer, buffers
    activations: dict[str, float]  # systems.memory.activation_estimate's parts (one micro-batch)
    transient: float  # the largest temporary on top at the peak (loss logits and gradients, a layer's backward)
    grad_bytes: int = 4  # bytes per gradient element as the engine reduces them (sizes buckets in elements)

    @property
    def total(self) -> float:
        return sum(self.states.values()) + self.activations["total"] + self.transient

    def as_dict(self) -> dict:
        return {"total_bytes": self.total, "states": self.states, "activations": self.activations,
                "transient_bytes": self.transient, "total_gib": round(self.total / GIB, 3)}

    def describe(self) -> str:
        s, a = self.states, self.activations
        return (f"{self.total / GIB:.1f} GiB = weights {s['weights'] / GIB:.1f} + grads {s['grads'] / GIB:.1f} + "
                f"optimizer {s['optimizer'] / GIB:.1f} + engine buffers {s['buffers'] / GIB:.1f} + activations "
                f"{a['total'] / GIB:.1f} + temporaries {self.transient / GIB:.1f}")


def estimate_memory(model_cfg: ModelConfig, *, seq: int, micro_batch: int, kernels: dict[str, str], splitting,
                    compute_dtype: str, engine_cfg, dp: int, bucket_bytes: int, tp: int = 1, pp: int = 1,
                    sequence_parallel: bool = False, in_flight: float = 1.0) -> MemoryEstimate:
    """Per rank. tp, pp: the model-parallel degrees (the rank holds 1/tp of each layer's weights and L/pp layers,
    the embedding on the first stage, norm, head and loss on the last); in_flight: micro-batches whose activations
    the first stage holds at its peak under the pipeline schedule (``pipeline_in_flight``)."""
    c, f, V, L = model_cfg.dim, model_cfg.ffn_dim, model_cfg.vocab_size, model_cfg.n_layers
    layer = 4 * c**2 + 3 * c * f + 2 * c
    n = total_params(n_layers=L, dim=c, ffn_dim=f, vocab_size=V)
    if tp > 1 or pp > 1:  # the largest stage: its layers plus the embedding (first) or the head (last)
        n = (L // pp * layer + (1 if pp > 1 else 2) * V * c) / tp + c
    states = engine_cfg.state_bytes(n, dp=dp, compute_dtype=compute_dtype, unit_params=layer,
                                    bucket_bytes=bucket_bytes)
    acts = activation_estimate(model_cfg, seq=seq, micro_batch=micro_batch, kernels=kernels, splitting=splitting,
                               compute_dtype=compute_dtype, param_bytes=states.param_bytes)
    if tp > 1 or pp > 1:
        acts = _model_parallel_activations(acts, n_layers=L, tp=tp, pp=pp, sp=sequence_parallel,
                                           in_flight=in_flight)
    # At the loss's peak, autocast's cache still holds the weight casts of recomputed regions (this rank's layers).
    forward_peak = acts["transient"] + acts.get("autocast_cache", 0.0) / (tp * pp)
    return MemoryEstimate(states=states.as_dict(), activations=acts, grad_bytes=states.grad_bytes,
                          transient=max(forward_peak, _backward_working_set(model_cfg, seq * micro_batch,
                                                                            splitting, compute_dtype) / tp))


def _model_parallel_activations(acts: dict[str, float], *, n_layers: int, tp: int, pp: int, sp: bool,
                                in_flight: float) -> dict[str, float]:
    """One rank's share of ``activation_estimate``'s parts, as chuanliu's tensor-parallel plan (comm/parallel/
    tensor.py) lays the tensors out. Without sequence parallelism each layer's two norms save replicated tensors
    (the residual input, 1/rms, the normalised x that q/k/v and gate/up read) and everything inside attention and
    the MLP is split by heads or columns: per layer 2 norm + (rest) / t, the split Korthikanti et al. 2022 (Table 2)
    count as sbh (10 + 24/t). With it the norms are split by sequence too, but DTensor's colwise linears save the
    all-gathered input they multiply (Megatron re-gathers it in backward instead), about half a norm's bytes each:
    per layer layer / t + 2 x norm/2 x (1 - 1/t). A pipeline stage holds L/pp layers for each micro-batch in flight;
    the first stage (embedding, in_flight micro-batches) or the last (final norm and loss, one) is the larger.
    The loss keeps 1/t of the logits (vocabulary-parallel)."""
    norm = acts["final_norm"]  # one RMSNorm's saved bytes, as each layer's two norms save
    per_layer = acts["layers"] / n_layers
    if sp:
        per_layer_rank = per_layer / tp + norm * (1 - 1 / tp)
    else:
        per_layer_rank = 2 * norm + (per_layer - 2 * norm) / tp
    layers = (n_layers * per_layer_rank + acts["autocast_weights"] / tp) / pp
    # The loss is vocabulary-parallel (comm/parallel/tensor.py): each rank keeps its V/t columns of the logits.
    head = acts["final_norm"] / (tp if sp else 1) + acts["loss"] / tp
    if pp == 1:  # one stage holds everything
        out = dict(acts, layers=layers, autocast_weights=0.0, final_norm=head - acts["loss"] / tp,
                   loss=acts["loss"] / tp, transient=acts["transient"] / tp)
        out["total"] = layers + acts["embedding"] + head
        return out
    first = in_flight * (layers + acts["embedding"])
    last = layers + head
    out = dict(acts, layers=layers * (in_flight if first >= last else 1), autocast_weights=0.0,
               embedding=acts["embedding"] * in_flight if first >= last else 0.0,
               final_norm=0.0 if first >= last else head - acts["loss"] / tp,
               loss=0.0 if first >= last else acts["loss"] / tp, transient=acts["transient"] / tp)
    out["total"] = max(first, last)
    return out


def pipeline_in_flight(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Micro-batches' worth of a rank's layers whose activations the busiest pipeline rank holds at once, read off
    torch's own schedule (comm.parallel.bubble.peak_in_flight): GPipe m, 1F1B pp, Interleaved1F1B
    pp(1 + (pp-1)/(pp v)) as Korthikanti et al. 2022 give it."""
    if pp <= 1:
        return 1.0
    from comm.parallel.bubble import peak_in_flight

    return peak_in_flight(schedule, pp, microbatches, virtual_stages)


def _backward_working_set(cfg: ModelConfig, tokens: int, splitting, compute_dtype: str) -> float:
    """One layer's backward: the gradients flowing through the MLP (three ffn-wide) and the residual stream, plus,
    under full recomputation, the layer's own activations made again (about what an unsplit layer saves)."""
    a = 2 if compute_dtype in ("bf16", "fp16", "fp8") else 4
    work = 3 * tokens * cfg.ffn_dim * a + 4 * tokens * cfg.dim * 4
    if splitting.recompute_layers:
        work += tokens * (14 * cfg.dim * a + 4 * cfg.ffn_dim * a)
    return work


def check_fits(estimate: MemoryEstimate, model_cfg: ModelConfig, device: torch.device, *,
               capacity: int | None = None) -> None:
    """Refuse a run whose estimate exceeds the device, with the parts, the excess and the ways to shrink it."""
    have = capacity if capacity is not None else total_memory_bytes(device)
    usable = USABLE_FRACTION * have
    if estimate.total <= usable:
        return
    name = "GPU" if device.type == "cuda" else "machine's RAM"
    raise ConfigError(
        f"model {model_cfg.name} needs about {estimate.describe()} per rank, {(estimate.total - usable) / GIB:.1f} "
        f"GiB more than the {usable / GIB:.0f} GiB usable of this {name} ({have / GIB:.0f} GiB). Shard the states "
        "over more ranks (engine=fsdp2 or engine=deepspeed_zero3), recompute activations (splitting=full_recompute),"
        " lower train.micro_batch_size, or pick a smaller model (model=tiny or model=small)")

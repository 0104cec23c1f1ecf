"""Peak memory of the process: CUDA's max allocated on a GPU, peak resident set size on a CPU."""
from __future__ import annotations

import os
import resource
import sys
import weakref
from typing import Callable

import torch


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def peak_memory_fn(device: torch.device) -> Callable[[], int]:
    """A function returning peak bytes so far on ``device`` (chosen once, so the step loop does not branch)."""
    if device.type == "cuda":
        return lambda: torch.cuda.max_memory_allocated(device)
    return _peak_rss_bytes


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SavedTensorMeter:
    """Activation memory of a forward pass: bytes of tensors autograd saves for backward.

    Deterministic on any device (no allocator statistics needed): every tensor autograd saves passes through
    a saved-tensors pack hook, is deduplicated by storage (views of one buffer count once) and counted unless
    it is a parameter. A checkpoint's inputs are saved that way too, so recomputation shows up as the
    memory it really keeps.
    Use one ``with meter:`` per micro-batch forward; ``peak_bytes`` is the largest so far, ``last_bytes`` the
    latest. Transient buffers freed before backward (a chunk's logits) are not counted: they are never saved.
    """

    def __init__(self, params, *, live: bool = False, enabled: bool = True):
        """live: count what is alive, not what was saved: a saved tensor's bytes are released when autograd drops it
        (its backward ran), and ``last_bytes`` is the context's high-water mark. For a context that spans forwards
        and backwards of several micro-batches (a pipeline schedule's step), that is the activations really held
        at once (1F1B keeps at most pp micro-batches in flight, GPipe all of them); within one forward both
        modes agree.
        enabled=False: measure nothing (``peak_bytes`` None). Needed where the hooks change what they measure:
        under torch 2.13's zero-bubble pipeline schedules (backward split into input and weight gradients) a
        saved-tensors hook keeps every micro-batch's saved tensors alive after the weight pass, step after step
        (measured: ZBV on tiny, 31 -> 111 MiB alive over 4 steps with the hooks, 2 MiB without)."""
        # Sharded engines (FSDP2) hold DTensor parameters: their local shard is the storage.
        self._param_storages = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in params}
        self.enabled = enabled
        self.last_bytes = 0
        self.peak_bytes: int | None = 0 if enabled else None
        self.live = live
        self._alive: dict[int, list[int]] = {}  # storage key -> [bytes, saved tensors still holding it]
        self._alive_bytes = self._high = 0

    def reset_peak(self) -> None:
        self.peak_bytes = 0 if self.enabled else None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # A parameter or a view of one (a transposed weight), incl. FSDP2's all-gathered parameters, which live in
        # buffers other than the shards the meter was given.
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        local = getattr(t, "_local_tensor", None)  # a DTensor (tensor/sequence parallel): this rank's shard
        if local is not None:
            t_bytes = local
        else:
            t_bytes = t
        try:
            storage = t_bytes.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses (fp8) without a plain storage
            key, nbytes = id(t_bytes), t_bytes.numel() * t_bytes.element_size()
        if key not in self._param_storages:
            self._seen[key] = nbytes
            if self.live:
                self._hold(t, key, nbytes)
        return t

    def _hold(self, t: torch.Tensor, key: int, nbytes: int) -> None:
        entry = self._alive.get(key)
        if entry is None:
            self._alive[key] = [nbytes, 1]
            self._alive_bytes += nbytes
            self._high = max(self._high, self._alive_bytes)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._alive.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self._alive_bytes -= entry[0]
                del self._alive[key]

    def __enter__(self) -> "SavedTensorMeter":
        if not self.enabled:
            return self
        self._seen: dict[int, int] = {}
        self._high = self._alive_bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._hooks.__exit__(*exc)
        self.last_bytes = self._high if self.live else sum(self._seen.values())
        self.peak_bytes = max(self.peak_bytes, self.last_bytes)
        self._seen = {}


# ---- estimate ---------------------------------------------------------------------------------------------------
# Bytes per element of what the forward saves. The residual stream, the norms' statistics and the loss's softmax
# are fp32 whatever the compute dtype (the model keeps fp32 weights; rms_norm and the loss upcast).
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}


def activation_estimate(cfg, *, seq: int, micro_batch: int, kernels: dict[str, str], splitting,
                        compute_dtype: str = "fp32", param_bytes: int = 4) -> dict[str, float]:
    """Bytes autograd keeps from one micro-batch's forward until its backward, per part of the model, derived the
    way Korthikanti et al. (2022, sec. 4) derive their 34sbh + 5as^2b for GPT: every tensor each operator saves,
    here for this architecture and for what each technique changes (RMSNorm's fp32 statistics instead of
    LayerNorm and dropout masks, RoPE, SwiGLU's three ffn-wide tensors, the fp32 logits, the copies autocast makes
    of inputs and weights, the fused kernels' smaller saves, and what recomputation and chunking keep). A view
    counts as the tensor it views (v is a view of the fused QKV output), as the saved-tensor meter counts storage.

    ``cfg`` is a systems.model.ModelConfig, ``kernels`` what systems.fusion.resolve chose per operator,
    ``splitting`` a systems.splitting.SplittingConfig. ``param_bytes``: the dtype the weights (and so the
    embedding output and residual stream) are held in; 2 for an engine that trains bf16 weights (DeepSpeed bf16).
    Returns the parts and ``total``. ``transient`` is not saved: the largest temporary the loss adds on top at its
    peak (logits, their fp32 copy and gradient), part of a device's peak memory but not of the meter's count.
    ``autocast_cache`` is not saved either: autocast's cast copies of the weights inside recomputed regions, which
    its cache keeps alive until the forward ends (measured: 5.6 GiB at 15 layers of Baichuan-7B width under full
    recomputation), on top at the loss's peak.

    fp8 (torchao's Float8Linear for the decoder's linears, the LM head in bf16): each Float8Linear saves its input
    in the autocast dtype and its fp32 weight, which is the parameter itself (no copy); it casts to fp8 inside its
    matmul and makes no autocast copy of the weight (torchao 0.8-0.18 ``matmul_with_hp_or_float8_args``).
    """
    a = _COMPUTE_BYTES[compute_dtype]  # linear outputs (autocast dtype)
    r = param_bytes  # residual stream, norm outputs
    autocast = a != r  # linears then save a cast copy of their input and of their weight
    fp8 = compute_dtype == "fp8"  # decoder linears are Float8Linear: no autocast weight copies, saved or cached
    bt, c, f, v, h = micro_batch * seq, cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_heads
    btc, btf = bt * c, bt * f
    fused_norm = kernels.get("rmsnorm", "eager") != "eager"
    fused_act = kernels.get("swiglu", "eager") != "eager"
    eager_core = kernels.get("attention", "eager") == "eager"

    def norm() -> float:  # the norm's own saves; its output y is saved (or cast) by its consumers
        if fused_norm:  # compiled / Liger: input and 1/rms, the normalised x recomputed in backward
            return btc * r + bt * 4
        return btc * 4 + bt * 4 + btc * r  # fp32 input, 1/rms, the normalised x (y = weight * x saves x)

    def inputs_of(linears: int) -> float:  # what the consuming linears save of a norm's output y (bt x c)
        return linears * btc * a if autocast else btc * r  # Float8Linear saves the same bf16 input

    layer = 2 * norm()
    # Attention: W_pack's input, then q and k after RoPE (2 btc) and v, a view of the (b, t, 3c) W_pack output.
    layer += inputs_of(1)
    if splitting.recompute_layers:
        layer = btc * r  # full recomputation keeps each layer's input only
    else:
        if autocast:
            layer += 2 * seq * (c // h) * a  # RoPE's cos and sin cast to the compute dtype
        core_inputs = 2 * btc * a + 3 * btc * a  # q, k rotated; v as the whole qkv storage
        if splitting.recompute_attention:
            layer += core_inputs + btc * a  # the checkpoint's inputs; o_proj's input (the core's output)
        elif eager_core:  # q, k, a contiguous copy of v, the mask, fp32 probabilities (+ their cast), o_proj input
            layer += 3 * btc * a + seq * seq + bt * h * seq * (4 + (a if a != 4 else 0)) + btc * a
        else:  # sdpa / flash: q, k, v, output (o_proj reads it as a view), log-sum-exp per row
            layer += core_inputs + btc * a + bt * h * 4
        # MLP: gate, up, silu(gate) and their product (the fused kernels recompute silu), or only its input.
        if splitting.tiled_mlp or splitting.recompute_mlp:
            layer += btc * r
        else:
            layer += inputs_of(2) + (3 if fused_act else 4) * btf * a  # down saves its input
    # Autocast's weight copies, unless made inside a recomputed region (then they are made again in backward).
    mlp_recomputed = splitting.tiled_mlp or splitting.recompute_mlp or splitting.recompute_layers
    weights = (0 if splitting.recompute_layers else 4 * c * c) + (0 if mlp_recomputed else 3 * c * f)
    cached = 4 * c * c + 3 * c * f - weights  # cast inside recomputed regions: cached until the forward ends
    parts = {"layers": cfg.n_layers * layer,
             "autocast_weights": cfg.n_layers * weights * a if autocast and not fp8 else 0,
             # token ids and targets; RoPE's tables, saved as views of the model's buffers without autocast
             "embedding": 2 * bt * 8 + (2 * cfg.max_seq_len * (c // h) * 4
                                          if splitting.recompute_layers or not autocast else 0),
             "final_norm": norm()}
    loss_kernel = kernels.get("loss", "eager")
    if splitting.chunked_ce:  # each chunk's checkpoint keeps its slice of y; the logits exist one chunk at a time
        chunk = min(splitting.ce_chunk_tokens, bt)
        parts["loss"] = btc * r
        parts["transient"] = chunk * v * (a + 4 + 4)
    elif loss_kernel == "liger":  # gradients computed in forward: dL/dhidden kept, dL/dW accumulated
        parts["loss"] = btc * a + v * c * r
        parts["transient"] = min(bt, 4096) * v * (a + 4)  # Liger's internal chunk of logits
    else:  # lm_head's input (+ casts of it and of the weight), the fp32 log-probabilities
        parts["loss"] = inputs_of(1) + (v * c * a if autocast else 0) + bt * v * 4
        parts["transient"] = bt * v * (a if autocast else 0) + 2 * bt * v * 4  # logits, their fp32 grad
    parts["total"] = sum(v for k, v in parts.items() if k != "transient")
    parts["autocast_cache"] = cfg.n_layers * cached * a if autocast and not fp8 else 0
    return parts

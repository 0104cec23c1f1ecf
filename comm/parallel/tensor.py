"""Megatron-style tensor parallelism (optionally with sequence parallelism) for the Baichuan model via DTensor.

Start at ``apply_tensor_parallel``. The plan (torchtitan's llama plan, adapted to Baichuan's names) over a 1-D
``tp_mesh`` of size t:

    embed_tokens   RowwiseParallel (vocabulary rows split; output Replicate, or Shard(1) under SP)
    self_attn      W_pack ColwiseParallel after a row permutation (below); o_proj RowwiseParallel; H/t local heads
    mlp            gate_proj, up_proj ColwiseParallel; down_proj RowwiseParallel
    norms          replicated (plain tensors); under SP: SequenceParallel (activations split on the sequence dim,
                   weights Replicate DTensors) with PrepareModuleInput all-gathering the sequence before
                   attention/MLP and the row-wise layers reduce-scattering back to Shard(1)
    lm_head        ColwiseParallel (vocabulary rows split); with targets the loss is vocabulary-parallel
                   (``vocab_parallel_cross_entropy``): logits exist only as this rank's (B, T, V/t) columns

W_pack holds [q; k; v] rows, each H*D. Splitting those 3*H*D rows in t contiguous blocks would give rank 0 all of
q, so before sharding the rows are permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] where x_r is the rows of the
heads of rank r (H/t heads each). Each rank's shard is then [q_r; k_r; v_r], exactly the layout the attention
forward's ``view(B, T, 3, n_heads, head_dim)`` expects with ``n_heads`` set to the local head count H/t.
The permutation is kept on ``W_pack._tp_row_perm`` (a plain attribute: state dict names do not change);
``full_state_dict`` / ``full_grads`` gather every DTensor with ``full_tensor()`` and undo it, so their names and
values equal the unsharded model's (the checkpoint format stays the single-process one), and
``load_full_state_dict`` applies it again when loading such a state dict into a sharded model.

Operator slots: rope_fn, core_fn and act_fn see plain local tensors (this rank's heads / ffn columns), so any
implementation works; norm_fn sees DTensors under SP (elementwise torch ops do; a custom kernel may not);
loss_fn is replaced (the reference cross-entropy only: a chunked or fused loss is refused, not dropped).
Recomputation (torch.utils.checkpoint, non-reentrant) of a layer, an MLP or an attention core re-runs the same
collectives in backward on every rank, so it composes; apply it before or after this function.

Data parallelism on top (the "dp" dim of comm.parallel.mesh.build_mesh): either all-reduce every gradient's local
shard over ``mesh["dp"]`` after backward (comm/engines/ddp.py does), or FSDP2 ``fully_shard(..., mesh=mesh["dp"])``
after this function (2-D DTensors; tests/distributed/test_tensor_parallel.py checks both). Not
``DDP(device_mesh=mesh["dp"])``: in torch 2.13 its TP hook (``_pre_dp_module_transform``) swaps the root module's
parameters for plain attributes at the first forward, after which ``named_parameters()`` is empty.

Limits: under SP, T must be divisible by t; the attention forward is replaced by a copy that reshapes to the local
width (an attention whose forward was already wrapped is refused); without SP the optimizer sees a mix of
DTensor and plain parameters (use ``clip_grad_norm_`` below, not torch's); the embedding and the LM head share no
weight (Baichuan's are untied), so nothing here handles tying.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def qkv_row_permutation(n_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """perm with new_rows = old_rows[perm]: [q;k;v] (each head-major) -> [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    hl = n_heads // tp
    rows = torch.arange(3 * n_heads * head_dim).view(3, tp, hl * head_dim)  # (part, rank, local rows)
    return rows.transpose(0, 1).reshape(-1)


def _tp_attention_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The attention forward on this rank's heads: the same computation as the model's, but the output
    projection input is (B, T, n_heads_local * head_dim), not C, so the reshape uses -1."""
    B, T, _ = x.shape
    qkv = self.W_pack(x).view(B, T, 3, self.n_heads, self.head_dim)  # this rank's [q_r; k_r; v_r]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H/t, T, D)
    q, k = self.rope_fn(q, k, cos, sin)
    y = self.core_fn(q, k, v)  # (B, H/t, T, D)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over logits split by vocabulary columns (Megatron's vocab-parallel CE): three
    all-reduces of (N,) vectors (max, sum of exp, target logit) instead of gathering (N, V) logits."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start: int, group, ignore_index: int):
        # logits (N, V/t) fp32: columns [vocab_start, vocab_start + V/t) of the full vocabulary
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - vocab_start
        mine = (local >= 0) & (local < logits.size(-1))  # this rank holds the target's column
        idx = local.clamp(0, logits.size(-1) - 1)
        target_logit = shifted.gather(1, idx.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(target_logit, group=group)
        valid = targets != ignore_index
        n = valid.sum().clamp(min=1)
        loss = ((sum_exp.log() - target_logit) * valid).sum() / n
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, this rank's columns
        ctx.save_for_backward(exp, idx, mine & valid, valid, n)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, idx, hit, valid, n = ctx.saved_tensors
        # d loss / d logits = (softmax - onehot(target)) / n, zero on ignored rows. Out of place: the saved
        # softmax stays intact for a second backward (retain_graph).
        grad = softmax.scatter_add(1, idx.unsqueeze(-1), -hit.to(softmax.dtype).unsqueeze(-1))
        grad.mul_((valid.to(grad.dtype) * (grad_loss / n)).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss, equal to F.cross_entropy on the full logits, from this rank's vocabulary columns:
    logits (N, V/t) for vocabulary ids [vocab_start, vocab_start + V/t), targets (N,) full ids. Collective over
    ``group``; the result is a plain tensor, the same on every rank, and backward needs no collective."""
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group, ignore_index)


def _make_tp_loss(tp_mesh, sequence_parallel: bool):
    """loss_fn(hidden, lm_head_weight, targets) with the weight a Shard(0) DTensor (vocabulary split).

    The hidden states are made whole on every tp rank (an all-gather of the sequence under SP), this rank's
    (B, T, V/t) logits columns come from a DTensor matmul, and the loss is vocabulary-parallel. The loss is a
    plain tensor, so ``loss.backward()`` works outside any context (unlike torch's ``loss_parallel``, which needs
    the backward inside it too); the DTensor matmul's backward all-reduces (or reduce-scatters) the hidden grad.
    """
    hidden_layout = Shard(1) if sequence_parallel else Replicate()
    group, coord, t = tp_mesh.get_group(), tp_mesh.get_local_rank(), tp_mesh.size()

    def tp_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, tp_mesh, [hidden_layout], run_check=False)
        hidden = hidden.redistribute(tp_mesh, [Replicate()])
        logits = F.linear(hidden, weight).to_local()  # (B, T, V/t): this rank's vocabulary columns
        per = -(-weight.shape[0] // t)  # DTensor shards like torch.chunk: ceil(V/t) rows, the last may be short
        return vocab_parallel_cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                            vocab_start=min(coord * per, weight.shape[0]), group=group)

    return tp_loss


def _check_slots(model: nn.Module) -> None:
    """Refuse what the plan would silently undo. The reference loss is recognised by name: comm/ does not import
    systems/ (docs/architecture.md), and a string compare keeps it that way."""
    loss = model.loss_fn
    if (getattr(loss, "__module__", None), getattr(loss, "__name__", None)) != ("systems.model",
                                                                                 "cross_entropy_loss"):
        raise ValueError(f"tensor parallelism replaces the loss with a vocabulary-parallel cross-entropy, but the "
                         f"model's loss_fn is {getattr(loss, '__qualname__', loss)!r}, not the reference "
                         "cross_entropy_loss (a chunked or fused loss); use splitting.chunked_ce=false and "
                         "fusion.loss=eager with parallel.tp>1")
    for i, layer in enumerate(model.model.layers):
        if "forward" in vars(layer.self_attn):
            raise ValueError(f"model.layers.{i}.self_attn.forward is already replaced (by a wrapper); tensor "
                             "parallelism replaces the attention forward with its local-heads copy, so it must "
                             "run first on the attention (recompute the layer or the core instead)")


def _layer_plan(sp: bool) -> dict:
    out = Shard(1) if sp else Replicate()  # the residual stream: split on the sequence under SP
    plan = {
        "self_attn.W_pack": ColwiseParallel(),  # rows already regrouped to [q_r; k_r; v_r] blocks
        "self_attn.o_proj": RowwiseParallel(output_layouts=out),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=out),
    }
    if sp:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None), use_local_output=True),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
        })
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a BaichuanForCausalLM, unsharded, the same on every rank) in place over ``tp_mesh`` (1-D,
    e.g. ``mesh["tp"]`` of comm.parallel.mesh.build_mesh). Parameter names do not change. Run it after the
    operator slots are chosen (fusion) and before engines wrap the model (DDP / FSDP2 over ``mesh["dp"]``)."""
    tp = tp_mesh.size()
    if tp == 1:
        return model
    sp = sequence_parallel
    inner = model.model
    n_heads = inner.layers[0].self_attn.n_heads
    if n_heads % tp:
        raise ValueError(f"parallel.tp={tp} does not divide model.n_heads={n_heads}; each tp rank must hold whole "
                         f"attention heads: pick tp among the divisors of {n_heads}")
    _check_slots(model)
    parallelize_module(inner, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if sp else Replicate()),
        **({"norm": SequenceParallel()} if sp else {}),  # output a Shard(1) DTensor; the loss gathers it
    })
    for layer in inner.layers:
        attn = layer.self_attn
        perm = qkv_row_permutation(attn.n_heads, attn.head_dim, tp)
        with torch.no_grad():
            attn.W_pack.weight.copy_(attn.W_pack.weight[perm])
        attn.W_pack._tp_row_perm = perm
        attn.n_heads = attn.n_heads // tp  # local heads
        attn.forward = types.MethodType(_tp_attention_forward, attn)
        parallelize_module(layer, tp_mesh, _layer_plan(sp))
    # lm_head.forward runs only without targets (full logits); with targets the model calls loss_fn on the weight.
    parallelize_module(model, tp_mesh, {
        "lm_head": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate()),
    })
    model.loss_fn = _make_tp_loss(tp_mesh, sp)
    for p in model.parameters():
        if isinstance(p, DTensor):
            p.register_post_accumulate_grad_hook(_settle_grad)
    model._tp_degree = tp
    return model


def _settle_grad(p: DTensor) -> None:
    """Give a DTensor parameter's gradient the parameter's own placements, once per backward.

    Why: torch 2.13 leaves some gradients in other layouts: a sequence-parallel norm weight (Replicate) gets a
    Partial(sum) gradient (each rank's part of the sequence), and the vocabulary-split embedding (Shard(0)) a
    Replicate one (the whole (V, C) table on every rank). Every later consumer (a data-parallel all-reduce of the
    local shards, the norm in ``clip_grad_norm_``, AdamW) then sees a gradient laid out like its parameter: the
    Partial one is all-reduced here once (Megatron's SP norm-gradient all-reduce), the Replicate one sliced.
    """
    if p.grad is not None and tuple(p.grad.placements) != tuple(p.placements):
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def _row_perm(module_of: dict, name: str) -> torch.Tensor | None:
    """W_pack's row permutation when ``name`` is its weight, else None."""
    owner = module_of.get(name.rsplit(".", 1)[0])
    return getattr(owner, "_tp_row_perm", None) if name.endswith(".weight") else None


def _unshard(module_of: dict, name: str, t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if isinstance(t, DTensor) else t
    perm = _row_perm(module_of, name)
    if perm is not None:
        full = full[torch.argsort(perm)]
    return full.detach().clone()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (same names, same values) from a tensor-parallel one. Collective: every
    tp rank must call it. W_pack rows are un-permuted back to [q; k; v]."""
    mods = dict(model.named_modules())
    return {k: _unshard(mods, k, v) for k, v in model.state_dict().items()}


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient, keyed as the unsharded model's (collective, like ``full_state_dict``)."""
    mods = dict(model.named_modules())
    return {k: _unshard(mods, k, p.grad) for k, p in model.named_parameters() if p.grad is not None}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (the single-process format, e.g. ``full_state_dict``'s) into a tensor-parallel
    model in place: each rank keeps its own shard, W_pack rows regrouped as at shard time. Every rank must pass
    the same values; no communication (``src_data_rank=None``)."""
    own = model.state_dict()
    if set(own) != set(state_dict):
        raise ValueError(f"state dict keys differ from the model's: missing {sorted(set(own) - set(state_dict))}, "
                         f"unexpected {sorted(set(state_dict) - set(own))}")
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, dst in own.items():
            full = state_dict[name].to(device=dst.device, dtype=dst.dtype)
            perm = _row_perm(mods, name)
            if perm is not None:
                full = full[perm]
            if isinstance(dst, DTensor):
                dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements,
                                                       src_data_rank=None).to_local())
            else:
                dst.copy_(full)


def clip_grad_norm_(parameters, max_norm: float, *, sum_over: tuple = ()) -> torch.Tensor:
    """Global gradient norm over a mix of DTensor (tensor-parallel) and plain (replicated) parameters, then clip.

    Why not torch.nn.utils.clip_grad_norm_: on such a mix (torch 2.13, gloo) it returned 0.047 for a tp=2 model
    whose unsharded twin's norm was 3.29. Here a sharded gradient contributes its local squares summed over its
    mesh (each element counted once), a replicated one (plain, or a Replicate DTensor) its own squares once.
    Works for 2-D (dp, tp) DTensors too (FSDP2 over a tensor-parallel model): each Shard mesh dim is summed over.
    ``sum_over``: process groups whose ranks hold disjoint parameters (pipeline stages): the squares are summed
    over each, so every rank clips by the whole model's norm.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params and not sum_over:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):  # not settled (``_settle_grad``): sum it first
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
            local = g.to_local().detach().double().pow(2).sum()
            for dim, pl in enumerate(g.placements):  # every mesh dim that splits it: tp, and dp under FSDP2
                if not pl.is_replicate():  # Shard, or FSDP2's _StridedShard (whose is_shard() is False)
                    torch.distributed.all_reduce(local, group=g.device_mesh.get_group(dim))
            total = total + local.cpu()
        else:
            total = total + g.detach().double().pow(2).sum().cpu()
    for group in sum_over:  # on the gradients' device: NCCL reduces only GPU tensors
        device = params[0].grad.device if params else torch.device("cpu")
        summed = total.to(device)
        torch.distributed.all_reduce(summed, group=group)
        total = summed.cpu()
    norm = total.sqrt().float()
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1:
        for p in params:
            p.grad.mul_(coef)
    return norm


# ---------------------------------------------------------------- checkpoints that outlive the layout


def _permuted_keys(module: nn.Module, state: dict) -> dict[str, torch.Tensor]:
    """Checkpoint key -> W_pack row permutation, for every key holding a regrouped W_pack weight: the model's
    ("model" -> "<fqn>") and its optimizer moments (flattened: "optim" -> "state.<fqn>.exp_avg")."""
    perms = {f"{name}.weight": m._tp_row_perm for name, m in module.named_modules()
             if getattr(m, "_tp_row_perm", None) is not None}
    out = {}
    if not perms:
        return out
    for key in state.get("model", {}):
        if key in perms:
            out[("model", key)] = perms[key]
    for key, value in state.get("optim", {}).items():
        if key.startswith("state.") and isinstance(value, DTensor):
            fqn = key[len("state."):].rsplit(".", 1)[0]
            if fqn in perms:
                out[("optim", key)] = perms[fqn]
    return out


def _reorder(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t`` (a DTensor) with its global rows reordered by ``rows``, laid out on the same mesh and placements.
    Gathers the whole tensor once (a W_pack-sized all-gather over tp, at checkpoint time only)."""
    full = t.full_tensor()[rows.to(t.device)]
    return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)


def to_canonical(module: nn.Module, state: dict) -> dict:
    """An engine's checkpoint state ({"model": ..., "optim": ...}) with every tensor-parallel W_pack (and its AdamW
    moments) back in the unsharded [q; k; v] row order, still sharded over tp.

    Why: ``apply_tensor_parallel`` regroups W_pack's rows per head so that each tp rank's shard holds its heads'
    q, k and v; saved as it is, the checkpoint's global W_pack would be that regrouped matrix, readable only by
    the same tp. In the canonical order, torch.distributed.checkpoint reshards it for any layout (tp=1, another
    tp, pipeline stages). Collective over tp; no-op without tensor parallelism."""
    keys = _permuted_keys(module, state)
    if not keys:
        return state
    out = {part: dict(state[part]) for part in state}
    for (part, key), perm in keys.items():
        out[part][key] = _reorder(state[part][key], torch.argsort(perm))
    return out


def from_canonical(module: nn.Module, state: dict) -> dict:
    """Inverse of ``to_canonical``, after a load: W_pack rows regrouped again for this run's tp."""
    keys = _permuted_keys(module, state)
    if not keys:
        return state
    out = {part: dict(state[part]) for part in state}
    for (part, key), perm in keys.items():
        out[part][key] = _reorder(state[part][key], perm)
    return out


# ---------------------------------------------------------------- tensor-parallel communication, measured


class TPCommMeter:
    """Times tensor parallelism's collectives inside a step's forward and backward (``with meter:``, then
    ``take()``): DTensor's redistributions run torch's functional collectives (all-reduce for row-parallel
    outputs, all-gather / reduce-scatter under sequence parallelism), each launched by one ``_c10d_functional``
    op and finished by a ``wait_tensor`` when its result is used.

        tp/collectives   collectives launched this step (forward and backward)
        tp/comm_bytes    bytes they carried in (each input's size on this rank)
        tp/comm_s        from each launch to the end of its wait, summed: the communication's own span
        tp/exposed_s     the host blocked in launches and waits: what compute did not hide. Tensor parallelism's
                         collectives sit between dependent matmuls, so nearly all of it is exposed unless a
                         schedule overlaps it (Megatron's tp-comm-overlap, async-TP), which chuanliu does not yet

    Launches are seen by a TorchDispatchMode (thread-local: CPU backward runs on the calling thread; on a GPU the
    host times say when the host blocked, not when the kernel ran), waits by wrapping torch's Python
    ``wait_tensor`` while the meter is entered. Costs a Python call per op: enabled only with tp > 1."""

    def __init__(self):
        self._stats = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"tp/collectives": 0, "tp/comm_bytes": 0, "tp/comm_s": 0.0, "tp/exposed_s": 0.0}

    def __enter__(self) -> "TPCommMeter":
        import time

        import torch.distributed._functional_collectives as funcol
        from torch.utils._python_dispatch import TorchDispatchMode

        stats, launched = self._stats, {}

        class _Launches(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace != "_c10d_functional" or func.__name__.startswith("wait_tensor"):
                    return func(*args, **(kwargs or {}))
                t0 = time.perf_counter()
                out = func(*args, **(kwargs or {}))
                stats["tp/exposed_s"] += time.perf_counter() - t0
                stats["tp/collectives"] += 1
                stats["tp/comm_bytes"] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
                if isinstance(out, torch.Tensor):
                    launched[id(out)] = t0
                return out

        original = funcol.wait_tensor

        def wait_tensor(t):
            t0 = time.perf_counter()
            out = original(t)
            t1 = time.perf_counter()
            stats["tp/exposed_s"] += t1 - t0
            stats["tp/comm_s"] += t1 - launched.pop(id(t), t0)
            return out

        funcol.wait_tensor = wait_tensor
        self._restore = lambda: setattr(funcol, "wait_tensor", original)
        self._launched = launched
        self._mode = _Launches()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._restore()
        self._launched.clear()

    def take(self) -> dict[str, float]:
        """This step's figures (since the last take), then reset."""
        out, self._stats = self._stats, self._zero()
        return out


class NoCommMeter:
    """Without tensor parallelism: nothing to time, nothing logged."""

    def __enter__(self) -> "NoCommMeter":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def take(self) -> dict[str, float]:
        return {}

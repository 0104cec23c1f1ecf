"""Megatron-style tensor parallelism (optionally with sequence parallelism) for the Baichuan model via DTensor.

Plan (torchtitan's llama plan, adapted to Baichuan's names), over a 1-D ``tp_mesh`` of size t:

    embed_tokens   RowwiseParallel (vocabulary rows split; output Replicate, or Shard(1) under SP)
    self_attn      W_pack ColwiseParallel after a row permutation (below); o_proj RowwiseParallel
    mlp            gate_proj, up_proj ColwiseParallel; down_proj RowwiseParallel
    norms          replicated (plain tensors); under SP: SequenceParallel (activations split on the sequence dim,
                   weights Replicate DTensors) with PrepareModuleInput all-gathering the sequence before
                   attention/MLP and Rowwise layers reduce-scattering back to Shard(1)
    lm_head        ColwiseParallel (vocabulary rows split), loss by *gathering logits* (see ``_tp_loss``)

W_pack holds [q; k; v] rows, each H*D. Splitting those 3*H*D rows in t contiguous blocks would give rank 0 all of
q, so before sharding the rows are permuted to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] where x_r is the rows of the
heads of rank r (H/t heads each). Each rank's shard is then [q_r; k_r; v_r], exactly the layout the attention
forward's ``view(B, T, 3, n_heads, head_dim)`` expects with ``n_heads`` set to the local head count H/t.
The permutation is kept on ``W_pack._tp_row_perm`` (a plain attribute: state dict names do not change);
``full_state_dict`` / ``full_grads`` gather every DTensor with ``full_tensor()`` and undo it, so their names and
values equal the unsharded model's (the checkpoint format stays the single-process one).

Limits: under sequence parallelism T must be divisible by t; the loss gathers full (B, T, V) logits on every
tp rank (memory V*B*T per rank, not V/t); optimizers see a mix of DTensor and plain parameters without SP.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
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
    qkv = self.W_pack(x).view(B, T, 3, self.n_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H/t, T, D)
    q, k = self.rope_fn(q, k, cos, sin)
    y = self.core_fn(q, k, v)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _make_tp_loss(tp_mesh, sequence_parallel: bool):
    """loss_fn(hidden, lm_head_weight, targets) with the weight a Shard(0) DTensor (vocabulary split).

    Correctness first: the (B, T, V/t) logits shards are all-gathered to full logits and the loss is plain
    F.cross_entropy, so the loss is a plain tensor, identical on every tp rank, and ``loss.backward()`` works
    outside any context (the backward of the gather just slices this rank's vocabulary columns). The vocabulary-
    parallel alternative (``torch.distributed.tensor.parallel.loss_parallel``) saves the V/t memory but needs
    the backward inside that context too, which the trainer would have to do.
    """
    hidden_layout = Shard(1) if sequence_parallel else Replicate()

    def tp_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, tp_mesh, [hidden_layout], run_check=False)
        hidden = hidden.redistribute(tp_mesh, [Replicate()])
        logits = F.linear(hidden, weight)  # Shard(-1): this rank's vocabulary columns
        logits = logits.redistribute(tp_mesh, [Replicate()]).to_local()
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    return tp_loss


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a BaichuanForCausalLM, unsharded, the same on every rank) in place over ``tp_mesh``."""
    tp = tp_mesh.size()
    if tp == 1:
        return model
    sp = sequence_parallel
    inner = model.model
    n_heads = inner.layers[0].self_attn.n_heads
    if n_heads % tp:
        raise ValueError(f"tp={tp} does not divide n_heads={n_heads}")
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
        out = Shard(1) if sp else Replicate()
        plan = {
            "self_attn.W_pack": ColwiseParallel(),
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
                                                desired_input_layouts=(Replicate(), None, None),
                                                use_local_output=True),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                          use_local_output=True),
            })
        parallelize_module(layer, tp_mesh, plan)
    # lm_head.forward runs only without targets (logits); with targets the model calls loss_fn on the weight.
    parallelize_module(model, tp_mesh, {
        "lm_head": ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate()),
    })
    model.loss_fn = _make_tp_loss(tp_mesh, sp)
    model._tp_degree = tp
    return model


def _unshard(module_of: dict, name: str, t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if isinstance(t, DTensor) else t
    owner = module_of.get(name.rsplit(".", 1)[0])
    perm = getattr(owner, "_tp_row_perm", None)
    if perm is not None and name.endswith(".weight"):
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

"""The Baichuan-7B architecture (a LLaMA-style decoder), written to be read and transformed.

Start here to see what is trained. Shapes and names follow Baichuan-7B's released modelling code so a
Hugging Face checkpoint's state dict maps one to one (``model.layers.N.self_attn.W_pack`` ...):

    embed_tokens -> N x [RMSNorm -> attention(W_pack fused QKV, RoPE, causal) -> +res
                         RMSNorm -> SwiGLU MLP(gate, up, down) -> +res] -> RMSNorm -> lm_head (untied)

Techniques are applied to a built model by ``apply_*`` functions elsewhere in ``systems/``; this file holds only
the reference computation. Every operator a technique may replace is a plain function held in an attribute, so a
technique swaps the function and the module tree (and so the state dict) stays the same:

    RMSNorm.norm_fn(x, weight, eps)          Attention.rope_fn(q, k, cos, sin)    Attention.core_fn(q, k, v)
    MLP.act_fn(gate, up)                     BaichuanForCausalLM.loss_fn(hidden, lm_head_weight, targets)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from systems.attention import eager_attention


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "tiny"  # a label for logs and reports
    n_layers: int = 2  # decoder layers (Baichuan-7B: 32)
    dim: int = 128  # hidden size h (Baichuan-7B: 4096)
    n_heads: int = 4  # attention heads (Baichuan-7B: 32, head dim 128)
    ffn_dim: int = 344  # SwiGLU intermediate size (Baichuan-7B: 11008)
    vocab_size: int = 4096  # embedding rows; must be >= the tokenizer's vocabulary (Baichuan-7B: 64000)
    max_seq_len: int = 128  # longest sequence the rotary cache covers (Baichuan-7B: 4096)
    norm_eps: float = 1e-6  # RMSNorm epsilon, as Baichuan-7B
    rope_theta: float = 10000.0  # rotary base
    init_std: float = 0.02  # normal init std of every linear and embedding (Baichuan's initializer_range)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                             "pick a head count that divides the hidden size")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"model head dim {self.dim // self.n_heads} is odd; rotary embeddings need an even "
                             "head dim (change model.dim or model.n_heads)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm computed in fp32, as Baichuan/LLaMA do (stability under bf16)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LM head and mean next-token loss: hidden (..., C), weight (V, C), targets (...). Softmax in fp32."""
    logits = F.linear(hidden, weight)  # (..., V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_fn = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, in the rotate-half layout Baichuan-7B uses."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        # Non-persistent: derived from the config, so they never enter a checkpoint.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.cos.shape[0]}; "
                             "raise model.max_seq_len or shorten train.seq_len")
        return self.cos[:seq_len], self.sin[:seq_len]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k (B, H, T, D) by position; cos/sin are (T, D) and broadcast over batch and heads."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.W_pack = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # fused QKV, Baichuan's name
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope_fn = apply_rotary
        self.core_fn = eager_attention  # causal softmax(QK^T/sqrt(D))V on (B, H, T, D)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.W_pack(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        q, k = self.rope_fn(q, k, cos, sin)
        y = self.core_fn(q, k, v)  # (B, H, T, D), causal
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act_fn = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class BaichuanModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rotary(idx.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class BaichuanForCausalLM(nn.Module):
    """Decoder + untied LM head. ``forward(idx, targets)`` returns the mean next-token loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = BaichuanModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.loss_fn = cross_entropy_loss  # LM head + loss together, so splitting can chunk both
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids. With targets (B, T): scalar loss; without: logits (B, T, V)."""
        hidden = self.model(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(hidden)  # (B, T, V)
        return self.loss_fn(hidden, self.lm_head.weight, targets)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> BaichuanForCausalLM:
    """Build on ``device``; ``"meta"`` allocates nothing (count a 7B model's parameters on a laptop)."""
    with torch.device(device):
        return BaichuanForCausalLM(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



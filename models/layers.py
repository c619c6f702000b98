"""Building blocks of the recursive models: casted linear/embedding, RMS norm, RoPE, attention, SwiGLU.

Parameters are stored in fp32 and cast to the activations' dtype at use (bf16 training keeps fp32 master
weights in the optimizer). Nothing here picks a device: everything follows its inputs and parameters.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.common import trunc_normal_init_

CosSin = Tuple[torch.Tensor, torch.Tensor]


def rms_norm(x: torch.Tensor, variance_epsilon: float) -> torch.Tensor:
    """Weightless RMS norm over the last axis, computed in fp32 and cast back."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.square().mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + variance_epsilon)).to(input_dtype)


class CastedLinear(nn.Module):
    """nn.Linear with truncated LeCun-normal init (std 1/sqrt(in)), zero bias, weights cast to the input dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_init_(torch.empty(out_features, in_features), std=1.0 / in_features**0.5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    """Embedding table with truncated-normal init, looked up in `cast_to`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype):
        super().__init__()
        self.cast_to = cast_to
        # `embedding_weight` (not `weight`): the name is in the published checkpoints' keys.
        self.embedding_weight = nn.Parameter(trunc_normal_init_(torch.empty(num_embeddings, embedding_dim), std=init_std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_position_embeddings, dim] in fp32, non-persistent (not in checkpoints)."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
        t = torch.arange(max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [S, dim/2]
        # Halves layout [freqs, freqs] (paired with rotate_half below), not the paper's interleaved pairs.
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, dim]
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self) -> CosSin:
        return self.cos_cached, self.sin_cached


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, S, H, hd]; cos, sin: [S, hd]. Rotates in the tables' dtype (fp32), returns the input dtype."""
    orig_dtype = q.dtype
    q, k = q.to(cos.dtype), k.to(cos.dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [S, 1, hd], broadcast over heads
    q_embed = q * cos + rotate_half(q) * sin
    k_embed = k * cos + rotate_half(k) * sin
    return q_embed.to(orig_dtype), k_embed.to(orig_dtype)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (no bias) and optional RoPE."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_key_value_heads: int, causal: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.causal = causal
        self.output_size = head_dim * num_heads
        # qkv_proj / o_proj: names fixed by the checkpoint keys.
        self.qkv_proj = CastedLinear(hidden_size, (num_heads + 2 * num_key_value_heads) * head_dim, bias=False)
        self.o_proj = CastedLinear(self.output_size, hidden_size, bias=False)
        self.fused_kernels = False  # set from the config's `fused_kernels` by TRMInner (models/kernels.py)

    def forward(self, hidden_states: torch.Tensor, cos_sin: Optional[CosSin] = None) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        nh, nkv = self.num_heads, self.num_key_value_heads
        # Output features are laid out [query heads | key heads | value heads], each head_dim wide.
        qkv = self.qkv_proj(hidden_states).view(B, S, nh + 2 * nkv, self.head_dim)
        if cos_sin is not None and self.fused_kernels and kernels.fused_rope_applies(qkv):  # only where backward runs
            query, key, value = kernels.rope_qkv(qkv, *cos_sin, nh, nkv)  # [B, h, S, hd], q and k rotated
        else:
            query, key, value = qkv[:, :, :nh], qkv[:, :, nh : nh + nkv], qkv[:, :, nh + nkv :]  # [B, S, h, hd]
            if cos_sin is not None:
                query, key = apply_rotary_pos_emb(query, key, *cos_sin)
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, h, S, hd]

        if nkv != nh:  # grouped-query attention: share each key/value head across nh/nkv query heads
            key, value = (t.repeat_interleave(nh // nkv, dim=1) for t in (key, value))

        out = F.scaled_dot_product_attention(query, key, value, is_causal=self.causal)  # scale 1/sqrt(hd)
        out = out.transpose(1, 2).reshape(B, S, self.output_size)  # [B, S, h*hd]
        return self.o_proj(out)


def swiglu_intermediate_size(hidden_size: int, expansion: float) -> int:
    """2/3 of expansion*hidden (keeps the parameter count of a plain MLP), rounded up to a multiple of 256."""
    return 256 * math.ceil(round(expansion * hidden_size * 2 / 3) / 256)


class SwiGLU(nn.Module):
    """down(silu(gate) * up) with a fused gate/up projection; mixes the last axis of its input."""

    def __init__(self, hidden_size: int, expansion: float):
        super().__init__()
        inter = swiglu_intermediate_size(hidden_size, expansion)
        # gate_up_proj / down_proj: names fixed by the checkpoint keys. Rows [0, inter) gate, [inter, 2*inter) up.
        self.gate_up_proj = CastedLinear(hidden_size, inter * 2, bias=False)
        self.down_proj = CastedLinear(inter, hidden_size, bias=False)
        self.fused_kernels = False  # set from the config's `fused_kernels` by TRMInner (models/kernels.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernels and kernels.fused_applies(x):  # same maths, h recomputed in the backward kernel
            return kernels.swiglu(x, self.gate_up_proj.weight.to(x.dtype), self.down_proj.weight.to(x.dtype))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

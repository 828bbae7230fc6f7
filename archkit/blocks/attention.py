"""Causal multi-head softmax attention with RoPE and optional grouped KV heads.

For a window of new tokens at absolute positions p..p+T-1 and a cache of earlier keys
and values (already rotated), query i attends to every cached token and to the new
tokens j <= i:

    o_i = softmax(q_i K^T / sqrt(D)) V,   q_i = RoPE(W_q x_i, p + i),  k_j = RoPE(W_k x_j, .)

RoPE rotates channel pairs (i, i + D/2) by p * f_i with f_i = theta^(-2i/D); a pretrained
model's ``rope_scaling`` rescales the frequencies (``linear``: f_i / factor; ``llama3``:
low frequencies / factor, high ones kept, a linear blend between). RoPE makes scores
depend only on relative position, so clearing or trimming the cache
and continuing the position counter gives the same result as restarting at zero.
The state is the KV of the tokens still visible: ``evict("hard")`` clears it,
``evict("sliding", keep)`` keeps the newest ``keep`` tokens and from then on limits every
query to the ``keep + 1`` newest tokens (itself included), so windows of any length fed
after a sliding eviction compute exactly sliding-window attention of span ``keep + 1``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from archkit.blocks.common import Block, BlockConfig, EvictionPolicy, KVCache
from archkit.registry import register_block


class RopeScaling(BlockConfig):
    """RoPE frequency scaling of a long-context pretrained model: Llama's ``rope_scaling``
    (``rope_type`` is ``type``, ``original_max_position_embeddings`` is
    ``original_max_position``)."""

    type: Literal["linear", "llama3"]
    factor: Annotated[float, Field(gt=0)]
    low_freq_factor: Annotated[float, Field(gt=0)] = 1.0
    high_freq_factor: Annotated[float, Field(gt=0)] = 4.0
    original_max_position: Annotated[int, Field(gt=0)] = 8192


class AttentionConfig(BlockConfig):
    n_heads: Annotated[int, Field(gt=0, description="default: model.n_heads")]
    n_kv_heads: Annotated[int, Field(gt=0)] | None = Field(
        None, description="KV heads for grouped-query attention (default: n_heads)"
    )
    head_dim: Annotated[int, Field(gt=0)] | None = Field(
        None, description="default: d_model // n_heads"
    )
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    rope_scaling: RopeScaling | None = None

    def check(self, d_model: int) -> tuple[str, str] | None:
        if self.head_dim is None and d_model % self.n_heads:
            return "n_heads", f"must divide d_model={d_model} (or set head_dim)"
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            return "n_kv_heads", f"must divide n_heads={self.n_heads}"
        if (self.head_dim or d_model // self.n_heads) % 2:
            return "head_dim", "must be even for RoPE"
        return None


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """f_i = theta^(-2i/D), i < D/2, in float64, rescaled as ``scaling`` says."""
    freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return freq
    if scaling.type == "linear":
        return freq / scaling.factor
    # llama3: wavelengths longer than the original context / low_freq_factor are slowed by
    # `factor`, those shorter than context / high_freq_factor kept, and a blend between.
    wavelength = 2 * math.pi / freq
    context = scaling.original_max_position
    blend = (context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * freq / scaling.factor + blend * freq
    scaled = torch.where(wavelength > context / scaling.low_freq_factor, freq / scaling.factor,
                         blended)
    return torch.where(wavelength < context / scaling.high_freq_factor, freq, scaled)


def rotate(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Apply RoPE to ``x`` [B, H, T, D] at integer ``positions`` [T] (half-split pairs)."""
    angles = positions[:, None].to(inv_freq.dtype) * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@register_block("attention", config=AttentionConfig,
                description="causal softmax attention with RoPE; KV cache of the window")
class Attention(Block):
    def __init__(self, d_model: int, config: AttentionConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.head_dim or d_model // config.n_heads
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        inv_freq = rope_frequencies(self.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_state(self, batch_size: int) -> KVCache:
        empty = self._param().new_zeros(batch_size, self.n_kv_heads, 0, self.head_dim)
        return KVCache(empty, empty, pos=0)

    def forward(self, x: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = (
            self.kv_proj(x)
            .view(batch, length, 2, self.n_kv_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        positions = torch.arange(state.pos, state.pos + length, device=x.device)
        q, k = rotate(q, positions, self.inv_freq), rotate(k, positions, self.inv_freq)
        cached = state.tokens
        keys, values = (k, v) if cached == 0 else (
            torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2))
        if state.span is None and length == 1:  # one new query sees every key
            mask, causal = None, False
        elif state.span is None and cached == 0:
            mask, causal = None, True
        else:
            query = torch.arange(length, device=x.device)[:, None] + cached
            key = torch.arange(cached + length, device=x.device)
            mask, causal = key <= query, False
            if state.span is not None:
                mask = mask & (key > query - state.span)
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = self.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
        return y, KVCache(keys, values, state.pos + length, state.span)

    def evict(self, state: KVCache, policy: EvictionPolicy, keep: int = 0) -> KVCache:
        if policy == "hard" or keep == 0:
            return KVCache(state.k[:, :, :0], state.v[:, :, :0], state.pos, state.span)
        return KVCache(state.k[:, :, -keep:], state.v[:, :, -keep:], state.pos, keep + 1)

    def rewind(self, before: KVCache, after: KVCache) -> KVCache:
        return before

    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * self._param().element_size()

    def mixing_flops_per_token(self, context: int) -> int:
        return 4 * self.n_heads * self.head_dim * context

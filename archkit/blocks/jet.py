"""JetBlock (Jet-Nemotron, 2025): Gated DeltaNet with a dynamic convolution on the values.

Per head h, with fast weights S (K x V) that persist across windows, v_t = W_v x_t and
W the conv width:

    (1) q_t, k_t = W_q x_t, W_k x_t;   q_t, k_t <- q_t/|q_t|, k_t/|k_t|     (no conv)
    (2) w_t      = W_2 SiLU(W_1 x_t) + b_2,  split into H kernels w_{t,h} of W taps
    (3) v'_t     = SiLU(sum_{j=0}^{W-1} w_{t,h,j} v_{t-j})           per channel of head h
    (4) beta_t   = sigmoid(W_b x_t)                               write strength in (0, 1)
    (5) g_t      = -exp(A_log) * softplus(W_a x_t + dt_bias)      log decay <= 0
    (6) S = exp(g_t) S;   S = S + beta_t k_t (v'_t - S^T k_t)^T;   o_t = S^T q_t / sqrt(K)
    (7) y_t      = W_o GatedRMSNorm(o_t, W_g x_t)

W_1 maps d_model to d_model // generator_ratio. In (3), v_{t-j} from before the window
comes from the carried tail (the last W-1 value inputs v, zero at the start), so windowed
reading equals one call; the tail is local context (zeroed by hard eviction, taken from
before the window by ``rewind``), S persistent memory. Unlike a static short conv, the
kernel of (3) is chosen by the token that reads it.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from archkit.blocks.fast_weight import lagged_sum
from archkit.blocks.gated_delta import GatedDelta, GatedDeltaConfig
from archkit.registry import register_block


class JetConfig(GatedDeltaConfig):
    conv_size: Annotated[int, Field(ge=1)] = Field(4, description="dynamic conv width W")
    generator_ratio: Annotated[int, Field(ge=1)] = Field(
        8, description="kernel generator hidden width = d_model // generator_ratio")

    def check(self, d_model: int) -> tuple[str, str] | None:
        if self.generator_ratio > d_model:
            return "generator_ratio", f"at most d_model={d_model} (a hidden width of >= 1)"
        return super().check(d_model)


class DynamicConv(nn.Module):
    """Causal per-head convolution of the values whose kernel each token generates from
    its own input (Eqs. 2-3), carrying the last W-1 value inputs like ``ShortConv``."""

    def __init__(self, d_model: int, n_heads: int, head_channels: int, width: int,
                 hidden: int) -> None:
        super().__init__()
        self.n_heads, self.head_channels, self.width = n_heads, head_channels, width
        # b_2 lets the generator learn a static per-head kernel under the dynamic part
        self.generator = nn.Sequential(nn.Linear(d_model, hidden, bias=False), nn.SiLU(),
                                       nn.Linear(hidden, n_heads * width))

    def initial_tail(self, batch_size: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch_size, self.width - 1, self.n_heads * self.head_channels)

    def identity_(self) -> None:
        """Every token's kernel passes its own value through (a retrofit's start)."""
        last = self.generator[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.eye(self.width)[0].repeat(self.n_heads))

    def forward(self, x: Tensor, v: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """``(v' [B, T, H, V], next tail)`` for inputs x [B, T, d_model], values v
        [B, T, H*V] and the tail [B, W-1, H*V] of values before them."""
        length = x.shape[1]
        kernels = self.generator(x).unflatten(-1, (self.n_heads, self.width))  # [B, T, H, W]
        padded = torch.cat([tail, v], dim=1).unflatten(-1, (self.n_heads, self.head_channels))
        mixed = lagged_sum(padded, kernels[..., None].unbind(-2), length)
        return F.silu(mixed), padded[:, length:].flatten(2)


@register_block("jet", config=JetConfig,
                description="JetBlock (Jet-Nemotron): gated delta rule, dynamic conv on v")
class Jet(GatedDelta):
    """Gated DeltaNet (its projections, gates and rule) with the short convolution of
    Eqs. 1-3: none on q and k, a dynamic one on v."""

    def make_conv(self, d_model: int, config: JetConfig) -> DynamicConv:  # type: ignore[override]
        heads = config.n_heads
        return DynamicConv(d_model, heads, self.widths[2] // heads, config.conv_size,
                           d_model // config.generator_ratio)

    def convolve(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        v, tail = self.conv(x, v, tail)
        return q, k, v, tail

    def mixing_flops_per_token(self, context: int) -> int:
        # the dynamic kernel is an activation, not a weight: its W multiply-adds per value
        # channel are not among the parameter matmuls
        conv = 2 * self.n_heads * self.value_dim * self.conv.width
        return super().mixing_flops_per_token(context) + conv

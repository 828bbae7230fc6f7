"""A Mamba-2 style SSD block, expressed through the gated linear (Hebbian) rule.

With d_inner = expand * d_model split into H heads of P channels and a state of N per
head (one group of B and C shared by all heads):

    z, x, B, C, dt_logit = W_in u                  (x, B, C pass a causal conv + SiLU)
    dt_t = softplus(dt_logit + dt_bias),  A = -exp(A_log)
    h_t  = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T    (h: N x P per head)
    y_t  = h_t^T C_t + D * x_t;   out = W_out GatedRMSNorm(y, z)

This is ``gated_linear_rule(q=C, k=B, v=x, g=dt*A, beta=dt, scale=1)``: the SSD scan
and the paper's gated Hebbian update are one recurrence.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from archkit.blocks.common import FastWeightState
from archkit.blocks.fast_weight import FastWeightBlock, FastWeightConfig, GatedRMSNorm, ShortConv
from archkit.registry import register_block


class Mamba2Config(FastWeightConfig):
    head_dim: Annotated[int, Field(gt=0)] | None = Field(
        None, description="channels P per head (default: expand * d_model // n_heads)"
    )
    expand: Annotated[int, Field(gt=0)] = Field(2, description="d_inner = expand * d_model")
    state_size: Annotated[int, Field(gt=0)] = Field(64, description="N: B/C width per head")
    rule: str = Field("hebbian", description="registered local update rule")

    def gives(self) -> frozenset[str]:
        return frozenset({"scalar_decay"})  # keys are B unnormalised, the strength dt > 0

    def check(self, d_model: int) -> tuple[str, str] | None:
        if self.head_dim is None and (self.expand * d_model) % self.n_heads:
            return "n_heads", f"must divide expand * d_model={self.expand * d_model}"
        return super().check(d_model)


@register_block("mamba2", config=Mamba2Config,
                description="Mamba-2 style SSD block (gated linear rule, scalar decay)")
class Mamba2(FastWeightBlock):
    def __init__(self, d_model: int, config: Mamba2Config, norm_eps: float = 1e-5) -> None:
        h, n = config.n_heads, config.state_size
        p = config.head_dim or config.expand * d_model // h
        self.widths = [h * p, h * p, n, n, h]  # z, x, B, C, dt
        super().__init__(h, n, p, ShortConv(h * p + 2 * n, config.conv_size), config)
        self.in_proj = nn.Linear(d_model, sum(self.widths), bias=False)
        self.D = nn.Parameter(torch.ones(h))
        self.out_norm = GatedRMSNorm(p, norm_eps)
        self.out_proj = nn.Linear(h * p, d_model, bias=False)

    def output_projection(self) -> nn.Linear:
        return self.out_proj

    def forward(self, u: Tensor, state: FastWeightState) -> tuple[Tensor, FastWeightState]:
        batch, length, _ = u.shape
        heads = (batch, length, self.n_heads, -1)
        z, x, b, c, dt_logit = self.in_proj(u).split(self.widths, dim=-1)
        xbc, tail = self.conv(torch.cat([x, b, c], dim=-1), state.conv_tail)
        x, b, c = xbc.split(self.widths[1:4], dim=-1)
        x = x.view(heads)
        shared = (batch, length, self.n_heads, self.key_dim)
        b, c = b[:, :, None].expand(shared), c[:, :, None].expand(shared)
        dt = self.time_step(dt_logit)
        y, weights = self.apply_rule(c, b, x, -self.A_log.exp() * dt, dt, state, 1.0)
        y = y + self.D[:, None] * x
        y = self.out_norm(y, z.view(heads))
        return self.out_proj(y.reshape(batch, length, -1)), FastWeightState(weights, tail)

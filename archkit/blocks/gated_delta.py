"""Gated DeltaNet: a fast-weight memory written with the gated delta rule.

Per head, with fast weights S (K x V) that persist across windows:

    q, k, v = SiLU(ShortConv(W_q x, W_k x, W_v x));   q, k <- q/|q|, k/|k|
    beta_t  = sigmoid(W_b x_t)                              write strength in (0, 1)
    g_t     = -exp(A_log) * softplus(W_a x_t + dt_bias)     log decay <= 0
    S       = exp(g_t) S;   S = S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t / sqrt(K)
    y_t     = W_o GatedRMSNorm(o_t, W_g x_t)

The delta correction writes only what S does not already predict for k_t, so repeated
passes over the same window refine the memory instead of piling up copies.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from archkit.blocks.fast_weight import QKVConfig, QKVFastWeightBlock
from archkit.registry import register_block


class GatedDeltaConfig(QKVConfig):
    rule: str = Field("gated_delta", description="registered local update rule")


@register_block("gated_delta", config=GatedDeltaConfig,
                description="Gated DeltaNet fast weights (delta rule with decay)")
class GatedDelta(QKVFastWeightBlock):
    def __init__(self, d_model: int, config: GatedDeltaConfig, norm_eps: float = 1e-5) -> None:
        super().__init__(d_model, config, gate_width=2 * config.n_heads, norm_eps=norm_eps)

    def decay_and_beta(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        decay_logit, beta_logit = logits.chunk(2, dim=-1)
        return -self.A_log.exp() * self.time_step(decay_logit), beta_logit.sigmoid()

"""Gated Hebbian fast weights: the paper's Eq. 3 (the Mamba2 / GLA family).

Per head, with fast weights S (K x V) that persist across windows:

    q, k, v = SiLU(ShortConv(W_q x, W_k x, W_v x));   q, k <- q/|q|, k/|k|
    beta_t  = sigmoid(W_b x_t)                        write strength in (0, 1)
    g_t     = -exp(A_log) * softplus(W_a x_t + dt_bias)        (decay: scalar)
         or   logsigmoid(W_a x_t) / 16, one per key channel    (decay: per_key, GLA)
    S       = exp(g_t) S + beta_t k_t v_t^T;   o_t = S^T q_t / sqrt(K)
    y_t     = W_o GatedRMSNorm(o_t, W_g x_t)

Unlike the delta rule, a write never reads S first: repeated passes over a window add
the same association again, scaled by the gates.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from archkit.blocks.fast_weight import QKVConfig, QKVFastWeightBlock
from archkit.registry import register_block

GLA_GATE_NORMALISER = 16.0  # keeps per-key decays close to 1 at initialisation


class HebbianConfig(QKVConfig):
    rule: str = Field("hebbian", description="registered local update rule")
    decay: Literal["scalar", "per_key"] = "scalar"

    def gives(self) -> frozenset[str]:
        given = super().gives()
        return given - {"scalar_decay"} if self.decay == "per_key" else given


@register_block("hebbian", config=HebbianConfig,
                description="gated Hebbian fast weights (paper Eq. 3; scalar or per-key decay)")
class Hebbian(QKVFastWeightBlock):
    def __init__(self, d_model: int, config: HebbianConfig, norm_eps: float = 1e-5) -> None:
        h = config.n_heads
        key_dim = config.head_dim or d_model // h
        per_key = config.decay == "per_key"
        decay_width = h * key_dim if per_key else h
        super().__init__(d_model, config, gate_width=decay_width + h, norm_eps=norm_eps,
                         scalar_decay=not per_key)
        self.decay = config.decay

    def decay_and_beta(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        h = self.n_heads
        decay_logit, beta_logit = logits[..., :-h], logits[..., -h:]
        if self.decay == "per_key":
            per_key = decay_logit.unflatten(-1, (h, self.key_dim))
            return F.logsigmoid(per_key) / GLA_GATE_NORMALISER, beta_logit.sigmoid()
        return -self.A_log.exp() * self.time_step(decay_logit), beta_logit.sigmoid()

"""Reference fast-weight recurrences: one Python step per token, the executable definition.

Shapes: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g, beta [B, T, H]``, state
``S [B, H, K, V]``; every faster implementation in ``archkit.kernels`` must match these.
Inputs are assumed validated (see ``archkit.kernels``); both functions return ``(o, S_T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _initial(k: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    if initial_state is not None:
        return initial_state.to(k.dtype)
    B, _, H, K = k.shape
    return k.new_zeros(B, H, K, v.shape[-1])


def gated_delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule, token by token::

        S_t = exp(g_t) S_{t-1}                       # decay (g_t <= 0)
        u_t = beta_t (v_t - S_t^T k_t)               # delta: what S fails to recall for k_t
        S_t = S_t + k_t u_t^T                        # write the correction
        o_t = scale S_t^T q_t

    i.e. ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (S is K x V).
    """
    S = _initial(k, v, initial_state)
    outputs = []
    for t in range(q.shape[1]):
        S = S * g[:, t, :, None, None].exp()
        recalled = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        u = beta[:, t, :, None] * (v[:, t] - recalled)
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, dim=1), S


def gated_linear_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor | None,
    scale: float,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated Hebbian (linear-attention) rule, token by token::

        S_t = diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
        o_t = scale S_t^T q_t

    ``g`` is ``[B, T, H]`` (one decay per head: Mamba2/SSD) or ``[B, T, H, K]`` (one decay
    per key row of S: GLA). ``beta=None`` means 1.
    """
    S = _initial(k, v, initial_state)
    g = g if g.dim() == 4 else g[..., None]  # [B, T, H, 1 or K]
    outputs = []
    for t in range(q.shape[1]):
        write = k[:, t, :, :, None] * v[:, t, :, None, :]
        if beta is not None:
            write = beta[:, t, :, None, None] * write
        S = S * g[:, t, :, :, None].exp() + write
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outputs, dim=1), S

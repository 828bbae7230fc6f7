"""Reference fast-weight recurrences: one Python step per token, the executable definition.

Shapes: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g, beta [B, T, H]``, state
``S [B, H, K, V]``; every faster implementation in ``archkit.kernels`` must match these.
Inputs are assumed validated (see ``archkit.kernels``); both functions return ``(o, S_T)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def _initial(k: Tensor, v: Tensor, initial_state: Tensor | None) -> Tensor:
    if initial_state is not None:
        return initial_state.to(k.dtype)
    B, _, H, K = k.shape
    return k.new_zeros(B, H, K, v.shape[-1])


def _steps(*xs: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Per-token slices ``x[:, t]``. unbind, not indexing: the backward of ``x[:, t]``
    fills a zero tensor of x's full size for every t, which is quadratic in T."""
    return zip(*(x.unbind(1) for x in xs), strict=True)


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

        S'  = exp(g_t) S_{t-1}                 # decay (g_t <= 0)
        u_t = beta_t (v_t - S'^T k_t)          # delta: what S' fails to recall for k_t
        S_t = S' + k_t u_t^T                   # write the correction
        o_t = scale S_t^T q_t

    i.e. ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (S is K x V).
    """
    S = _initial(k, v, initial_state)
    outputs = []
    for q_t, k_t, v_t, g_t, beta_t in _steps(q, k, v, g, beta):
        S = S * g_t.exp()[..., None, None]
        u = beta_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, S))
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
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    outputs = []
    for q_t, k_t, v_t, g_t, beta_t in _steps(q, k, v, g, beta):
        write = beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        S = S * g_t.exp()[..., None] + write
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, S))
    return torch.stack(outputs, dim=1), S

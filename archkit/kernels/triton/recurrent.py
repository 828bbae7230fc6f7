"""Fused recurrent Triton kernels: one program per (batch*head, block of value columns),
a loop over tokens, the state S [K, V-block] held in registers. For one-token decode steps
and short windows, and for per-key decay (which the chunked kernels do not cover).

They compute exactly the per-token definitions in ``archkit.kernels.reference``
(``gated_delta_rule_reference``, ``gated_linear_rule_reference``), in float32 whatever
the input dtype. Columns of S evolve independently under both rules (the decay and the
key-side products act on rows), so the value dimension is split across programs; the key
dimension is not, since the delta rule's recall ``S^T k`` needs all of it.

**Forward**, per token (α = exp(g_t), a scalar or, per-key decay, a K-vector on rows)::

    S_a = α S_{t-1}
    e_t = v_t - S_a^T k_t   (delta rule; e_t = v_t for the linear rule)
    u_t = β_t e_t
    S_t = S_a + k_t u_t^T
    o_t = scale S_t^T q_t

**Backward** without storing the states (reversing the recurrence would divide by α and by
``I - β k k^T``, which is unstable). With D_t the gradient w.r.t. S_t from later tokens
(D_T = the final-state gradient) and G = D_t + scale q_t do_t^T::

    dk_t = G u_t + S_a dr_t       du = G^T k_t     dv_t = β_t du     dβ_t = du · e_t
    dr_t = -β_t du (delta only)   D_{t-1} = α (G + k_t dr_t^T)      dq_t = scale S_t do_t

Everything but ``S_a dr_t`` and ``dq_t`` needs only D, so a reverse pass (kernel
``_bwd_reverse``) computes it and stores dr; a forward pass (``_bwd_forward``) rebuilds S
from the stored e_t and adds ``S_a dr_t`` and ``dq_t``. The decay gradient
``dg_t = <α-weighted D, S_a>`` needs S and D together, but it telescopes: with
``x_t = <D_t, S_t>`` (summed over V, and over K too for a scalar decay)::

    dg_t = x_t + q_t·dq_t - k_t·(G u_t) + k_t·(S_a dr_t),    x_{t-1} = dg_t

so ``dg = reverse_cumsum(q⊙dq - k⊙dk_G + k⊙dk_S) + <D_T, S_T>``, done in PyTorch from
the two passes' outputs (``dk_G = G u``, ``dk_S = S_a dr``). Per-key decay keeps the
K axis (``⊙`` not ``·``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archkit.kernels.triton._common import (
    block_offsets,
    block_sizes,
    grad_decay,
    load_state,
    reverse_cumsum,
    store_state,
)


@triton.jit
def _token(x, r, offs, mask, N: tl.constexpr):
    """Token row r of x [B, T, H, N] at offs, in float32 (masked lanes 0)."""
    return tl.load(x + r * N + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _decay(S, g, r, ok, mk, K: tl.constexpr, KEY_DECAY: tl.constexpr):
    """α S for token row r, α = exp(g_t): a scalar, or with KEY_DECAY a K-vector on rows."""
    if KEY_DECAY:
        alpha = tl.exp(_token(g, r, ok, mk, K))[:, None]
    else:
        alpha = tl.exp(tl.load(g + r).to(tl.float32))
    return S * alpha


@triton.jit
def _beta(beta, r, HAS_BETA: tl.constexpr):
    """β_t for token row r; 1 without beta."""
    return tl.load(beta + r).to(tl.float32) if HAS_BETA else 1.0


@triton.jit
def _fwd(
    q, k, v, g, beta, h0, o, ht, e, scale, T, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr,
    KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_E: tl.constexpr,
):
    """o_t = scale S_t^T q_t for every t, S_T -> ht; e_t -> e (delta rule, for backward)."""
    i_bh, ok, ov, mk, mv, row0 = block_offsets(T, H, K, V, BK, BV)
    S = load_state(h0 + i_bh * K * V, ok, ov, mk, mv, V, HAS_H0, BK, BV)
    r = row0  # the current token's row
    for _ in range(T):
        k_t = _token(k, r, ok, mk, K)
        S = _decay(S, g, r, ok, mk, K, KEY_DECAY)
        e_t = _token(v, r, ov, mv, V)
        if IS_DELTA:
            e_t -= tl.sum(k_t[:, None] * S, 0)  # what S fails to recall for k_t
            if SAVE_E:
                tl.store(e + r * V + ov, e_t, mask=mv)
        S += k_t[:, None] * (_beta(beta, r, HAS_BETA) * e_t)[None, :]
        q_t = _token(q, r, ok, mk, K) * scale
        tl.store(o + r * V + ov, tl.sum(q_t[:, None] * S, 0).to(o.dtype.element_ty), mask=mv)
        r += H
    store_state(ht + i_bh * K * V, S, ok, ov, mk, mv, V)


@triton.jit
def _bwd_reverse(
    q, k, v, g, beta, e, do, dht, dk_g, dv, dbeta, dr, dh0, scale, T, B, H: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_DELTA: tl.constexpr, KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_DHT: tl.constexpr,
):
    """Reverse pass: D from the final-state gradient back to dh0 = D_0. Stores, per token,
    dk_G = G u_t and dβ_t (partial sums over this program's V block, at [i_v]), dv_t, and
    dr_t (delta rule) for ``_bwd_forward``."""
    i_bh, ok, ov, mk, mv, row0 = block_offsets(T, H, K, V, BK, BV)
    part = tl.program_id(0).to(tl.int64) * B * T * H  # this V block's partial sums
    D = load_state(dht + i_bh * K * V, ok, ov, mk, mv, V, HAS_DHT, BK, BV)
    r = row0 + (T - 1) * H  # the current token's row, from the last
    for _ in range(T):
        q_t = _token(q, r, ok, mk, K) * scale
        k_t = _token(k, r, ok, mk, K)
        do_t = _token(do, r, ov, mv, V)
        e_t = _token(e if IS_DELTA else v, r, ov, mv, V)  # the forward's e_t
        b_t = _beta(beta, r, HAS_BETA)
        D += q_t[:, None] * do_t[None, :]  # G = D_t + scale q_t do_t^T
        tl.store(dk_g + (part + r) * K + ok, tl.sum(D * (b_t * e_t)[None, :], 1), mask=mk)
        du = tl.sum(D * k_t[:, None], 0)
        tl.store(dv + r * V + ov, (b_t * du).to(dv.dtype.element_ty), mask=mv)
        if HAS_BETA:
            tl.store(dbeta + part + r, tl.sum(du * e_t, 0))
        if IS_DELTA:
            dr_t = -b_t * du
            tl.store(dr + r * V + ov, dr_t, mask=mv)
            D += k_t[:, None] * dr_t[None, :]
        D = _decay(D, g, r, ok, mk, K, KEY_DECAY)
        r -= H
    store_state(dh0 + i_bh * K * V, D, ok, ov, mk, mv, V)


@triton.jit
def _bwd_forward(
    k, v, g, beta, h0, e, do, dr, dq, dk_s, scale, T, B, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr,
    KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr, HAS_H0: tl.constexpr,
):
    """Forward pass rebuilding S_t (from the stored e_t, no recall needed): stores
    dq_t = scale S_t do_t and, delta rule, dk_S = S_a dr_t (partial sums at [i_v])."""
    i_bh, ok, ov, mk, mv, row0 = block_offsets(T, H, K, V, BK, BV)
    part = tl.program_id(0).to(tl.int64) * B * T * H
    S = load_state(h0 + i_bh * K * V, ok, ov, mk, mv, V, HAS_H0, BK, BV)
    r = row0  # the current token's row
    for _ in range(T):
        S = _decay(S, g, r, ok, mk, K, KEY_DECAY)
        if IS_DELTA:
            dr_t = _token(dr, r, ov, mv, V)
            tl.store(dk_s + (part + r) * K + ok, tl.sum(S * dr_t[None, :], 1), mask=mk)
        e_t = _token(e if IS_DELTA else v, r, ov, mv, V)  # the forward's e_t
        S += _token(k, r, ok, mk, K)[:, None] * (_beta(beta, r, HAS_BETA) * e_t)[None, :]
        do_t = _token(do, r, ov, mv, V)
        tl.store(dq + (part + r) * K + ok, tl.sum(S * do_t[None, :], 1) * scale, mask=mk)
        r += H


class RecurrentRule(torch.autograd.Function):
    """Autograd wrapper of the fused recurrent kernels; see the module docstring.

    ``forward(q, k, v, g, beta, h0, scale, is_delta) -> (o in q's dtype, S_T in float32)``;
    beta and h0 may be None (beta = 1, S_0 = 0). Inputs must be contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, is_delta):
        B, T, H, K = k.shape
        V = v.shape[-1]
        BK, BV = block_sizes(K, V)
        NV = triton.cdiv(V, BV)
        save = any(ctx.needs_input_grad[:6])
        o = v.new_empty(B, T, H, V, dtype=q.dtype)
        ht = k.new_empty(B, H, K, V, dtype=torch.float32)
        e = k.new_empty(B, T, H, V, dtype=torch.float32) if is_delta and save else o
        key_decay = g.dim() == 4
        _fwd[(NV, B * H)](
            q, k, v, g, beta if beta is not None else g, h0 if h0 is not None else ht, o, ht,
            e, scale, T, H, K, V, BK, BV, IS_DELTA=is_delta, KEY_DECAY=key_decay,
            HAS_BETA=beta is not None, HAS_H0=h0 is not None, SAVE_E=is_delta and save,
        )
        if save:
            ctx.save_for_backward(q, k, v, g, beta, h0, e if is_delta else None, ht)
        ctx.scale, ctx.is_delta = scale, is_delta
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, e, ht = ctx.saved_tensors
        scale, is_delta = ctx.scale, ctx.is_delta
        B, T, H, K = k.shape
        V = v.shape[-1]
        BK, BV = block_sizes(K, V)
        NV = triton.cdiv(V, BV)
        key_decay = g.dim() == 4
        f32 = torch.float32
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dk_g = k.new_empty(NV, B, T, H, K, dtype=f32)
        dk_s = k.new_zeros(NV, B, T, H, K, dtype=f32) if is_delta else dk_g
        dq = k.new_empty(NV, B, T, H, K, dtype=f32)
        dv = torch.empty_like(v)
        dbeta = k.new_empty(NV, B, T, H, dtype=f32) if beta is not None else None
        dr = k.new_empty(B, T, H, V, dtype=f32) if is_delta else dv
        dh0 = k.new_empty(B, H, K, V, dtype=f32)
        e = e if is_delta else dv  # unread when not the delta rule
        beta_arg = beta if beta is not None else g
        _bwd_reverse[(NV, B * H)](
            q, k, v, g, beta_arg, e, do, dht.contiguous() if dht is not None else dh0, dk_g,
            dv, dbeta if dbeta is not None else dk_g, dr, dh0, scale, T, B, H, K, V, BK, BV,
            IS_DELTA=is_delta, KEY_DECAY=key_decay, HAS_BETA=beta is not None,
            HAS_DHT=dht is not None,
        )
        _bwd_forward[(NV, B * H)](
            k, v, g, beta_arg, h0 if h0 is not None else dh0, e, do, dr, dq, dk_s, scale, T, B,
            H, K, V, BK, BV, IS_DELTA=is_delta, KEY_DECAY=key_decay,
            HAS_BETA=beta is not None, HAS_H0=h0 is not None,
        )
        dq, dk_g = dq.sum(0), dk_g.sum(0)
        dk_s = dk_s.sum(0) if is_delta else None
        dk = dk_g + dk_s if is_delta else dk_g
        # dg_t = reverse_cumsum(q⊙dq - k⊙dk_G + k⊙dk_S) + <D_T, S_T> (module docstring)
        dgam = q.float() * dq - k.float() * (dk_g - dk_s if is_delta else dk_g)
        dg = grad_decay(reverse_cumsum(dgam, dim=1), dht, ht, key_decay)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype),
            None if beta is None else dbeta.sum(0).to(beta.dtype),
            None if h0 is None else dh0.to(h0.dtype), None, None,
        )

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

from archkit.kernels.triton._common import block_sizes, grad_decay, reverse_cumsum


@triton.jit
def _fwd(
    q, k, v, g, beta, h0, o, ht, e, scale, T, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr,
    KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_E: tl.constexpr,
):
    """o_t = scale S_t^T q_t for every t, S_T -> ht; e_t -> e (delta rule, for backward)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V  # head dims padded to powers of two: masked lanes stay 0
    mkv = mk[:, None] & mv[None, :]
    row = (i_b * T * H + i_h).to(tl.int64)  # token 0 of this head in [B, T, H, ...]
    p_k = k + row * K + ok
    p_q = q + row * K + ok
    p_v = v + row * V + ov
    p_o = o + row * V + ov
    p_e = e + row * V + ov
    p_g = g + row * K + ok if KEY_DECAY else g + row
    p_b = beta + row

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                     mask=mkv, other=0).to(tl.float32)
    for _ in range(T):
        q_t = tl.load(p_q, mask=mk, other=0).to(tl.float32) * scale
        k_t = tl.load(p_k, mask=mk, other=0).to(tl.float32)
        v_t = tl.load(p_v, mask=mv, other=0).to(tl.float32)
        if KEY_DECAY:
            S *= tl.exp(tl.load(p_g, mask=mk, other=0).to(tl.float32))[:, None]
        else:
            S *= tl.exp(tl.load(p_g).to(tl.float32))
        if IS_DELTA:
            e_t = v_t - tl.sum(k_t[:, None] * S, 0)  # what S fails to recall for k_t
            if SAVE_E:
                tl.store(p_e, e_t, mask=mv)
        else:
            e_t = v_t
        u_t = tl.load(p_b).to(tl.float32) * e_t if HAS_BETA else e_t
        S += k_t[:, None] * u_t[None, :]
        tl.store(p_o, tl.sum(q_t[:, None] * S, 0).to(o.dtype.element_ty), mask=mv)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
        p_e += H * V
        p_g += H * K if KEY_DECAY else H
        p_b += H
    tl.store(ht + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :], S, mask=mkv)


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
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    row = (i_b * T * H + i_h).to(tl.int64) + (T - 1) * H  # last token of this head
    part = i_v.to(tl.int64) * B * T * H  # offset of this V block's partial sums
    p_q = q + row * K + ok
    p_k = k + row * K + ok
    p_dkg = dk_g + (part + row) * K + ok
    p_v = v + row * V + ov
    p_e = e + row * V + ov
    p_do = do + row * V + ov
    p_dv = dv + row * V + ov
    p_dr = dr + row * V + ov
    p_g = g + row * K + ok if KEY_DECAY else g + row
    p_b = beta + row
    p_db = dbeta + part + row

    D = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        D += tl.load(dht + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                     mask=mkv, other=0).to(tl.float32)
    for _ in range(T):
        q_t = tl.load(p_q, mask=mk, other=0).to(tl.float32) * scale
        k_t = tl.load(p_k, mask=mk, other=0).to(tl.float32)
        do_t = tl.load(p_do, mask=mv, other=0).to(tl.float32)
        if IS_DELTA:
            e_t = tl.load(p_e, mask=mv, other=0)
        else:
            e_t = tl.load(p_v, mask=mv, other=0).to(tl.float32)
        b_t = tl.load(p_b).to(tl.float32) if HAS_BETA else 1.0
        D += q_t[:, None] * do_t[None, :]  # G = D_t + scale q_t do_t^T
        tl.store(p_dkg, tl.sum(D * (b_t * e_t)[None, :], 1), mask=mk)
        du = tl.sum(D * k_t[:, None], 0)
        tl.store(p_dv, (b_t * du).to(dv.dtype.element_ty), mask=mv)
        if HAS_BETA:
            tl.store(p_db, tl.sum(du * e_t, 0))
        if IS_DELTA:
            dr_t = -b_t * du
            tl.store(p_dr, dr_t, mask=mv)
            D += k_t[:, None] * dr_t[None, :]
        if KEY_DECAY:
            D *= tl.exp(tl.load(p_g, mask=mk, other=0).to(tl.float32))[:, None]
        else:
            D *= tl.exp(tl.load(p_g).to(tl.float32))
        p_q -= H * K
        p_k -= H * K
        p_dkg -= H * K
        p_v -= H * V
        p_e -= H * V
        p_do -= H * V
        p_dv -= H * V
        p_dr -= H * V
        p_g -= H * K if KEY_DECAY else H
        p_b -= H
        p_db -= H
    tl.store(dh0 + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :], D, mask=mkv)


@triton.jit
def _bwd_forward(
    k, v, g, beta, h0, e, do, dr, dq, dk_s, scale, T, B, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_DELTA: tl.constexpr,
    KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr, HAS_H0: tl.constexpr,
):
    """Forward pass rebuilding S_t (from the stored e_t, no recall needed): stores
    dq_t = scale S_t do_t and, delta rule, dk_S = S_a dr_t (partial sums at [i_v])."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    row = (i_b * T * H + i_h).to(tl.int64)
    part = i_v.to(tl.int64) * B * T * H
    p_k = k + row * K + ok
    p_dq = dq + (part + row) * K + ok
    p_dks = dk_s + (part + row) * K + ok
    p_v = v + row * V + ov
    p_e = e + row * V + ov
    p_do = do + row * V + ov
    p_dr = dr + row * V + ov
    p_g = g + row * K + ok if KEY_DECAY else g + row
    p_b = beta + row

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :],
                     mask=mkv, other=0).to(tl.float32)
    for _ in range(T):
        k_t = tl.load(p_k, mask=mk, other=0).to(tl.float32)
        do_t = tl.load(p_do, mask=mv, other=0).to(tl.float32)
        if KEY_DECAY:
            S *= tl.exp(tl.load(p_g, mask=mk, other=0).to(tl.float32))[:, None]
        else:
            S *= tl.exp(tl.load(p_g).to(tl.float32))
        if IS_DELTA:
            tl.store(p_dks, tl.sum(S * tl.load(p_dr, mask=mv, other=0)[None, :], 1), mask=mk)
            e_t = tl.load(p_e, mask=mv, other=0)
        else:
            e_t = tl.load(p_v, mask=mv, other=0).to(tl.float32)
        u_t = tl.load(p_b).to(tl.float32) * e_t if HAS_BETA else e_t
        S += k_t[:, None] * u_t[None, :]
        tl.store(p_dq, tl.sum(S * do_t[None, :], 1) * scale, mask=mk)
        p_k += H * K
        p_dq += H * K
        p_dks += H * K
        p_v += H * V
        p_e += H * V
        p_do += H * V
        p_dr += H * V
        p_g += H * K if KEY_DECAY else H
        p_b += H


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

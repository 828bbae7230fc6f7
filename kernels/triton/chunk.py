"""Chunked Triton kernels for the gated delta rule and the gated linear rule (scalar decay,
and per-key decay for the linear rule).

They compute what ``archkit.kernels.chunk.chunk_gated_delta_rule`` and
``chunk_gated_linear_rule`` compute (notation and derivation in that module's docstring),
and so must equal the per-token references in ``archkit.kernels.reference``. One program
per (batch*head, block of value columns) walks the chunks in order, holding the state S
[K, V-block] in registers; within a chunk of C tokens (S_0 entering it)::

    γ = cumsum(g),  Γ_tj = exp(γ_t - γ_j) for j <= t else 0
    A = strict_lower(diag(β) (K K^T ⊙ Γ))                        (delta rule only)
    T = (I + A)^{-1}                                             (forward substitution)
    U = T diag(β) (V - diag(e^γ) K S_0)     delta rule: the UT/WY pseudo-values
    U = diag(β) V                           linear rule
    O = scale (diag(e^γ) Q S_0 + (Q K^T ⊙ Γ) U)
    S_C = e^{γ_C} S_0 + (diag(e^{γ_C - γ}) K)^T U

With per-key decay (linear rule, γ_t in R^K) the decays act per key: ``Q ⊙ e^γ``,
``diag(e^{γ_C}) S_0``, ``K ⊙ e^{γ_C - γ}``, and the scores ``P_tj = Σ_d q_td k_jd
exp(γ_td - γ_jd)`` are no longer a matmul (``_key_decay_scores`` builds them exactly).

T does not depend on the value columns, so each program recomputes it for its own block
rather than exchange it. Only differences γ_t - γ_j with j <= t are exponentiated, so
nothing overflows. The padding of the last chunk (t >= T) loads as k = v = g = β = 0,
which leaves S unchanged, and is masked on store.

The forward saves each chunk's S_0 (float32, [B*H, N, K, V]); the backward walks the
chunks in reverse carrying dS (the gradient w.r.t. the state leaving the chunk), rebuilds
the chunk from its S_0 and applies the chain rule to the lines above (``_bwd``'s comments).
Gradients that sum over the value dimension (dq, dk, dβ, dg) are written per value block
and summed in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archkit.kernels.triton._common import block_sizes, chunk_config, dot_precision


@triton.jit
def _causal_decay(gam, incl):
    """Γ_tj = exp(γ_t - γ_j) where ``incl`` (j <= t), else 0. The exponent is zeroed where
    masked before exp, so the discarded upper triangle never overflows."""
    return tl.where(incl, tl.exp(tl.where(incl, gam[:, None] - gam[None, :], 0.0)), 0.0)


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr):
    """(I + A)^{-1} for a strictly lower-triangular A [BT, BT], row by row (forward
    substitution, as a triangular solve does): row i of X = e_i - Σ_{j<i} A_ij X_j. When
    row i is formed, rows j < i are final and rows j >= i are still e_j, which A_ij = 0
    (j >= i) ignores."""
    o = tl.arange(0, BT)
    X = (o[:, None] == o[None, :]).to(tl.float32)
    for i in range(1, BT):
        a_i = tl.sum(tl.where(o[:, None] == i, A, 0.0), 0)  # A[i, :], indexed by j
        x_i = (o == i).to(tl.float32) - tl.sum(a_i[:, None] * X, 0)
        X = tl.where(o[:, None] == i, x_i[None, :], X)
    return X


@triton.jit
def _key_decay_scores(b_q, b_k, gam, BT: tl.constexpr):
    """Per-key decay scores ``P_tj = Σ_d q_td k_jd exp(γ_td - γ_jd)`` for j <= t, else 0.

    Not a matmul of Q and K (the decay differs per key), and factoring it into
    ``(q e^γ)(k e^{-γ})^T`` would overflow under strong decay; so it is built exactly, one
    column j at a time, exponentiating only γ_t - γ_j <= 0 (t >= j)."""
    ot = tl.arange(0, BT)
    P = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):
        row_j = ot[:, None] == j
        k_j = tl.sum(tl.where(row_j, b_k, 0.0), 0)
        g_j = tl.sum(tl.where(row_j, gam, 0.0), 0)
        after = ot[:, None] >= j
        E = tl.where(after, tl.exp(tl.where(after, gam - g_j[None, :], 0.0)), 0.0)
        P = tl.where(ot[None, :] == j, tl.sum(b_q * k_j[None, :] * E, 1)[:, None], P)
    return P


@triton.jit
def _key_decay_scores_bwd(b_q, b_k, gam, dP, BT: tl.constexpr, BK: tl.constexpr):
    """Gradients of ``_key_decay_scores`` w.r.t. q and k given dP:
    ``dq_td = Σ_j dP_tj k_jd E_tjd``, ``dk_jd = Σ_t dP_tj q_td E_tjd``,
    E_tjd = exp(γ_td - γ_jd) (j <= t). The decay's share is ``q⊙dq - k⊙dk`` (on γ)."""
    ot = tl.arange(0, BT)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    for j in range(BT):
        row_j = ot[:, None] == j
        k_j = tl.sum(tl.where(row_j, b_k, 0.0), 0)
        g_j = tl.sum(tl.where(row_j, gam, 0.0), 0)
        after = ot[:, None] >= j
        E = tl.where(after, tl.exp(tl.where(after, gam - g_j[None, :], 0.0)), 0.0)
        dp_j = tl.sum(tl.where(ot[None, :] == j, dP, 0.0), 1)  # column j of dP
        dq += dp_j[:, None] * k_j[None, :] * E
        dk = tl.where(row_j, tl.sum(dp_j[:, None] * b_q * E, 0)[None, :], dk)
    return dq, dk


@triton.jit
def _fwd(
    q, k, v, g, beta, h0, o, ht, hs, scale, T, NT, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_DELTA: tl.constexpr, KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    """O (module docstring) for every chunk, S_T -> ht, each chunk's S_0 -> hs[i_bh, n].
    KEY_DECAY (linear rule only): g is [B, T, H, K] and γ, e^γ act per key column."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    incl = ot[:, None] >= ot[None, :]
    strict = ot[:, None] > ot[None, :]
    row0 = (i_b * T * H + i_h).to(tl.int64)
    state = ok[:, None] * V + ov[None, :]

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_bh.to(tl.int64) * K * V + state, mask=mkv, other=0).to(tl.float32)
    for n in range(NT):
        t = n * BT + ot
        mt = t < T
        rows = row0 + t.to(tl.int64) * H  # [BT] token rows in [B, T, H, ...]
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        b_q = tl.load(q + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_k = tl.load(k + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_v = tl.load(v + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        if HAS_BETA:
            b_b = tl.load(beta + rows, mask=mt, other=0).to(tl.float32)
        else:
            b_b = mt.to(tl.float32)
        if SAVE_STATES:
            tl.store(hs + (i_bh.to(tl.int64) * NT + n) * K * V + state, S, mask=mkv)

        if KEY_DECAY:  # γ [BT, BK], γ_C [BK]
            b_g = tl.load(g + rows[:, None] * K + ok[None, :], mask=m_tk, other=0)
            gam = tl.cumsum(b_g.to(tl.float32), 0)
            gam_C = tl.sum(b_g.to(tl.float32), 0)
            U = b_b[:, None] * b_v
            P = _key_decay_scores(b_q, b_k, gam, BT)
            b_qe = b_q * tl.exp(gam)
            b_kd = b_k * tl.exp(gam_C[None, :] - gam)  # diag(e^{γ_C - γ}) K, per key
            decay_C = tl.exp(gam_C)[:, None]
        else:  # γ [BT], γ_C a scalar
            b_g = tl.load(g + rows, mask=mt, other=0).to(tl.float32)
            gam = tl.cumsum(b_g, 0)
            gam_C = tl.sum(b_g, 0)
            eg = tl.exp(gam)
            Gam = _causal_decay(gam, incl)
            if IS_DELTA:
                KK = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
                A = tl.where(strict, b_b[:, None] * KK * Gam, 0.0)
                Tinv = _unit_lower_inverse(A, BT)
                KS = tl.dot(b_k, S, input_precision=PREC)
                U = tl.dot(Tinv, b_b[:, None] * (b_v - eg[:, None] * KS), input_precision=PREC)
            else:
                U = b_b[:, None] * b_v
            P = tl.where(incl, tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * Gam, 0.0)
            b_qe = b_q * eg[:, None]
            b_kd = b_k * tl.exp(gam_C - gam)[:, None]
            decay_C = tl.exp(gam_C)
        b_o = tl.dot(b_qe, S, input_precision=PREC) + tl.dot(P, U, input_precision=PREC)
        tl.store(o + rows[:, None] * V + ov[None, :], (scale * b_o).to(o.dtype.element_ty),
                 mask=m_tv)
        S = decay_C * S + tl.dot(tl.trans(b_kd), U, input_precision=PREC)
    tl.store(ht + i_bh.to(tl.int64) * K * V + state, S, mask=mkv)


@triton.jit
def _bwd(
    q, k, v, g, beta, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, scale, T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_DELTA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DHT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Chunks in reverse; dS enters as the final-state gradient and leaves as dh0.

    dq, dk, dβ, dg are this program's partial sums over its value block, at [i_v]; dg is
    reverse-cumulated within the chunk from dγ (γ_t = g_1 + ... + g_t)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    incl = ot[:, None] >= ot[None, :]
    strict = ot[:, None] > ot[None, :]
    row0 = (i_b * T * H + i_h).to(tl.int64)
    part = i_v.to(tl.int64) * B * T * H  # offset of this value block's partial sums
    state = ok[:, None] * V + ov[None, :]

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + i_bh.to(tl.int64) * K * V + state, mask=mkv, other=0).to(tl.float32)
    for i in range(NT):
        n = NT - 1 - i
        t = n * BT + ot
        mt = t < T
        rows = row0 + t.to(tl.int64) * H
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        b_q = tl.load(q + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_k = tl.load(k + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_v = tl.load(v + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        b_do = tl.load(do + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        b_g = tl.load(g + rows, mask=mt, other=0).to(tl.float32)
        if HAS_BETA:
            b_b = tl.load(beta + rows, mask=mt, other=0).to(tl.float32)
        else:
            b_b = mt.to(tl.float32)
        S0 = tl.load(hs + (i_bh.to(tl.int64) * NT + n) * K * V + state, mask=mkv, other=0)

        # rebuild the chunk's forward quantities
        gam = tl.cumsum(b_g, 0)
        gam_C = tl.sum(b_g, 0)
        eg = tl.exp(gam)
        dec_end = tl.exp(gam_C - gam)  # e^{γ_C - γ_t}
        Gam = _causal_decay(gam, incl)
        QK = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        P = tl.where(incl, QK * Gam, 0.0)
        if IS_DELTA:
            KK = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
            A = tl.where(strict, b_b[:, None] * KK * Gam, 0.0)
            Tinv = _unit_lower_inverse(A, BT)
            KS = tl.dot(b_k, S0, input_precision=PREC)
            resid = b_v - eg[:, None] * KS  # U = T diag(β) resid
            U = tl.dot(Tinv, b_b[:, None] * resid, input_precision=PREC)
        else:
            U = b_b[:, None] * b_v

        # O = scale (diag(e^γ) Q S_0 + P U),  P = QK^T ⊙ Γ
        dP = tl.where(incl, scale * tl.dot(b_do, tl.trans(U), input_precision=PREC), 0.0)
        dPG = dP * Gam
        dOS = scale * tl.dot(b_do, tl.trans(S0), input_precision=PREC)  # scale dO S_0^T
        b_dq = eg[:, None] * dOS + tl.dot(dPG, b_k, input_precision=PREC)
        tl.store(dq + (part + rows)[:, None] * K + ok[None, :], b_dq, mask=m_tk)  # now: frees it
        b_dk = tl.dot(tl.trans(dPG), b_q, input_precision=PREC)
        dU = scale * tl.dot(tl.trans(P), b_do, input_precision=PREC)
        M = dPG * QK  # dΓ_tj Γ_tj: the exponent γ_t - γ_j gets +M_tj at t, -M_tj at j
        dgam = tl.sum(b_q * eg[:, None] * dOS, 1) + tl.sum(M, 1) - tl.sum(M, 0)
        dS0 = scale * tl.dot(tl.trans(b_q * eg[:, None]), b_do, input_precision=PREC)

        # S_C = e^{γ_C} S_0 + (diag(e^{γ_C - γ}) K)^T U
        dU += tl.dot(b_k * dec_end[:, None], dS, input_precision=PREC)
        W = tl.dot(U, tl.trans(dS), input_precision=PREC)  # U dS^T  [BT, BK]
        b_dk += dec_end[:, None] * W
        z = dec_end * tl.sum(b_k * W, 1)  # d e^{γ_C - γ_t} times that factor
        dgam -= z
        dgam_C = tl.sum(z, 0) + tl.exp(gam_C) * tl.sum(tl.sum(dS * S0, 1), 0)
        dS0 += tl.exp(gam_C) * dS

        if IS_DELTA:
            # U = (I + A)^{-1} R,  R = diag(β) resid:  dR = T^T dU,  dA = -dR U^T (strictly lower)
            dR = tl.dot(tl.trans(Tinv), dU, input_precision=PREC)
            dA = tl.where(strict, -tl.dot(dR, tl.trans(U), input_precision=PREC), 0.0)
            b_dv = b_b[:, None] * dR
            # A_tj = β_t Γ_tj k_t·k_j:  d(KK^T) = Bm,  dK += (Bm + Bm^T) K
            Bm = dA * b_b[:, None] * Gam
            b_db = tl.sum(dR * resid, 1) + tl.sum(dA * KK * Gam, 1)
            # resid = V - diag(e^γ) K S_0:  d(K S_0) = -diag(β e^γ) dR
            beg = b_b * eg
            b_dk -= beg[:, None] * tl.dot(dR, tl.trans(S0), input_precision=PREC)
            b_dk += tl.dot(Bm, b_k, input_precision=PREC)
            b_dk += tl.dot(tl.trans(Bm), b_k, input_precision=PREC)
            MA = Bm * KK
            dgam += tl.sum(MA, 1) - tl.sum(MA, 0) - beg * tl.sum(dR * KS, 1)
            dS0 -= tl.dot(tl.trans(b_k * beg[:, None]), dR, input_precision=PREC)
        else:
            b_dv = b_b[:, None] * dU
            b_db = tl.sum(dU * b_v, 1)

        # γ_C is γ at the chunk's last (possibly padded) position; dg_s = Σ_{t >= s} dγ_t
        dgam += tl.where(ot == BT - 1, dgam_C, 0.0)
        b_dg = tl.sum(tl.where(ot[None, :] >= ot[:, None], dgam[None, :], 0.0), 1)

        tl.store(dk + (part + rows)[:, None] * K + ok[None, :], b_dk, mask=m_tk)
        tl.store(dv + rows[:, None] * V + ov[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        if HAS_BETA:
            tl.store(dbeta + part + rows, b_db, mask=mt)
        tl.store(dg + part + rows, b_dg, mask=mt)
        dS = dS0
    tl.store(dh0 + i_bh.to(tl.int64) * K * V + state, dS, mask=mkv)


@triton.jit
def _bwd_key_decay(
    q, k, v, g, beta, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, scale, T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):
    """``_bwd`` for the linear rule with per-key decay (γ [BT, BK]); U = diag(β) V::

        O   = scale ((Q ⊙ e^γ) S_0 + P U),      P_tj = Σ_d q_td k_jd e^{γ_td - γ_jd}
        S_C = diag(e^{γ_C}) S_0 + (K ⊙ e^{γ_C - γ})^T U

    Every exponent γ_td enters as a factor on q_td or k_td (or on row d of S), so its
    gradient is ``q⊙dq - k⊙dk`` from the terms where it multiplies q or divides k, plus
    the S_C terms; dg is its reverse cumsum within the chunk, per key."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    mkv = mk[:, None] & mv[None, :]
    incl = ot[:, None] >= ot[None, :]
    row0 = (i_b * T * H + i_h).to(tl.int64)
    part = i_v.to(tl.int64) * B * T * H
    state = ok[:, None] * V + ov[None, :]

    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + i_bh.to(tl.int64) * K * V + state, mask=mkv, other=0).to(tl.float32)
    for i in range(NT):
        n = NT - 1 - i
        t = n * BT + ot
        mt = t < T
        rows = row0 + t.to(tl.int64) * H
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        b_q = tl.load(q + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_k = tl.load(k + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_g = tl.load(g + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
        b_v = tl.load(v + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        b_do = tl.load(do + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        if HAS_BETA:
            b_b = tl.load(beta + rows, mask=mt, other=0).to(tl.float32)
        else:
            b_b = mt.to(tl.float32)
        S0 = tl.load(hs + (i_bh.to(tl.int64) * NT + n) * K * V + state, mask=mkv, other=0)

        gam = tl.cumsum(b_g, 0)
        gam_C = tl.sum(b_g, 0)
        eg = tl.exp(gam)
        b_kd = b_k * tl.exp(gam_C[None, :] - gam)
        U = b_b[:, None] * b_v
        P = _key_decay_scores(b_q, b_k, gam, BT)

        # O: the S_0 read and the scores
        dP = tl.where(incl, scale * tl.dot(b_do, tl.trans(U), input_precision=PREC), 0.0)
        dq_p, dk_p = _key_decay_scores_bwd(b_q, b_k, gam, dP, BT, BK)
        b_dq = eg * (scale * tl.dot(b_do, tl.trans(S0), input_precision=PREC)) + dq_p
        dgam = b_q * b_dq - b_k * dk_p
        dU = scale * tl.dot(tl.trans(P), b_do, input_precision=PREC)
        dS0 = scale * tl.dot(tl.trans(b_q * eg), b_do, input_precision=PREC)

        # S_C: the decayed S_0 and the chunk's writes
        dU += tl.dot(b_kd, dS, input_precision=PREC)
        W = tl.dot(U, tl.trans(dS), input_precision=PREC)  # U dS^T  [BT, BK]
        b_dk = dk_p + tl.exp(gam_C[None, :] - gam) * W
        z = b_kd * W
        dgam -= z
        dgam_C = tl.sum(z, 0) + tl.exp(gam_C) * tl.sum(dS * S0, 1)  # [BK]
        dS0 += tl.exp(gam_C)[:, None] * dS

        dgam += tl.where(ot[:, None] == BT - 1, dgam_C[None, :], 0.0)
        b_dg = tl.cumsum(dgam, 0, reverse=True)  # dg_s = Σ_{t >= s} dγ_t, per key

        tl.store(dq + (part + rows)[:, None] * K + ok[None, :], b_dq, mask=m_tk)
        tl.store(dk + (part + rows)[:, None] * K + ok[None, :], b_dk, mask=m_tk)
        tl.store(dg + (part + rows)[:, None] * K + ok[None, :], b_dg, mask=m_tk)
        tl.store(dv + rows[:, None] * V + ov[None, :], (b_b[:, None] * dU).to(dv.dtype.element_ty),
                 mask=m_tv)
        if HAS_BETA:
            tl.store(dbeta + part + rows, tl.sum(dU * b_v, 1), mask=mt)
        dS = dS0
    tl.store(dh0 + i_bh.to(tl.int64) * K * V + state, dS, mask=mkv)


class ChunkRule(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels: g [B, T, H], or [B, T, H, K] for the
    linear rule (per-key decay).

    ``forward(q, k, v, g, beta, h0, scale, is_delta, chunk_size) -> (o, S_T)``: o in q's
    dtype, S_T float32; beta and h0 may be None. Inputs must be contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, is_delta, chunk_size):
        B, T, H, K = k.shape
        V = v.shape[-1]
        BK, BV = block_sizes(K, V)
        BT, num_warps = chunk_config(K, g.dim() == 4, chunk_size)  # BT: a power of two >= 16
        NT, NV = triton.cdiv(T, BT), triton.cdiv(V, BV)
        save = any(ctx.needs_input_grad[:6])
        prec = dot_precision(q, k, v)
        o = v.new_empty(B, T, H, V, dtype=q.dtype)
        ht = k.new_empty(B, H, K, V, dtype=torch.float32)
        hs = k.new_empty(B * H, NT, K, V, dtype=torch.float32) if save else ht
        _fwd[(NV, B * H)](
            q, k, v, g, beta if beta is not None else g, h0 if h0 is not None else ht, o, ht,
            hs, scale, T, NT, H, K, V, BT, BK, BV, IS_DELTA=is_delta, KEY_DECAY=g.dim() == 4,
            HAS_BETA=beta is not None, HAS_H0=h0 is not None, SAVE_STATES=save, PREC=prec,
            num_warps=num_warps,
        )
        if save:
            ctx.save_for_backward(q, k, v, g, beta, h0, hs)
        ctx.scale, ctx.is_delta, ctx.prec = scale, is_delta, prec
        ctx.BT, ctx.num_warps = BT, num_warps
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, hs = ctx.saved_tensors
        B, T, H, K = k.shape
        V = v.shape[-1]
        BK, BV = block_sizes(K, V)
        NT, NV = triton.cdiv(T, ctx.BT), triton.cdiv(V, BV)
        f32 = torch.float32
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dq = k.new_empty(NV, B, T, H, K, dtype=f32)
        dk = k.new_empty(NV, B, T, H, K, dtype=f32)
        dv = torch.empty_like(v)
        dbeta = k.new_empty(NV, B, T, H, dtype=f32) if beta is not None else dq
        dg = k.new_empty(NV, *g.shape, dtype=f32)
        dh0 = k.new_empty(B, H, K, V, dtype=f32)
        args = (q, k, v, g, beta if beta is not None else g, hs, do,
                dht.contiguous() if dht is not None else dh0, dq, dk, dv, dbeta, dg, dh0,
                ctx.scale, T, NT, B, H, K, V, ctx.BT, BK, BV)
        flags = {"HAS_BETA": beta is not None, "HAS_DHT": dht is not None, "PREC": ctx.prec,
                 "num_warps": ctx.num_warps}
        if g.dim() == 4:
            _bwd_key_decay[(NV, B * H)](*args, **flags)
        else:
            _bwd[(NV, B * H)](*args, IS_DELTA=ctx.is_delta, **flags)
        return (
            dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dg.sum(0).to(g.dtype),
            None if beta is None else dbeta.sum(0).to(beta.dtype),
            None if h0 is None else dh0.to(h0.dtype), None, None, None,
        )

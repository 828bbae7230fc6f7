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

from archkit.kernels.triton._common import (
    block_offsets,
    block_sizes,
    chunk_config,
    dot_precision,
    load_state,
    state_block,
    store_state,
)


@triton.jit
def _causal_decay(gam, incl):
    """Γ_tj = exp(γ_t - γ_j) where ``incl`` (j <= t), else 0. The exponent is zeroed where
    masked before exp, so the discarded upper triangle never overflows. Each helper that
    needs Γ builds it (there is no Γ to pass under per-key decay); the compiler merges the
    copies (sm_90: as many exps in the backward as with one)."""
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
def _key_decay_column(b_k, gam, j, BT: tl.constexpr):
    """Key row j of the chunk, k_j [BK], and its decays E_tjd = exp(γ_td - γ_jd) [BT, BK]
    for t >= j, else 0: only γ_t - γ_j <= 0 is exponentiated."""
    ot = tl.arange(0, BT)
    row_j = ot[:, None] == j
    k_j = tl.sum(tl.where(row_j, b_k, 0.0), 0)
    g_j = tl.sum(tl.where(row_j, gam, 0.0), 0)
    after = ot[:, None] >= j
    return k_j, tl.where(after, tl.exp(tl.where(after, gam - g_j[None, :], 0.0)), 0.0)


@triton.jit
def _key_decay_scores(b_q, b_k, gam, BT: tl.constexpr):
    """Per-key decay scores ``P_tj = Σ_d q_td k_jd exp(γ_td - γ_jd)`` for j <= t, else 0.

    Not a matmul of Q and K (the decay differs per key), and factoring it into
    ``(q e^γ)(k e^{-γ})^T`` would overflow under strong decay; so it is built exactly, one
    column j at a time (``_key_decay_column``)."""
    ot = tl.arange(0, BT)
    P = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(BT):
        k_j, E = _key_decay_column(b_k, gam, j, BT)
        P = tl.where(ot[None, :] == j, tl.sum(b_q * k_j[None, :] * E, 1)[:, None], P)
    return P


@triton.jit
def _key_decay_scores_bwd(b_q, b_k, gam, dP, BT: tl.constexpr, BK: tl.constexpr):
    """Gradients of ``_key_decay_scores`` w.r.t. q and k given dP:
    ``dq_td = Σ_j dP_tj k_jd E_tjd``, ``dk_jd = Σ_t dP_tj q_td E_tjd``,
    E_tjd = exp(γ_td - γ_jd) (j <= t)."""
    ot = tl.arange(0, BT)
    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    for j in range(BT):
        k_j, E = _key_decay_column(b_k, gam, j, BT)
        dp_j = tl.sum(tl.where(ot[None, :] == j, dP, 0.0), 1)  # column j of dP
        dq += dp_j[:, None] * k_j[None, :] * E
        dk = tl.where(ot[:, None] == j, tl.sum(dp_j[:, None] * b_q * E, 0)[None, :], dk)
    return dq, dk


@triton.jit
def _decay_offsets(rows, ok, mt, m_tk, K: tl.constexpr, KEY_DECAY: tl.constexpr):
    """Offsets and mask of the decay entries of token rows ``rows`` in a [.., T, H] tensor,
    or [.., T, H, K] with KEY_DECAY."""
    if KEY_DECAY:
        offsets, mask = rows[:, None] * K + ok[None, :], m_tk
    else:
        offsets, mask = rows, mt
    return offsets, mask


@triton.jit
def _chunk_rows(n, row0, mk, mv, T, H: tl.constexpr, BT: tl.constexpr):
    """``(rows, mt, m_tk, m_tv)``: chunk n's token rows in [B, T, H, ...] tensors and their
    masks, alone (t < T), with the key columns and with the value columns."""
    t = n * BT + tl.arange(0, BT)
    mt = t < T
    return row0 + t.to(tl.int64) * H, mt, mt[:, None] & mk[None, :], mt[:, None] & mv[None, :]


@triton.jit
def _load_chunk(q, k, v, g, beta, rows, mt, m_tk, m_tv, ok, ov, K: tl.constexpr,
                V: tl.constexpr, KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr):
    """A chunk's float32 tiles ``(q, k, v, β, γ, γ_C)``: q, k [BT, BK], v [BT, BV], β [BT]
    (1 without beta), γ = cumsum(g) [BT] ([BT, BK] with KEY_DECAY) and γ_C, γ's last row.
    Tokens past T load as zeros."""
    b_q = tl.load(q + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
    b_k = tl.load(k + rows[:, None] * K + ok[None, :], mask=m_tk, other=0).to(tl.float32)
    b_v = tl.load(v + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
    b_b = (tl.load(beta + rows, mask=mt, other=0) if HAS_BETA else mt).to(tl.float32)
    g_offsets, m_g = _decay_offsets(rows, ok, mt, m_tk, K, KEY_DECAY)
    b_g = tl.load(g + g_offsets, mask=m_g, other=0).to(tl.float32)
    return b_q, b_k, b_v, b_b, tl.cumsum(b_g, 0), tl.sum(b_g, 0)


@triton.jit
def _decay_factors(gam, gam_C, KEY_DECAY: tl.constexpr):
    """``(e^γ, e^{γ_C - γ}, e^{γ_C})`` shaped to scale rows: the first two of a [BT, BK]
    tile (one factor per token, or with KEY_DECAY per token and key), the last of the state
    [BK, BV] (a scalar, or one factor per key)."""
    if KEY_DECAY:
        e_q, e_k, e_C = tl.exp(gam), tl.exp(gam_C[None, :] - gam), tl.exp(gam_C)[:, None]
    else:
        e_q, e_k, e_C = tl.exp(gam)[:, None], tl.exp(gam_C - gam)[:, None], tl.exp(gam_C)
    return e_q, e_k, e_C


@triton.jit
def _decay_shaped(x, KEY_DECAY: tl.constexpr):
    """A gradient whose last axis runs over keys, in γ's shape: summed over the keys for
    scalar decay (one γ per token), unchanged per key."""
    return x if KEY_DECAY else tl.sum(x, -1)


@triton.jit
def _scores(b_q, b_k, gam, BT: tl.constexpr, PREC: tl.constexpr, KEY_DECAY: tl.constexpr):
    """The scores P = (Q K^T) ⊙ Γ, or with KEY_DECAY ``_key_decay_scores``."""
    if KEY_DECAY:
        P = _key_decay_scores(b_q, b_k, gam, BT)
    else:
        ot = tl.arange(0, BT)
        incl = ot[:, None] >= ot[None, :]
        QK = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        P = tl.where(incl, QK * _causal_decay(gam, incl), 0.0)
    return P


@triton.jit
def _scores_bwd(b_q, b_k, gam, P, dP, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                KEY_DECAY: tl.constexpr):
    """Gradients of ``_scores`` given dP: ``(dq, dk, dγ)``. Each γ_t enters P as e^{γ_t} on
    q_t and e^{-γ_t} on k_t, so dγ = q⊙dq - k⊙dk, per key with KEY_DECAY. Scalar decay
    takes the same sum over M = dP ⊙ P = dΓ ⊙ Γ instead (the exponent γ_t - γ_j of Γ_tj
    gets +M_tj at t, -M_tj at j): measured under the interpreter, up to 2x less error in
    dg than the K-long products of q·dq - k·dk."""
    if KEY_DECAY:
        dq, dk = _key_decay_scores_bwd(b_q, b_k, gam, dP, BT, BK)
        dgam = b_q * dq - b_k * dk
    else:
        ot = tl.arange(0, BT)
        dPG = dP * _causal_decay(gam, ot[:, None] >= ot[None, :])
        dq = tl.dot(dPG, b_k, input_precision=PREC)
        dk = tl.dot(tl.trans(dPG), b_q, input_precision=PREC)
        M = dP * P
        dgam = tl.sum(M, 1) - tl.sum(M, 0)
    return dq, dk, dgam


@triton.jit
def _values(b_k, b_v, b_b, S0, e_q, gam, BT: tl.constexpr, PREC: tl.constexpr,
            IS_DELTA: tl.constexpr):
    """``(U, delta)``: the values U, and what the delta rule's backward reuses of them,
    ``delta = (Γ, K K^T, T, K S_0, resid)`` (``()`` for the linear rule). Delta rule
    (scalar decay): A, T as in the module docstring, U = T diag(β) resid with the residual
    resid = V - diag(e^γ) K S_0; linear rule: U = diag(β) V."""
    if IS_DELTA:
        ot = tl.arange(0, BT)
        Gam = _causal_decay(gam, ot[:, None] >= ot[None, :])
        KK = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
        A = tl.where(ot[:, None] > ot[None, :], b_b[:, None] * KK * Gam, 0.0)
        Tinv = _unit_lower_inverse(A, BT)
        KS = tl.dot(b_k, S0, input_precision=PREC)
        resid = b_v - e_q * KS
        U = tl.dot(Tinv, b_b[:, None] * resid, input_precision=PREC)
        delta = (Gam, KK, Tinv, KS, resid)
    else:
        U = b_b[:, None] * b_v
        delta = ()
    return U, delta


@triton.jit
def _fwd(
    q, k, v, g, beta, h0, o, ht, hs, scale, T, NT, H: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_DELTA: tl.constexpr, KEY_DECAY: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    """O (module docstring) for every chunk, S_T -> ht, each chunk's S_0 -> hs[i_bh, n].
    KEY_DECAY (linear rule only): g is [B, T, H, K] and γ, e^γ act per key column."""
    i_bh, ok, ov, mk, mv, row0 = block_offsets(T, H, K, V, BK, BV)
    S = load_state(h0 + i_bh * K * V, ok, ov, mk, mv, V, HAS_H0, BK, BV)
    for n in range(NT):
        rows, mt, m_tk, m_tv = _chunk_rows(n, row0, mk, mv, T, H, BT)
        b_q, b_k, b_v, b_b, gam, gam_C = _load_chunk(
            q, k, v, g, beta, rows, mt, m_tk, m_tv, ok, ov, K, V, KEY_DECAY, HAS_BETA)
        if SAVE_STATES:
            store_state(hs + (i_bh * NT + n) * K * V, S, ok, ov, mk, mv, V)
        e_q, e_k, e_C = _decay_factors(gam, gam_C, KEY_DECAY)
        P = _scores(b_q, b_k, gam, BT, PREC, KEY_DECAY)
        U, _ = _values(b_k, b_v, b_b, S, e_q, gam, BT, PREC, IS_DELTA)
        b_o = tl.dot(b_q * e_q, S, input_precision=PREC) + tl.dot(P, U, input_precision=PREC)
        tl.store(o + rows[:, None] * V + ov[None, :], (scale * b_o).to(o.dtype.element_ty),
                 mask=m_tv)
        S = e_C * S + tl.dot(tl.trans(b_k * e_k), U, input_precision=PREC)
    store_state(ht + i_bh * K * V, S, ok, ov, mk, mv, V)


@triton.jit
def _bwd(
    q, k, v, g, beta, hs, do, dht, dq, dk, dv, dbeta, dg, dh0, scale, T, NT, B,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_DELTA: tl.constexpr, KEY_DECAY: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):
    """Chunks in reverse; dS enters as the final-state gradient and leaves as dh0. Each
    chunk is rebuilt from its S_0 (hs), then the chain rule runs through O and S_C (module
    docstring) and, for the delta rule, through U. KEY_DECAY as for ``_fwd``.

    dγ: each γ_t enters as a factor e^{±γ_t} on row t of Q or K: e^{γ_t} on q_t in O, and
    on k_t in the delta rule's residual and as row t of A's Γ; e^{-γ_t} on k_t in the
    scores, in S_C and as column t of A's Γ. So each term adds ±x_t·dx_t for the row x it
    scales, per key (x_t ⊙ dx_t) with KEY_DECAY; γ_C's gradient is gathered apart. dq, dk,
    dβ, dg are this program's partial sums over its value block, at [i_v]."""
    i_bh, ok, ov, mk, mv, row0 = block_offsets(T, H, K, V, BK, BV)
    part = tl.program_id(0).to(tl.int64) * B * T * H  # this value block's partial sums
    ot = tl.arange(0, BT)
    incl = ot[:, None] >= ot[None, :]
    strict = ot[:, None] > ot[None, :]
    dS = load_state(dht + i_bh * K * V, ok, ov, mk, mv, V, HAS_DHT, BK, BV)
    for i in range(NT):
        n = NT - 1 - i
        rows, mt, m_tk, m_tv = _chunk_rows(n, row0, mk, mv, T, H, BT)
        b_q, b_k, b_v, b_b, gam, gam_C = _load_chunk(
            q, k, v, g, beta, rows, mt, m_tk, m_tv, ok, ov, K, V, KEY_DECAY, HAS_BETA)
        b_do = tl.load(do + rows[:, None] * V + ov[None, :], mask=m_tv, other=0).to(tl.float32)
        hs_block, mkv = state_block(hs + (i_bh * NT + n) * K * V, ok, ov, mk, mv, V)
        S0 = tl.load(hs_block, mask=mkv, other=0)
        e_q, e_k, e_C = _decay_factors(gam, gam_C, KEY_DECAY)
        P = _scores(b_q, b_k, gam, BT, PREC, KEY_DECAY)
        U, delta = _values(b_k, b_v, b_b, S0, e_q, gam, BT, PREC, IS_DELTA)

        # O = scale (diag(e^γ) Q S_0 + P U)
        dP = tl.where(incl, scale * tl.dot(b_do, tl.trans(U), input_precision=PREC), 0.0)
        dq_P, b_dk, dgam = _scores_bwd(b_q, b_k, gam, P, dP, BT, BK, PREC, KEY_DECAY)
        dq_S = e_q * (scale * tl.dot(b_do, tl.trans(S0), input_precision=PREC))
        b_dq = dq_S + dq_P
        dgam += _decay_shaped(b_q * dq_S, KEY_DECAY)  # the S_0 read: e^{γ_t} on q_t
        tl.store(dq + (part + rows)[:, None] * K + ok[None, :], b_dq, mask=m_tk)  # now: frees it
        dU = scale * tl.dot(tl.trans(P), b_do, input_precision=PREC)
        dS0 = scale * tl.dot(tl.trans(b_q * e_q), b_do, input_precision=PREC)

        # S_C = e^{γ_C} S_0 + (diag(e^{γ_C - γ}) K)^T U
        b_kd = b_k * e_k
        dU += tl.dot(b_kd, dS, input_precision=PREC)
        W = tl.dot(U, tl.trans(dS), input_precision=PREC)  # U dS^T  [BT, BK]
        b_dk += e_k * W
        z = _decay_shaped(b_kd * W, KEY_DECAY)  # e^{γ_C - γ_t} on k_t: -z at γ_t, +z at γ_C
        dgam -= z
        dgam_C = tl.sum(z, 0) + tl.exp(gam_C) * _decay_shaped(tl.sum(dS * S0, 1), KEY_DECAY)
        dS0 += e_C * dS

        if IS_DELTA:
            Gam, KK, Tinv, KS, resid = delta
            # U = (I + A)^{-1} R,  R = diag(β) resid:  dR = T^T dU,  dA = -dR U^T (strictly lower)
            dR = tl.dot(tl.trans(Tinv), dU, input_precision=PREC)
            dA = tl.where(strict, -tl.dot(dR, tl.trans(U), input_precision=PREC), 0.0)
            b_dv = b_b[:, None] * dR
            # A_tj = β_t Γ_tj k_t·k_j:  d(KK^T) = Bm,  dK += (Bm + Bm^T) K
            Bm = dA * b_b[:, None] * Gam
            b_db = tl.sum(dR * resid, 1) + tl.sum(dA * KK * Gam, 1)
            # resid = V - diag(e^γ) K S_0:  d(K S_0) = -diag(β e^γ) dR
            beg = b_b * tl.exp(gam)
            b_dk -= beg[:, None] * tl.dot(dR, tl.trans(S0), input_precision=PREC)
            b_dk += tl.dot(Bm, b_k, input_precision=PREC)
            b_dk += tl.dot(tl.trans(Bm), b_k, input_precision=PREC)
            MA = Bm * KK
            dgam += tl.sum(MA, 1) - tl.sum(MA, 0) - beg * tl.sum(dR * KS, 1)
            dS0 -= tl.dot(tl.trans(b_k * beg[:, None]), dR, input_precision=PREC)
        else:
            b_dv = b_b[:, None] * dU
            b_db = tl.sum(dU * b_v, 1)

        # γ_C is γ at the chunk's last (possibly padded) row, so dγ_C joins dγ there and
        # dg_s = Σ_{t >= s} dγ_t (γ_t = g_1 + ... + g_t). Joined before the sum, not added
        # to each dg_s after it: measured ~1.6x less error in dg under strong decay.
        last = ot == BT - 1
        dgam += tl.where(last[:, None] if KEY_DECAY else last, dgam_C, 0.0)
        b_dg = tl.cumsum(dgam, 0, reverse=True)
        tl.store(dk + (part + rows)[:, None] * K + ok[None, :], b_dk, mask=m_tk)
        tl.store(dv + rows[:, None] * V + ov[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        if HAS_BETA:
            tl.store(dbeta + part + rows, b_db, mask=mt)
        dg_offsets, m_g = _decay_offsets(part + rows, ok, mt, m_tk, K, KEY_DECAY)
        tl.store(dg + dg_offsets, b_dg, mask=m_g)
        dS = dS0
    store_state(dh0 + i_bh * K * V, dS, ok, ov, mk, mv, V)


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
        _bwd[(NV, B * H)](*args, IS_DELTA=ctx.is_delta, KEY_DECAY=g.dim() == 4, **flags)
        return (
            dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dg.sum(0).to(g.dtype),
            None if beta is None else dbeta.sum(0).to(beta.dtype),
            None if h0 is None else dh0.to(h0.dtype), None, None, None,
        )

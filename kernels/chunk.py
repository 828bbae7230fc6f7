"""Chunked fast-weight algorithms in plain PyTorch, differentiable by autograd.

The sequence is cut into chunks of C tokens. Everything inside a chunk is a batched matmul
over all chunks at once; only the state S [K, V] is passed from chunk to chunk, in a short
Python loop over chunks (never over tokens). Shapes and definitions: ``reference.py``.

Notation inside one chunk (positions t, j = 1..C; S_0 is the state entering the chunk)::

    γ_t  = g_1 + ... + g_t                    log decay from the chunk start to t (<= 0)
    Γ_tj = exp(γ_t - γ_j) if j <= t else 0    decay from step j to step t (<= 1)

Only differences γ_t - γ_j with j <= t are exponentiated, never exp(-γ), so nothing can
overflow however strong the decay: a factor that underflows to 0 is also ~0 in exact math.

**Gated delta rule (WY/UT form).** Unrolling the recurrence inside the chunk gives
``S_t = e^{γ_t} S_0 + Σ_{j<=t} Γ_tj k_j u_j^T`` with pseudo-values
``u_t = β_t (v_t - e^{γ_t} S_0^T k_t - Σ_{j<t} Γ_tj (k_t·k_j) u_j)``, i.e. U solves the unit
lower-triangular system::

    (I + A) U = diag(β) V - diag(β e^γ) K S_0,        A_tj = β_t Γ_tj k_t·k_j  (j < t)
    U = W_v - W_k S_0,   W_v = (I + A)^{-1} diag(β) V,   W_k = (I + A)^{-1} diag(β e^γ) K

W_v and W_k do not depend on S_0, so one batched triangular solve serves all chunks; the
loop then only does::

    U   = W_v - W_k S_0
    O   = scale (diag(e^γ) Q S_0 + (Q K^T ⊙ Γ) U)
    S_C = e^{γ_C} S_0 + (diag(e^{γ_C - γ}) K)^T U

**Gated linear rule.** The same with U = diag(β) V (no delta term, no solve). Chunk
contributions to the state do not depend on the state, so the loop is elementwise. With
per-key decay (γ_t in R^K) the scores ``Σ_d q_td k_jd exp(γ_td - γ_jd)`` are not a matmul
of Q and K; ``_key_decay_scores`` splits the chunk into sub-chunks to keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """``[B, T, H, *D] -> [N, B*H, C, *D]``, zero-padded to N*C tokens, contiguous.

    Chunk-major layout so that ``x[n]`` (what the loop over chunks reads) is contiguous.
    Zero padding is harmless: with k = v = q = g = beta = 0 a step leaves S unchanged.
    """
    B, T, H = x.shape[:3]
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))  # pairs run from the last dim
    return x.unflatten(1, (N, C)).movedim(1, 0).transpose(2, 3).reshape(N, B * H, C, *x.shape[3:])


def _from_chunks(o: Tensor, B: int, H: int, T: int) -> Tensor:
    """``[N, B*H, C, V] -> [B, T, H, V]``, dropping the padding."""
    N, _, C, V = o.shape
    return o.view(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]


# exp() of log decays is taken after flooring them at _FLOOR: exp(-40) ~ 4e-18 is below
# float64 resolution next to the O(1) terms it is added to, and keeping every factor a
# normal float avoids x86's subnormal/underflow slow path (20-100x slower exp and matmul).
_FLOOR = -40.0


def _exp(x: Tensor) -> Tensor:
    return x.clamp(min=_FLOOR).exp()


def _masked_exp(x: Tensor, mask: Tensor) -> Tensor:
    """``exp(x)`` where mask, else 0. Where the mask is off x may be > 0: it is clamped to 0
    first, since exp overflowing to inf gives inf * 0 = nan in the backward pass (and
    masking with -inf instead hits the slow exp path)."""
    return x.clamp_(_FLOOR, 0).exp_() * mask


def _decay_matrix(gam: Tensor) -> Tensor:
    """Γ: ``[..., C] -> [..., C, C]`` with ``Γ_tj = exp(γ_t - γ_j)`` for j <= t, else 0."""
    C = gam.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=gam.device).tril()
    return _masked_exp(gam[..., :, None] - gam[..., None, :], causal)


def _initial(initial_state: Tensor | None, BH: int, K: int, V: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return like.new_zeros(BH, K, V)
    return initial_state.to(like.dtype).reshape(BH, K, V)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule in UT form; returns ``(o [B,T,H,V], S [B,H,K,V])``.

    The S-independent parts (A, decays, attention scores) are batched over all chunks. The
    loop solves ``(I + A) U = diag(β) V - diag(β e^γ) K S_0`` per chunk with the current
    state on the right-hand side: that is W_v - W_k S_0 without forming W_k and W_v, half
    the triangular-solve work (V columns instead of K + V) and no concatenation.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, T)  # short inputs: one chunk, no padding work
    q, k, v, g, beta = (_to_chunks(x, C) for x in (q, k, v, g, beta))
    gam = g.cumsum(-1)  # [N, BH, C]
    decay = _decay_matrix(gam)
    k_beta = k * beta[..., None]
    A = k_beta @ k.mT * decay  # the solve reads only the strictly lower triangle
    v_beta = v * beta[..., None]
    k_beta_decay = k_beta * _exp(gam)[..., None]
    keys_to_end = (k * _exp(gam[..., -1:] - gam)[..., None]).mT  # (diag(e^{γ_C - γ}) K)^T
    decay_end = _exp(gam[..., -1, None, None])  # e^{γ_C}: [N, BH, 1, 1]

    S = _initial(initial_state, B * H, K, V, like=q)
    states, values = [], []
    for n in range(q.shape[0]):
        states.append(S)
        rhs = torch.baddbmm(v_beta[n], k_beta_decay[n], S, alpha=-1)
        u = torch.linalg.solve_triangular(A[n], rhs, upper=False, unitriangular=True)
        values.append(u)
        S = torch.baddbmm(S * decay_end[n], keys_to_end[n], u)
    S_in, U = torch.stack(states), torch.stack(values)  # [N, BH, K, V], [N, BH, C, V]
    o = _add_matmul((q * (scale * _exp(gam))[..., None]) @ S_in, q @ k.mT * decay, U, scale)
    return _from_chunks(o, B, H, T), S.view(B, H, K, V)


def _add_matmul(x: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``x + alpha a @ b`` for ``[N, M, *, *]`` tensors, in one baddbmm (no extra passes)."""
    return torch.baddbmm(x.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), alpha=alpha).view(
        x.shape
    )


def _key_decay_scores(q: Tensor, k: Tensor, gam: Tensor, sub: int) -> Tensor:
    """``scores_tj = Σ_d q_td k_jd exp(γ_td - γ_jd)`` for j <= t (else 0), stably.

    q, k, gam: ``[..., C, K]`` with C = s * sub. For j in an earlier sub-chunk than t, factor
    the decay at r, the last position before t's sub-chunk: ``exp(γ_t - γ_r) exp(γ_r - γ_j)``,
    both <= 1, so those scores are a matmul. Within t's own sub-chunk, form the exact
    ``[sub, sub, K]`` decays (cheap: sub * K numbers per token).
    """
    C = q.shape[-2]
    s = C // sub
    qs, ks, gs = (x.unflatten(-2, (s, sub)) for x in (q, k, gam))  # [..., s, sub, K]
    ref = F.pad(gam, (0, 0, 1, 0))[..., 0:C:sub, :]  # γ_r for each sub-chunk (γ_0 = 0)
    q_r = qs * _exp(gs - ref[..., :, None, :])
    pos = torch.arange(C, device=q.device)
    earlier = (pos < sub * torch.arange(s, device=q.device)[:, None])[..., None]  # [s, C, 1]
    k_r = k[..., None, :, :] * _masked_exp(ref[..., :, None, :] - gam[..., None, :, :], earlier)
    scores = q_r @ k_r.mT  # [..., s, sub, C]; zero where j is not in an earlier sub-chunk

    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()[..., None]
    within = _masked_exp(gs[..., :, None, :] - gs[..., None, :, :], causal)
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * within).sum(-1)  # [..., s, sub, sub]
    eye = torch.eye(s, dtype=q.dtype, device=q.device)
    scores = scores + (diag[..., None, :] * eye[:, None, :, None]).flatten(-2)  # block diagonal
    return scores.flatten(-3, -2)


def chunk_gated_linear_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor | None,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    sub_chunk: int = 16,
) -> tuple[Tensor, Tensor]:
    """Gated linear rule, chunked; g ``[B,T,H]`` or ``[B,T,H,K]``; returns ``(o, S)``.

    ``sub_chunk`` (a divisor of ``chunk_size``) only matters for per-key decay.
    """
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of sub_chunk ({sub_chunk})")
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, -(-T // sub_chunk) * sub_chunk)
    if beta is not None:
        v = v * beta[..., None]
    g = g if g.dim() == 4 else g[..., None]  # [B, T, H, 1 or K]
    q, k, v, g = (_to_chunks(x, C) for x in (q, k, v, g))
    gam = g.cumsum(-2)  # [N, BH, C, 1 or K]
    q_decay = q * (scale * _exp(gam))
    chunk_writes = (k * _exp(gam[..., -1:, :] - gam)).mT @ v  # each chunk's own S_C
    decay_end = _exp(gam[..., -1, :, None])  # [N, BH, 1 or K, 1]
    sub = min(sub_chunk, C)

    S = _initial(initial_state, B * H, K, V, like=q)
    outputs = []
    for n in range(q.shape[0]):
        if gam.shape[-1] == 1:
            scores = q[n] @ k[n].mT * _decay_matrix(gam[n, ..., 0])
        else:  # in the loop: its [sub, sub, K] decays are too big to form for all chunks
            scores = _key_decay_scores(q[n], k[n], gam[n], sub)
        outputs.append(torch.baddbmm(q_decay[n] @ S, scores, v[n], alpha=scale))
        S = S * decay_end[n] + chunk_writes[n]
    o = torch.stack(outputs)
    return _from_chunks(o, B, H, T), S.view(B, H, K, V)

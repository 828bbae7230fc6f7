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


def _decay_matrix(gam: Tensor) -> Tensor:
    """Γ: ``[..., C] -> [..., C, C]`` with ``Γ_tj = exp(γ_t - γ_j)`` for j <= t, else 0."""
    C = gam.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=gam.device).tril()
    diff = gam[..., :, None] - gam[..., None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()  # mask before exp: j > t may overflow


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
    """Gated delta rule in WY/UT chunked form; returns ``(o [B,T,H,V], S [B,H,K,V])``."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, T)  # short inputs: one chunk, no padding work
    q, k, v, g, beta = (_to_chunks(x, C) for x in (q * scale, k, v, g, beta))
    gam = g.cumsum(-1)  # [N, BH, C]
    decay = _decay_matrix(gam)
    kb = k * beta[..., None]
    A = (kb @ k.mT * decay).tril(-1)  # tril: the solve must not see (or send grads to) j >= t
    rhs = torch.cat([v * beta[..., None], kb * gam.exp()[..., None]], dim=-1)
    W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Wv, Wk = W.split([V, K], dim=-1)
    # W_k and the decayed queries both multiply S_0: stacked, one matmul per chunk reads both.
    reads = torch.cat([Wk, q * gam.exp()[..., None]], dim=-2)  # [N, BH, 2C, K]
    attn = q @ k.mT * decay
    keys_to_end = (k * (gam[..., -1:] - gam).exp()[..., None]).mT  # (diag(e^{γ_C-γ}) K)^T
    decay_end = gam[..., -1, None, None].exp()  # e^{γ_C}: [N, BH, 1, 1]

    S = _initial(initial_state, B * H, K, V, like=q)
    outputs = []
    for n in range(q.shape[0]):
        read = reads[n] @ S
        u = Wv[n] - read[:, :C]
        outputs.append(torch.baddbmm(read[:, C:], attn[n], u))
        S = torch.baddbmm(S * decay_end[n], keys_to_end[n], u)
    return _from_chunks(torch.stack(outputs), B, H, T), S.view(B, H, K, V)


def _key_decay_scores(q: Tensor, k: Tensor, gam: Tensor, sub: int) -> Tensor:
    """``scores_tj = Σ_d q_td k_jd exp(γ_td - γ_jd)`` for j <= t (else 0), stably.

    q, k, gam: ``[..., C, K]`` with C = s * sub. For j in an earlier sub-chunk than t, factor
    the decay at r, the last position before t's sub-chunk: ``exp(γ_t - γ_r) exp(γ_r - γ_j)``,
    both <= 1, so the scores are a matmul. Within t's own sub-chunk, form the exact
    ``[sub, sub, K]`` decays (cheap: sub * K numbers per token).
    """
    C, K = q.shape[-2:]
    s = C // sub
    qs, ks, gs = (x.unflatten(-2, (s, sub)) for x in (q, k, gam))  # [..., s, sub, K]
    ref = F.pad(gam, (0, 0, 1, 0))[..., 0:C:sub, :]  # γ_r for each sub-chunk (γ_0 = 0)
    q_r = qs * (gs - ref[..., :, None, :]).exp()
    earlier = torch.arange(C, device=q.device) < sub * torch.arange(s, device=q.device)[:, None]
    to_ref = (ref[..., :, None, :] - gam[..., None, :, :]).masked_fill(
        ~earlier[:, :, None], float("-inf")
    )
    k_r = k[..., None, :, :] * to_ref.exp()  # [..., s, C, K], zero where j is not earlier
    scores = q_r @ k_r.mT  # [..., s, sub, C]

    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    within = (gs[..., :, None, :] - gs[..., None, :, :]).masked_fill(
        ~causal[:, :, None], float("-inf")
    )
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * within.exp()).sum(-1)  # [.., s, sub, sub]
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
    """Gated linear rule, chunked; g ``[B,T,H]`` or ``[B,T,H,K]``; returns ``(o, S)``."""
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of sub_chunk ({sub_chunk})")
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, -(-T // sub_chunk) * sub_chunk)
    if beta is not None:
        v = v * beta[..., None]
    g = g if g.dim() == 4 else g[..., None]  # [B, T, H, 1 or K]
    q, k, v, g = (_to_chunks(x, C) for x in (q * scale, k, v, g))
    gam = g.cumsum(-2)  # [N, BH, C, 1 or K]
    if gam.shape[-1] == 1:
        scores = q @ k.mT * _decay_matrix(gam[..., 0])
    else:
        scores = _key_decay_scores(q, k, gam, min(sub_chunk, C))
    chunk_writes = (k * (gam[..., -1:, :] - gam).exp()).mT @ v  # each chunk's own S_C
    decay_end = gam[..., -1, :, None].exp()  # [N, BH, 1 or K, 1]

    S = _initial(initial_state, B * H, K, V, like=q)
    entering = []
    for n in range(q.shape[0]):
        entering.append(S)
        S = S * decay_end[n] + chunk_writes[n]
    o = scores @ v + (q * gam.exp()) @ torch.stack(entering)
    return _from_chunks(o, B, H, T), S.view(B, H, K, V)

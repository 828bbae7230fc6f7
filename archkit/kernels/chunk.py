"""Chunked fast-weight algorithms in plain PyTorch, differentiable by autograd.

The sequence is cut into chunks of C tokens. Work that does not depend on the state is
batched over segments of consecutive chunks; a Python loop over chunks (never over tokens)
carries the state S [K, V] and does the few matmuls that read it. Definitions and shapes
are in ``reference.py``; the tests check these functions against it.

Notation inside one chunk (positions t, j = 1..C; S_0 is the state entering the chunk)::

    γ_t  = g_1 + ... + g_t                    log decay from the chunk start to t (<= 0)
    Γ_tj = exp(γ_t - γ_j) if j <= t else 0    decay from step j to step t (<= 1)

Only differences γ_t - γ_j with j <= t are exponentiated, never exp(-γ), so nothing can
overflow however strong the decay: a factor that underflows to 0 is also ~0 in exact math.

**Gated delta rule (UT form).** Unrolling the recurrence inside the chunk gives
``S_t = e^{γ_t} S_0 + Σ_{j<=t} Γ_tj k_j u_j^T`` with pseudo-values
``u_t = β_t (v_t - e^{γ_t} S_0^T k_t - Σ_{j<t} Γ_tj (k_t·k_j) u_j)``, i.e. U solves the unit
lower-triangular system::

    (I + A) U = diag(β) V - diag(β e^γ) K S_0,        A_tj = β_t Γ_tj k_t·k_j  (j < t)

Then::

    O   = scale (diag(e^γ) Q S_0 + (Q K^T ⊙ Γ) U)
    S_C = e^{γ_C} S_0 + (diag(e^{γ_C - γ}) K)^T U

``chunk_gated_delta_rule`` in numbered steps: (1) γ, e^γ and the other per-token scalars of
all chunks; (2) per segment of chunks, what does not depend on S_0: Q and K stacked, the
scores and A (both from one bmm), the row scalings; (3-5) per chunk, [e^γ Q; -β e^γ K] S_0
in one bmm, U from one triangular solve, O and S_C from one baddbmm each.

What is fastest on CPU (``benchmarks/fast_weight_ops.py``: B=4, H=4, K=V=64, T=2048, float32):

- C = 32. The products with S cost 6KV FLOPs per token whatever C; the work inside chunks,
  4CK + 3CV, grows with C, and a smaller C means more and smaller ops in the Python loop.
  At 1 thread C = 16 and 32 are equally fast (within 5%), C = 8 is ~1.15x and C = 64
  ~1.3x slower; at 2 threads C = 32 is ~10% faster than 16 (a few % with a backward pass).
- The solve is right-sided, ``U^T (I + A)^T = R^T`` with A^T contiguous, which MKL's trsm
  runs 3-4x faster than the left-sided form at C = 16-32 (1.5x at C = 64). Hence the
  transposed scores: ``K [Q; K]^T`` gives (Q K^T)^T and the symmetric K K^T at once.
- S_0 goes into the right-hand side: one solve per chunk, V columns. The WY form of GPU
  kernels, ``U = W_v - W_k S_0`` with ``W_v = (I + A)^{-1} diag(β) V`` and
  ``W_k = (I + A)^{-1} diag(β e^γ) K`` solved for a whole segment in advance, leaves the
  loop one op shorter but is 10-30% slower overall (re-measured at C = 16 and 32: the
  batched solve has K + V columns and W must be assembled). An explicit (I + A)^{-1}, one
  batched solve against I per segment and a bmm in the loop, is no faster (within 5%).
- Without autograd the state is updated in place.

**Gated linear rule.** The same with U = diag(β) V: no solve, and each chunk's own
contribution to the state is known in advance, so the state update is elementwise. With
per-key decay (γ_t in R^K) the scores ``Σ_d q_td k_jd exp(γ_td - γ_jd)`` are not a matmul
of Q and K; ``_key_decay_scores`` splits the chunk into sub-chunks to keep them stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# exp() of log decays is taken after flooring them at _FLOOR: exp(-40) ~ 4e-18 is below
# float64 resolution next to the O(1) terms it is added to, and keeping every factor a
# normal float avoids x86's subnormal/underflow slow path (20-100x slower exp and matmul).
_FLOOR = -40.0


def _exp(x: Tensor) -> Tensor:
    return x.clamp(min=_FLOOR).exp()


def _masked_exp(x: Tensor, mask: Tensor) -> Tensor:
    """``exp(x)`` where ``mask``, else 0. Where the mask is off x may be > 0: it is clamped
    to 0 first, since an overflow to inf gives inf * 0 = nan in the backward pass (and
    masking with -inf instead hits the slow exp path). Overwrites x."""
    return x.clamp_(_FLOOR, 0).exp_() * mask


def _decay_matrix(gam: Tensor) -> Tensor:
    """Γ: ``[..., C] -> [..., C, C]`` with ``Γ_tj = exp(γ_t - γ_j)`` for j <= t, else 0."""
    C = gam.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=gam.device).tril()
    return _masked_exp(gam[..., :, None] - gam[..., None, :], causal)


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """``[B, T, H, *D] -> [N, B*H, C, *D]``, zero-padded to N*C tokens, contiguous.

    Chunk-major, so that ``x[n]`` (what the loop over chunks reads) is contiguous. Zero
    padding is harmless: a step with k = v = g = beta = 0 leaves S unchanged.
    """
    B, T, H = x.shape[:3]
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))  # pairs run from the last dim
    return x.unflatten(1, (N, C)).movedim(1, 0).transpose(2, 3).reshape(N, B * H, C, *x.shape[3:])


def _from_chunks(outputs: list[Tensor], B: int, H: int, T: int) -> Tensor:
    """Per-chunk ``[B*H, C, V]`` outputs -> ``[B, T, H, V]`` in one copy, padding dropped."""
    C, V = outputs[0].shape[-2:]
    o = torch.stack([x.view(B, H, C, V).transpose(1, 2) for x in outputs], dim=1)
    return o.view(B, -1, H, V)[:, :T]


def _initial(initial_state: Tensor | None, BH: int, K: int, V: int, like: Tensor) -> Tensor:
    if initial_state is None:
        return like.new_zeros(BH, K, V)
    return initial_state.to(like.dtype).reshape(BH, K, V)


_SEGMENT = 2**19


def _segment_len(B: int, H: int, C: int, D: int) -> int:
    """Chunks per segment: consecutive chunks whose ``[B*H, C, D]`` intermediates fit in
    about _SEGMENT floats are batched together. Small enough to stay in cache and to reuse
    the allocator's memory (large fresh tensors cost page faults: 1.6x slower at T=8192),
    big enough to amortise per-op overhead."""
    return max(1, _SEGMENT // (B * H * C * D))


def _time_split(x: Tensor, tokens: int) -> tuple[Tensor, ...]:
    """``[B, T, ...]`` -> views of ``tokens`` consecutive steps. split, not slicing: the
    backward of a slice fills a zero tensor of x's full size, once per slice."""
    return x.split(tokens, dim=1)


def _heads_first(x: Tensor, C: int) -> Tensor:
    """``[B, n*C, H, D] -> [n, B, H, C, D]``, a view: chunk n of every sequence and head."""
    return x.unflatten(1, (-1, C)).permute(1, 0, 3, 2, 4)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule in chunked UT form; returns ``(o [B,T,H,V], S [B,H,K,V])``.

    Any ``chunk_size`` gives the same result up to rounding; 32 is the fastest on CPU (see
    the module docstring).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, T)  # short inputs: one chunk, no padding work
    N = -(-T // C)
    if N * C != T:  # zero padding is harmless: a step with k = v = g = beta = 0 keeps S
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, N * C - T)) for x in (q, k, v))

    # 1. Per-token scalars of every chunk, [N, B*H, C] (small): log decays, strengths.
    gam = _to_chunks(g, C).cumsum(-1)
    beta = _to_chunks(beta, C)
    e_gam = _exp(gam)
    row_scale = torch.cat((scale * e_gam, -beta * e_gam), -1)[..., None]  # [s e^γ Q; -β e^γ K]
    to_end = _exp(gam[..., -1:] - gam)[..., None]  # e^{γ_C - γ}
    decay_end = _exp(gam[..., -1, None, None])  # e^{γ_C}: [N, BH, 1, 1]

    S = _initial(initial_state, B * H, K, V, like=gam)
    # Without autograd the state is updated in place: no fresh [B*H, K, V] per chunk.
    inplace = not (torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, g, beta, S)))
    if inplace and initial_state is not None:
        S = S.clone()
    outputs: list[Tensor] = []
    n = _segment_len(B, H, 2 * C, max(K, V))
    per_chunk = (gam, beta, row_scale, to_end, decay_end)
    for segment in zip(*(_time_split(x, n * C) for x in (q, k, v)),
                       *(x.split(n) for x in per_chunk), strict=True):
        S = _delta_segment(*segment, S, scale, outputs, inplace)
    return _from_chunks(outputs, B, H, T), S.view(B, H, K, V)


def _delta_segment(
    q: Tensor, k: Tensor, v: Tensor, gam: Tensor, beta: Tensor, row_scale: Tensor,
    to_end: Tensor, decay_end: Tensor, S: Tensor, scale: float, outputs: list[Tensor],
    inplace: bool,
) -> Tensor:
    """Consecutive chunks from state S: q, k, v ``[B, n*C, H, *]``, the rest ``[n, B*H, ...]``
    (see ``chunk_gated_delta_rule``). Appends each chunk's output ``[B*H, C, V]`` to
    ``outputs`` and returns the state after the last chunk."""
    n, BH, C = beta.shape
    B, _, H, K = k.shape
    V = v.shape[-1]
    # 2. Q and K of each chunk stacked, [n*BH, 2C, K] (the one copy of q and k), and what
    #    does not depend on the state: K [Q; K]^T gives (Q K^T)^T and K K^T in one bmm.
    qk = torch.stack((_heads_first(q, C), _heads_first(k, C)), dim=3).view(n * BH, 2 * C, K)
    keys = qk.split(C, dim=1)[1]  # split, not slicing (see _time_split)
    p_t = torch.bmm(keys, qk.mT)
    kq_t, kk_t = p_t.split(C, dim=2)
    upper = torch.ones(C, C, dtype=gam.dtype, device=gam.device).triu()
    decay_t = _masked_exp(gam[..., None, :] - gam[..., :, None], upper).view(n * BH, C, C)
    scores_t = kq_t * decay_t  # (Q K^T ⊙ Γ)^T
    # A^T as a tensor of its own: with a strided view of p_t the op ran ~25% slower
    a_t = kk_t * decay_t * beta.reshape(n * BH, 1, C)
    keys_to_end = keys * to_end.view(n * BH, C, 1)  # diag(e^{γ_C - γ}) K
    row_scale = row_scale.view(n * BH, 2 * C, 1)  # [s e^γ Q; -β e^γ K] (autograd keeps qk)
    qk_scaled = qk.mul_(row_scale) if inplace else qk * row_scale

    # unbind, not x[i]: the backward of x[i] writes into a zero tensor of x's full size
    # per chunk (quadratic in T); unbind's backward stacks the chunk gradients once.
    per_chunk = (qk_scaled.view(n, BH, 2 * C, K), beta.view(n, B, H, C, 1), _heads_first(v, C),
                 scores_t.view(n, BH, C, C).mT, a_t.view(n, BH, C, C),
                 keys_to_end.view(n, BH, C, K).mT, decay_end)
    for qk_n, beta_n, v_n, sc, a, k_end_t, d_end in zip(*(x.unbind() for x in per_chunk),
                                                       strict=True):
        # 3. [s e^γ Q S_0; -β e^γ K S_0] in one bmm; the lower half plus β V is the
        #    right-hand side diag(β) V - diag(β e^γ) K S_0 (v read where it lies).
        qs, ks = torch.bmm(qk_n, S).split(C, dim=1)
        rhs = torch.addcmul(ks.view(B, H, C, V), beta_n, v_n).view(BH, C, V)
        # 4. U = (I + A)^{-1} rhs, solved as U^T (I + A)^T = rhs^T
        u = torch.linalg.solve_triangular(a, rhs.mT, upper=True, left=False,
                                          unitriangular=True).mT
        # 5. O = s e^γ Q S_0 + s (Q K^T ⊙ Γ) U;  S_C = e^{γ_C} S_0 + K_end^T U
        outputs.append(torch.baddbmm(qs, sc, u, alpha=scale))
        if inplace:
            S.mul_(d_end).baddbmm_(k_end_t, u)
        else:
            S = torch.baddbmm(S * d_end, k_end_t, u)
    return S


def _key_decay_scores(q: Tensor, k: Tensor, gam: Tensor, sub: int) -> Tensor:
    """``scores_tj = Σ_d q_td k_jd exp(γ_td - γ_jd)`` for j <= t (else 0), stably.

    q, k, gam: ``[..., C, K]`` with C = s * sub. For j in an earlier sub-chunk than t, factor
    the decay at r, the last position before t's sub-chunk: ``exp(γ_t - γ_r) exp(γ_r - γ_j)``,
    both <= 1, so those scores are a matmul. Within t's own sub-chunk, form the exact
    ``[sub, sub, K]`` decays.
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
    sub_chunk: int = 8,
) -> tuple[Tensor, Tensor]:
    """Gated linear rule, chunked; g ``[B,T,H]`` or ``[B,T,H,K]``; returns ``(o, S)``.

    ``sub_chunk`` (a divisor of ``chunk_size``) only matters for per-key decay, whose
    scores are built chunk by chunk inside the loop: their ``[sub, sub, K]`` decays for
    all chunks at once would be sub * K floats per token, too big to stream through memory.
    """
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of sub_chunk ({sub_chunk})")
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk_size, -(-T // sub_chunk) * sub_chunk)
    if beta is not None:
        v = v * beta[..., None]
    g = g if g.dim() == 4 else g[..., None]  # [B, T, H, 1 or K]
    chunks = [_to_chunks(x, C) for x in (q, k, v, g)]
    S = _initial(initial_state, B * H, K, V, like=chunks[0])
    outputs: list[Tensor] = []
    for segment in zip(*(x.split(_segment_len(B, H, C, max(C, K, V))) for x in chunks),
                       strict=True):
        S = _linear_segment(*segment, S, scale, min(sub_chunk, C), outputs)
    return _from_chunks(outputs, B, H, T), S.view(B, H, K, V)


def _linear_segment(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, S: Tensor, scale: float, sub: int,
    outputs: list[Tensor],
) -> Tensor:
    """Consecutive chunks from state S (v already scaled by beta); see ``_delta_segment``."""
    gam = g.cumsum(-2)  # [n, BH, C, 1 or K]
    q_decay = q * (scale * _exp(gam))
    chunk_writes = (k * _exp(gam[..., -1:, :] - gam)).mT @ v  # each chunk's own S_C
    decay_end = _exp(gam[..., -1, :, None])  # [n, BH, 1 or K, 1]

    per_chunk = (q, k, v, gam, q_decay, chunk_writes, decay_end)
    for q_n, k_n, v_n, gam_n, q_d, writes, d_end in zip(*(x.unbind() for x in per_chunk),
                                                       strict=True):
        if gam_n.shape[-1] == 1:
            scores = q_n @ k_n.mT * _decay_matrix(gam_n[..., 0])
        else:
            scores = _key_decay_scores(q_n, k_n, gam_n, sub)
        outputs.append(torch.baddbmm(q_d @ S, scores, v_n, alpha=scale))
        S = S * d_end + writes
    return S

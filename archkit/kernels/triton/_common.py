"""Helpers shared by the Triton kernel modules: ``@triton.jit`` functions their kernels call
(no kernels here), and plain functions for their Python wrappers."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

# tl.dot needs every dimension >= 16; smaller head dims are padded (and masked) up to it.
MIN_BLOCK = 16


@triton.jit
def block_offsets(T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr):
    """Where the calling program works, in a grid (cdiv(V, BV), B * H): batch*head i_bh
    (program id 1) and value block i_v (program id 0). Returns ``(i_bh, ok, ov, mk, mv,
    row0)``: i_bh as int64 (for state addresses), key and value offsets ok [BK], ov [BV]
    with their masks (head dims are padded to powers of two; masked lanes load 0 and are
    not stored), and the row of the head's token 0 in [B, T, H, ...] tensors (token t is
    row0 + t H)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    row0 = (i_b * T * H + i_h).to(tl.int64)
    return i_bh.to(tl.int64), ok, ov, ok < K, ov < V, row0


@triton.jit
def state_block(state, ok, ov, mk, mv, V: tl.constexpr):
    """``(pointers, mask)`` of the program's [BK, BV] block of the [K, V] state at ``state``.
    Formed where used, and as the pointer plus [BK, 1] then plus [1, BV] offsets: formed
    once and kept across a token loop, or summed into one offset tile first, it held 25-55
    more registers a thread in the recurrent kernels (sm_90 compile)."""
    return state + ok[:, None] * V + ov[None, :], mk[:, None] & mv[None, :]


@triton.jit
def load_state(state, ok, ov, mk, mv, V: tl.constexpr, PRESENT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """A [BK, BV] state block (``state_block``) in float32; zeros when the optional tensor
    is absent (PRESENT false: the pointer is a stand-in, never read)."""
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if PRESENT:
        pointers, mask = state_block(state, ok, ov, mk, mv, V)
        S += tl.load(pointers, mask=mask, other=0).to(tl.float32)
    return S


@triton.jit
def store_state(state, S, ok, ov, mk, mv, V: tl.constexpr):
    """Stores the [BK, BV] state block S (``state_block``)."""
    pointers, mask = state_block(state, ok, ov, mk, mv, V)
    tl.store(pointers, S, mask=mask)


def block_sizes(K: int, V: int, max_bv: int = 32) -> tuple[int, int]:
    """(BK, BV): the whole key dimension in one power-of-two block (the delta rule's recall
    S^T k needs all of it), the value dimension in blocks of at most ``max_bv`` columns,
    one program each. Padded lanes are masked on load (zeros) and on store."""
    BK = max(MIN_BLOCK, triton.next_power_of_2(K))
    BV = max(MIN_BLOCK, min(max_bv, triton.next_power_of_2(V)))
    return BK, BV


def dot_precision(*tensors: Tensor | None) -> str:
    """tl.dot's input precision on a GPU: "tf32x3" (three tf32 tensor-core products, about
    float32 accuracy) when any input is float32, so float32 callers get float32-grade
    results; "tf32" when all are half precision, whose own rounding is already coarser.
    Not "ieee": Triton lowers it to scalar FMA loops that spill tens of KB per thread at
    these tile sizes (sm_90 compile, measured offline). The interpreter ignores it."""
    wide = any(t is not None and t.element_size() >= 4 for t in tensors)
    return "tf32x3" if wide else "tf32"


def chunk_config(K: int, key_decay: bool, chunk_size: int | None) -> tuple[int, int]:
    """(chunk size, num_warps) for the chunked kernels. Set from sm_90 compile-time resource
    counts (shared memory, register spills), not timings, so untuned: chunk 64 at K = 128
    needs ~210 KB of shared memory in the fused backward (an A100 has 164 KB) and spills
    ~3x more than chunk 32. Per-key decay builds its scores elementwise (C^2 K work), so it
    takes chunks of 16."""
    BK = max(MIN_BLOCK, triton.next_power_of_2(K))
    if chunk_size is None:
        chunk_size = 16 if key_decay else (64 if BK <= 32 else 32)
    return chunk_size, (8 if BK >= 64 else 4)


def reverse_cumsum(x: Tensor, dim: int) -> Tensor:
    """``y_t = Σ_{s >= t} x_s`` along ``dim``."""
    return x.flip(dim).cumsum(dim).flip(dim)


def grad_decay(dgam_rev: Tensor, dht: Tensor | None, ht: Tensor, key_decay: bool) -> Tensor:
    """The decay gradient from its reverse-cumulated per-token terms ``[B, T, H, K]`` plus
    the final state's share ``<dS_T, S_T>`` (reduced over V, and over K for scalar decay).

    Every log decay g_t scales the state from step t on, so ``<dS_T, S_T>`` reaches all
    of them equally."""
    if dht is not None:
        dgam_rev = dgam_rev + (dht.float() * ht).sum(-1)[:, None]  # [B, 1, H, K]
    return dgam_rev if key_decay else dgam_rev.sum(-1)

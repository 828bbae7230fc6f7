"""Helpers shared by the Triton kernels' Python wrappers (no kernels here)."""

from __future__ import annotations

import triton
from torch import Tensor

# tl.dot needs every dimension >= 16; smaller head dims are padded (and masked) up to it.
MIN_BLOCK = 16


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

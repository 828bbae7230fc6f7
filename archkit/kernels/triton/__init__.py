"""Triton kernels for the fast-weight rules: ``impl="triton"`` of ``archkit.kernels``.

Two kernel families, both equal (in float32) to the per-token references in
``archkit.kernels.reference``:

- ``recurrent.py``: fused recurrence, one token per step, state in registers; forward and
  backward. For decode steps and short windows.
- ``chunk.py``: the chunked algorithm of ``archkit.kernels.chunk`` (UT/WY solve inside a
  chunk, state passed between chunks), forward and backward.

Both take scalar decay g ``[B, T, H]`` for both rules and per-key decay g ``[B, T, H, K]``
for the linear rule (the delta rule has no per-key form in ``archkit.kernels``).

They run on CUDA tensors, or on CPU tensors under Triton's interpreter (environment
variable ``TRITON_INTERPRET=1``, set before triton is first imported), which is how CI
checks them without a GPU. Inputs may be float32, bfloat16 or float16 (accumulation is in
float32); ``o`` comes back in q's dtype, the final state in float32. This module imports
without triton; the kernel modules are imported on first use.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RECURRENT_MAX_T",
    "available",
    "gated_delta_rule",
    "gated_linear_rule",
    "interpreting",
    "prefer",
    "usable",
]

Mode = Literal["auto", "recurrent", "chunk"]
# mode="auto" runs the fused recurrence up to this many tokens (decode steps, short
# windows), the chunked kernels beyond. A placeholder, not measured:
# `benchmarks/kernels_triton.py --crossover` times both on a GPU to set it.
RECURRENT_MAX_T = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def available() -> bool:
    """Whether triton imports. Only called for CUDA tensors or an explicit impl="triton",
    so CPU users of impl="auto" never pay for importing it."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or broken: either way the PyTorch paths serve
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def usable(*tensors: Tensor | None) -> bool:
    """Whether the kernels can run on these tensors: triton installed and every tensor on
    a CUDA device, or every tensor on the CPU under the interpreter."""
    devices = {t.device.type for t in tensors if t is not None}
    if not available() or len(devices) != 1:
        return False
    return devices == {"cuda"} or (devices == {"cpu"} and interpreting())


def prefer(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
           initial_state: Tensor | None) -> bool:
    """``impl="auto"``'s choice: Triton on CUDA tensors (never on CPU, interpreter or not:
    it is a test lane, far slower than PyTorch) of an Ampere or newer GPU (tf32 tensor
    cores), in a dtype the kernels take (not float64, which the PyTorch paths compute in
    full)."""
    tensors = (q, k, v, g, beta, initial_state)
    if any(t is not None and t.device.type != "cuda" for t in tensors):
        return False
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return False
    if any(t is not None and t.dtype not in _DTYPES for t in tensors):
        return False
    return usable(*tensors)


def _prepare(op: str, tensors: dict[str, Tensor | None]) -> list[Tensor | None]:
    if not usable(*tensors.values()):
        where = sorted({str(t.device) for t in tensors.values() if t is not None})
        why = ("triton is not installed" if not available() else
               f"tensors on {where}: need all on one CUDA device, or on the CPU with "
               "TRITON_INTERPRET=1")
        raise RuntimeError(f"{op}: the Triton kernels cannot run here ({why})")
    for name, t in tensors.items():
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"{op}: the Triton kernels take float32, bfloat16 or float16 "
                             f"(accumulating in float32); {name} is {t.dtype} "
                             "(use impl='chunk' for float64)")
    return [None if t is None else t.contiguous() for t in tensors.values()]


def _run(op: str, is_delta: bool, q: Tensor, k: Tensor, v: Tensor, g: Tensor,
         beta: Tensor | None, scale: float, initial_state: Tensor | None, mode: Mode,
         chunk_size: int | None) -> tuple[Tensor, Tensor]:
    if mode not in ("auto", "recurrent", "chunk"):
        raise ValueError(f"{op}: mode must be 'auto', 'recurrent' or 'chunk', got {mode!r}")
    if is_delta and g.dim() != 3:
        raise ValueError(f"{op}: g must be [B, T, H] (scalar decay), got {list(g.shape)}")
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{op}: chunk_size must be a power of two >= 16, got {chunk_size}")
    args = _prepare(op, {"q": q, "k": k, "v": v, "g": g, "beta": beta,
                         "initial_state": initial_state})
    if mode == "auto":
        mode = "recurrent" if q.shape[1] <= RECURRENT_MAX_T else "chunk"
    if mode == "recurrent":
        from archkit.kernels.triton.recurrent import RecurrentRule

        return RecurrentRule.apply(*args, scale, is_delta)
    from archkit.kernels.triton.chunk import ChunkRule

    return ChunkRule.apply(*args, scale, is_delta, chunk_size)


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
    initial_state: Tensor | None = None, *, mode: Mode = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton gated delta rule; same math and shapes as ``gated_delta_rule_reference``
    (g ``[B, T, H]``). Returns ``(o in q's dtype, final state in float32)``.
    ``mode``: "recurrent", "chunk" (``chunk_size`` tokens, a power of two >= 16; default
    from ``_common.chunk_config``), or "auto" (recurrent up to ``RECURRENT_MAX_T`` tokens)."""
    return _run("gated_delta_rule", True, q, k, v, g, beta, scale, initial_state, mode,
                chunk_size)


def gated_linear_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, scale: float,
    initial_state: Tensor | None = None, *, mode: Mode = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton gated linear rule; same math and shapes as ``gated_linear_rule_reference``:
    g ``[B, T, H]`` or per-key ``[B, T, H, K]``; ``beta=None`` means 1. ``mode`` and the
    return value as for ``gated_delta_rule``."""
    return _run("gated_linear_rule", False, q, k, v, g, beta, scale, initial_state, mode,
                chunk_size)

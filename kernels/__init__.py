"""Fast-weight ops: the local update rules of archkit's fast-weight blocks.

Layout: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, gates ``[B, T, H]``, state ``[B, H, K, V]``.
Every op returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)`` and takes
``impl="auto" | "reference" | "chunk"``: ``reference`` is the per-token recurrence (the
definition, ``reference.py``), ``chunk`` the chunked PyTorch algorithm (``chunk.py``),
``auto`` the fastest available. Half-precision inputs are computed in float32; ``o`` comes
back in q's dtype, the final state stays in the compute dtype (float32 or float64), since
it is carried across windows. The ops do not normalise q or k (blocks do).

The rules are registered by name for blocks to swap (``RULES.get(name).obj``), all with the
signature ``rule(q, k, v, g, beta, *, scale, initial_state, output_final_state, impl)``:
``gated_delta``, ``delta`` (ignores g) and ``hebbian`` (the gated linear rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from archkit.kernels.chunk import chunk_gated_delta_rule, chunk_gated_linear_rule
from archkit.kernels.reference import gated_delta_rule_reference, gated_linear_rule_reference
from archkit.registry import register_rule

__all__ = [
    "IMPLS",
    "chunk_gated_delta_rule",
    "chunk_gated_linear_rule",
    "delta_rule",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_linear_rule",
    "gated_linear_rule_reference",
]

Impl = Literal["auto", "reference", "chunk"]
IMPLS: tuple[str, ...] = ("auto", "reference", "chunk")
# impl="auto" runs the per-token loop up to this many tokens (decode); measured with
# benchmarks/kernels.py --auto: below it the chunked path's fixed cost dominates.
AUTO_REFERENCE_MAX_T = 2


def _shape_error(op: str, name: str, expected: str, sizes: list[int], got: object) -> ValueError:
    shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
    return ValueError(f"{op}: {name} must have shape {expected} = {sizes}, got {shape}")


def _check(
    op: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
    initial_state: Tensor | None, impl: str, key_decay: bool,
) -> None:
    """Raise ValueError naming the first bad argument and the shape it should have."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise _shape_error(op, "q", "[B, T, H, K]", ["B", "T", "H", "K"], q)
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"{op}: q must hold at least one token (T >= 1), got {list(q.shape)}")
    if not isinstance(k, Tensor) or k.shape != q.shape:
        raise _shape_error(op, "k", "q's shape [B, T, H, K]", [B, T, H, K], k)
    if not isinstance(v, Tensor) or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise _shape_error(op, "v", "[B, T, H, V]", [B, T, H, "V"], v)
    V = v.shape[3]
    if key_decay:
        if not isinstance(g, Tensor) or g.shape not in ((B, T, H), (B, T, H, K)):
            raise _shape_error(op, "g", "[B, T, H] or [B, T, H, K]", [B, T, H, f"({K})"], g)
    elif not isinstance(g, Tensor) or g.shape != (B, T, H):
        raise _shape_error(op, "g", "[B, T, H]", [B, T, H], g)
    if (beta is not None or not key_decay) and (
        not isinstance(beta, Tensor) or beta.shape != (B, T, H)
    ):
        raise _shape_error(op, "beta", "[B, T, H]", [B, T, H], beta)
    if initial_state is not None and (
        not isinstance(initial_state, Tensor) or initial_state.shape != (B, H, K, V)
    ):
        raise _shape_error(op, "initial_state", "[B, H, K, V]", [B, H, K, V], initial_state)
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def _dispatch(
    reference: Callable[..., tuple[Tensor, Tensor]],
    chunk: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
    scale: float | None, initial_state: Tensor | None, output_final_state: bool, impl: str,
) -> tuple[Tensor, Tensor | None]:
    """Cast to the compute dtype, pick the implementation, cast the output back."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if impl == "auto":
        impl = "reference" if q.shape[1] <= AUTO_REFERENCE_MAX_T else "chunk"
    fn = reference if impl == "reference" else chunk
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v, g, beta, initial_state = (
        None if x is None else x.to(dtype) for x in (q, k, v, g, beta, initial_state)
    )
    o, state = fn(q, k, v, g, beta, scale=scale, initial_state=initial_state)
    return o.to(out_dtype), (state if output_final_state else None)


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
    scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, impl: Impl = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule (Gated DeltaNet). Per step, with S ``[K, V]`` per head::

        S = exp(g_t) S;  u = beta_t (v_t - S^T k_t);  S = S + k_t u^T;  o_t = scale S^T q_t

    g ``[B, T, H]`` is a log decay (<= 0), beta ``[B, T, H]`` the write strength (keep
    ``beta ||k||^2 < 2`` for a stable recurrence: blocks L2-normalise k). scale defaults
    to K**-0.5. Returns ``(o [B, T, H, V], final state [B, H, K, V] or None)``.
    """
    _check("gated_delta_rule", q, k, v, g, beta, initial_state, impl, key_decay=False)
    return _dispatch(gated_delta_rule_reference, chunk_gated_delta_rule,
                     q, k, v, g, beta, scale, initial_state, output_final_state, impl)


def gated_linear_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None = None, *,
    scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, impl: Impl = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated Hebbian (linear-attention) rule, the paper's Eq. 3. Per step::

        S = diag(exp(g_t)) S + beta_t k_t v_t^T;  o_t = scale S^T q_t

    g is ``[B, T, H]`` (scalar decay per head, Mamba2/SSD) or ``[B, T, H, K]`` (per-key
    decay, GLA), a log decay (<= 0). ``beta=None`` means 1. Returns ``(o, state or None)``.
    """
    _check("gated_linear_rule", q, k, v, g, beta, initial_state, impl, key_decay=True)
    return _dispatch(gated_linear_rule_reference, chunk_gated_linear_rule,
                     q, k, v, g, beta, scale, initial_state, output_final_state, impl)


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
    scale: float | None = None, initial_state: Tensor | None = None,
    output_final_state: bool = False, impl: Impl = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Delta rule without decay (DeltaNet): ``gated_delta_rule`` with g = 0; g is ignored."""
    if isinstance(q, Tensor) and q.dim() == 4:
        g = q.new_zeros(q.shape[:3])
    return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, impl=impl)


register_rule("gated_delta", description="delta rule with decay (Gated DeltaNet)")(
    gated_delta_rule
)
register_rule("delta", description="delta rule without decay (DeltaNet); ignores g")(delta_rule)
register_rule("hebbian", description="gated Hebbian / linear-attention rule (Mamba2, GLA)")(
    gated_linear_rule
)

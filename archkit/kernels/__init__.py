"""Fast-weight ops: the local update rules of archkit's fast-weight blocks.

Layout: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, gates ``[B, T, H]``, state ``[B, H, K, V]``.
Every op returns ``(o [B, T, H, V], final_state [B, H, K, V] or None)`` and takes
``impl="auto" | "reference" | "chunk" | "triton"``: ``reference`` is the per-token recurrence
(the definition, ``reference.py``), ``chunk`` the chunked PyTorch algorithm (``chunk.py``),
``triton`` the Triton kernels (``triton/``: CUDA tensors, or CPU ones under
``TRITON_INTERPRET=1``), ``auto`` the fastest available (``resolve_impl``: Triton on CUDA
when triton is installed, else PyTorch). Half-precision inputs are computed in float32; ``o`` comes
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

from archkit.kernels import triton as triton_kernels  # imports without triton installed
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
    "resolve_impl",
]

Impl = Literal["auto", "reference", "chunk", "triton"]
IMPLS: tuple[str, ...] = ("auto", "reference", "chunk", "triton")
# impl="auto" runs the per-token loop up to this many tokens (e.g. one-token decode), where
# the chunked path's fixed cost dominates; measured with `benchmarks/fast_weight_ops.py --auto`.
AUTO_REFERENCE_MAX_T = 3
AUTO_REFERENCE_MAX_T_KEY_DECAY = 6  # per-key decay: the chunked scores cost more to set up


def _bad_shape(op: str, name: str, expected: str, sizes: str, got: object) -> ValueError:
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
        got = list(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"{op}: q must be a 4-D tensor [B, T, H, K], got {got}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"{op}: q must hold at least one token (T >= 1), got {list(q.shape)}")
    if not isinstance(k, Tensor) or k.shape != q.shape:
        raise _bad_shape(op, "k", "[B, T, H, K] (q's)", f"[{B}, {T}, {H}, {K}]", k)
    if not isinstance(v, Tensor) or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise _bad_shape(op, "v", "[B, T, H, V]", f"[{B}, {T}, {H}, V]", v)
    V = v.shape[3]
    if key_decay and not (isinstance(g, Tensor) and g.shape in ((B, T, H), (B, T, H, K))):
        raise _bad_shape(op, "g", "[B, T, H] or [B, T, H, K]",
                         f"[{B}, {T}, {H}] or [{B}, {T}, {H}, {K}]", g)
    if not key_decay and not (isinstance(g, Tensor) and g.shape == (B, T, H)):
        raise _bad_shape(op, "g", "[B, T, H]", f"[{B}, {T}, {H}]", g)
    if (beta is not None or not key_decay) and not (
        isinstance(beta, Tensor) and beta.shape == (B, T, H)
    ):
        raise _bad_shape(op, "beta", "[B, T, H]", f"[{B}, {T}, {H}]", beta)
    if initial_state is not None and not (
        isinstance(initial_state, Tensor) and initial_state.shape == (B, H, K, V)
    ):
        raise _bad_shape(op, "initial_state", "[B, H, K, V]", f"[{B}, {H}, {K}, {V}]",
                         initial_state)
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": initial_state}
    for name, x in named.items():
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def resolve_impl(
    impl: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None = None,
    initial_state: Tensor | None = None, reference_max_t: int | None = None,
) -> str:
    """The implementation ``impl`` runs on these inputs. ``"auto"``: ``"triton"`` on CUDA
    tensors when triton is installed (``archkit.kernels.triton.prefer``), else the per-token
    loop up to ``reference_max_t`` tokens (default by g's layout) and ``"chunk"`` beyond."""
    if impl != "auto":
        return impl
    if triton_kernels.prefer(q, k, v, g, beta, initial_state):
        return "triton"
    if reference_max_t is None:
        reference_max_t = (AUTO_REFERENCE_MAX_T_KEY_DECAY if g.dim() == 4
                           else AUTO_REFERENCE_MAX_T)
    return "reference" if q.shape[1] <= reference_max_t else "chunk"


def _dispatch(
    reference: Callable[..., tuple[Tensor, Tensor]],
    chunk: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
    scale: float | None, initial_state: Tensor | None, output_final_state: bool, impl: str,
    reference_max_t: int = AUTO_REFERENCE_MAX_T,
    triton: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Cast to the compute dtype, pick the implementation, cast the output back."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    impl = resolve_impl(impl, q, k, v, g, beta, initial_state, reference_max_t)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    if impl == "triton":  # takes half precision as it is (loads it, accumulates in float32)
        o, state = triton(q, k, v, g, beta, scale, initial_state)
        return o.to(out_dtype), (state if output_final_state else None)
    fn = reference if impl == "reference" else chunk
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
                     q, k, v, g, beta, scale, initial_state, output_final_state, impl,
                     triton=triton_kernels.gated_delta_rule)


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
    max_t = AUTO_REFERENCE_MAX_T_KEY_DECAY if g.dim() == 4 else AUTO_REFERENCE_MAX_T
    return _dispatch(gated_linear_rule_reference, chunk_gated_linear_rule,
                     q, k, v, g, beta, scale, initial_state, output_final_state, impl, max_t,
                     triton=triton_kernels.gated_linear_rule)


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


# What a rule needs from the block that feeds it; a block says what it gives
# (``archkit.blocks.fast_weight.FastWeightConfig.gives``). A rule registered elsewhere
# needs nothing here.
RULE_NEEDS: dict[str, frozenset[str]] = {
    # the delta rule reads S before writing: stable only with beta ||k||^2 < 2
    "gated_delta": frozenset({"unit_keys", "write_at_most_one", "scalar_decay"}),
    "delta": frozenset({"unit_keys", "write_at_most_one"}),
    "hebbian": frozenset(),  # takes a scalar or a per-key decay, any keys and strength
}

register_rule("gated_delta", description="delta rule with decay (Gated DeltaNet)")(
    gated_delta_rule
)
register_rule("delta", description="delta rule without decay (DeltaNet); ignores g")(delta_rule)
register_rule("hebbian", description="gated Hebbian / linear-attention rule (Mamba2, GLA)")(
    gated_linear_rule
)

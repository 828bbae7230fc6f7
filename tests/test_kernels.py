"""Fast-weight ops: the chunked paths against the per-token reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archkit.kernels import chunk as chunk_module
from archkit.kernels import (
    chunk_gated_delta_rule,
    chunk_gated_linear_rule,
    delta_rule,
    gated_delta_rule,
    gated_linear_rule,
)
from archkit.registry import RULES

# (T, K, V, initial state given): T=1 and 7 fit in one chunk, 63/65 sit at the default
# chunk boundary (64), 200 crosses three of them and ends mid-chunk.
SHAPES = [(1, 24, 40, True), (7, 40, 24, False), (63, 24, 24, True), (65, 40, 72, False),
          (200, 24, 40, True)]
# relative RMSE; float32 chunk-vs-reference errors are ~1e-6, up to ~2e-5 for the gradient
# w.r.t. g under extreme decay (float32 cumsums of g reach -300 within a chunk).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second thread buys nothing, and when other jobs share the
    cores, OpenMP's spinning threads make the file ~30x slower instead of ~2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(T: int, K: int, V: int, dtype: torch.dtype, *, B: int = 2, H: int = 2,
                key_decay: bool = False, initial: bool = True,
                seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Leaf tensors shaped like a block's: unit-norm keys, beta in (0, 1), g <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "g": F.logsigmoid(randn(B, T, H, *((K,) if key_decay else ()))),
        "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64),
        "initial_state": randn(B, H, K, V) if initial else None,
    }
    return {n: None if t is None else t.to(dtype).requires_grad_() for n, t in x.items()}


def run(op, x: dict, impl: str, **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, final state and the gradients of a fixed random loss w.r.t. every input."""
    o, state = op(*(x[n] for n in NAMES[:5]), initial_state=x["initial_state"],
                  output_final_state=True, impl=impl, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    w_state = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    loss = loss + (state * w_state).sum()
    inputs = [t for t in x.values() if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    names = [n for n, t in x.items() if t is not None]
    return o.detach(), state.detach(), dict(zip(names, grads, strict=True))


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


def assert_matches(op, x: dict, tol: float) -> None:
    o_ref, s_ref, g_ref = run(op, x, "reference")
    o, s, grads = run(op, x, "chunk")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_rmse(o, o_ref) < tol, "output"
    assert rel_rmse(s, s_ref) < tol, "final state"
    for name, grad in grads.items():
        assert rel_rmse(grad, g_ref[name]) < tol, f"gradient w.r.t. {name}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("T", "K", "V", "initial"), SHAPES)
def test_gated_delta_chunk_matches_reference(T, K, V, initial, dtype):
    assert_matches(gated_delta_rule, make_inputs(T, K, V, dtype, initial=initial), TOLERANCE[dtype])


@pytest.mark.parametrize("key_decay", [False, True], ids=["g_per_head", "g_per_key"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("T", "K", "V", "initial"), SHAPES)
def test_gated_linear_chunk_matches_reference(T, K, V, initial, dtype, key_decay):
    x = make_inputs(T, K, V, dtype, initial=initial, key_decay=key_decay)
    assert_matches(gated_linear_rule, x, TOLERANCE[dtype])


def test_gated_linear_without_beta_means_beta_one():
    x = make_inputs(70, 24, 40, torch.float64)
    o, s = gated_linear_rule(x["q"], x["k"], x["v"], x["g"], None, impl="chunk",
                             output_final_state=True)
    ones = torch.ones_like(x["beta"])
    o1, s1 = gated_linear_rule(x["q"], x["k"], x["v"], x["g"], ones, impl="reference",
                               output_final_state=True)
    assert rel_rmse(o, o1) < 1e-12 and rel_rmse(s, s1) < 1e-12


@pytest.mark.parametrize("chunk_size", [4, 16, 64, 128])
def test_other_chunk_sizes(chunk_size):
    x = make_inputs(37, 24, 40, torch.float64)
    args = [x[n] for n in NAMES[:5]]
    ref, ref_state = gated_delta_rule(*args, initial_state=x["initial_state"], impl="reference",
                                      output_final_state=True)
    o, s = chunk_gated_delta_rule(*args, scale=24**-0.5, initial_state=x["initial_state"],
                                  chunk_size=chunk_size)
    assert rel_rmse(o, ref) < 1e-10 and rel_rmse(s, ref_state) < 1e-10
    x = make_inputs(37, 24, 40, torch.float64, key_decay=True)
    args = [x[n] for n in NAMES[:5]]
    ref, _ = gated_linear_rule(*args, impl="reference")
    o, _ = chunk_gated_linear_rule(*args, scale=24**-0.5, chunk_size=chunk_size, sub_chunk=4)
    assert rel_rmse(o, ref) < 1e-10


@pytest.mark.parametrize(
    ("op", "key_decay"),
    [(gated_delta_rule, False), (gated_linear_rule, False), (gated_linear_rule, True)],
    ids=["gated_delta", "linear_per_head", "linear_per_key"],
)
@pytest.mark.parametrize("segment_floats", [1, 40_000])
def test_segments_of_chunks(op, key_decay, segment_floats, monkeypatch):
    """Long inputs run in segments of chunks: one chunk per segment, or a few."""
    monkeypatch.setattr(chunk_module, "_SEGMENT", segment_floats)
    x = make_inputs(200, 24, 40, torch.float64, key_decay=key_decay)
    assert_matches(op, x, TOLERANCE[torch.float64])


@pytest.mark.parametrize("segment_floats", [1, 2**19])
def test_gated_delta_without_autograd(segment_floats, monkeypatch):
    """Without autograd the chunked delta rule updates its state in place: the same result
    as with autograd, and the caller's initial state is left as it was."""
    monkeypatch.setattr(chunk_module, "_SEGMENT", segment_floats)
    x = make_inputs(200, 24, 40, torch.float64)
    args = [x[n] for n in NAMES[:5]]
    initial = x["initial_state"].detach().clone()
    o, state = chunk_gated_delta_rule(*args, scale=0.3, initial_state=x["initial_state"])
    with torch.no_grad():
        o_no_grad, state_no_grad = chunk_gated_delta_rule(*args, scale=0.3,
                                                          initial_state=x["initial_state"])
    assert torch.equal(x["initial_state"].detach(), initial)
    assert rel_rmse(o_no_grad, o.detach()) < 1e-12
    assert rel_rmse(state_no_grad, state.detach()) < 1e-12


@pytest.mark.parametrize(
    ("op", "key_decay"),
    [(chunk_gated_delta_rule, False), (chunk_gated_linear_rule, False),
     (chunk_gated_linear_rule, True)],
    ids=["gated_delta", "linear_per_head", "linear_per_key"],
)
def test_gradcheck_chunk(op, key_decay):
    x = make_inputs(6, 3, 2, torch.float64, B=1, H=2, key_decay=key_decay, seed=3)
    sizes = {"chunk_size": 4}
    if op is chunk_gated_linear_rule:
        sizes["sub_chunk"] = 2

    def f(*args):
        return op(*args[:5], scale=0.7, initial_state=args[5], **sizes)

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in NAMES))


@pytest.mark.parametrize(
    ("op", "key_decay"),
    [(gated_delta_rule, False), (gated_linear_rule, False), (gated_linear_rule, True)],
    ids=["gated_delta", "linear_per_head", "linear_per_key"],
)
def test_strong_decay_stays_finite_and_exact(op, key_decay):
    """g down to ~ -5 per step over 400 tokens: exp(-cumsum) would overflow float32."""
    x = make_inputs(400, 32, 32, torch.float32, key_decay=key_decay, seed=5)
    with torch.no_grad():
        x["g"].mul_(0).add_(-5.0 + torch.rand(x["g"].shape))
    assert_matches(op, x, TOLERANCE[torch.float32])


def test_registered_rules_by_name():
    x = make_inputs(20, 24, 40, torch.float64)
    args = [x[n] for n in NAMES[:5]]
    for name in ("gated_delta", "delta", "hebbian"):
        o, state = RULES.get(name).obj(*args, initial_state=x["initial_state"],
                                       output_final_state=True)
        assert o.shape == x["v"].shape and state.shape == x["initial_state"].shape
    # delta == gated_delta with g = 0, whatever g it is given
    o_delta, _ = RULES.get("delta").obj(*args)
    o_zero, _ = gated_delta_rule(*args[:3], torch.zeros_like(x["g"]), args[4])
    assert rel_rmse(o_delta, o_zero) < 1e-12
    assert rel_rmse(delta_rule(*args[:3], None, args[4])[0], o_zero) < 1e-12
    assert rel_rmse(o_delta, gated_delta_rule(*args)[0]) > 1e-3  # g really was ignored


@pytest.mark.parametrize("impl", ["auto", "reference", "chunk"])
def test_half_precision_computes_in_float32(impl):
    x = make_inputs(80, 24, 40, torch.float32)
    args = [x[n].detach() for n in NAMES[:5]]
    o32, _ = gated_delta_rule(*args, output_final_state=True, impl=impl)
    o16, s16 = gated_delta_rule(*(a.bfloat16() for a in args), output_final_state=True,
                                impl=impl)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert rel_rmse(o16.float(), o32) < 2e-2


@pytest.mark.parametrize("T", [1, 3, 100])
def test_auto_matches_reference(T):
    x = make_inputs(T, 24, 40, torch.float64)
    args = [x[n] for n in NAMES[:5]]
    for op in (gated_delta_rule, gated_linear_rule):
        assert rel_rmse(op(*args, impl="auto")[0], op(*args, impl="reference")[0]) < 1e-10


def _bad_inputs():
    x = {n: t.detach() for n, t in make_inputs(5, 8, 6, torch.float32, B=2, H=3).items()}
    yield "q", "q must be a 4-D tensor", {"q": x["q"][0]}
    yield "k", "k must have shape", {"k": x["k"][..., :4]}
    yield "v", "v must have shape", {"v": x["v"][:1]}
    yield "g", "g must have shape", {"g": x["g"][..., None].expand(2, 5, 3, 8)}  # per-key on delta
    yield "beta", "beta must have shape", {"beta": None}
    yield "state", "initial_state must have shape", {"initial_state": x["initial_state"].mT}
    yield "impl", "impl must be one of", {"impl": "triton-ish"}
    yield "empty", "at least one token", {n: x[n][:, :0] for n in NAMES[:5]}
    yield "dtype", "floating-point", {"q": x["q"].long(), "k": x["k"].long()}


@pytest.mark.parametrize(("case", "message", "change"), list(_bad_inputs()),
                         ids=[c for c, _, _ in _bad_inputs()])
def test_bad_arguments_raise_value_error(case, message, change):
    x = {n: t.detach() for n, t in make_inputs(5, 8, 6, torch.float32, B=2, H=3).items()}
    kw = {"initial_state": x.pop("initial_state"), "impl": "auto"}
    for name, value in change.items():
        (kw if name in kw else x)[name] = value
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(*(x[n] for n in NAMES[:5]), **kw)


def test_linear_rule_g_shape_error_names_both_layouts():
    x = {n: t.detach() for n, t in make_inputs(5, 8, 6, torch.float32).items()}
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H\] or \[B, T, H, K\]"):
        gated_linear_rule(x["q"], x["k"], x["v"], x["g"][..., None].expand(2, 5, 2, 3))

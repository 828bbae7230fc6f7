"""Triton kernels (``archkit.kernels.triton``) against the per-token references.

On a CPU the kernels run under Triton's interpreter, which has to be switched on before
triton is first imported; so one worker subprocess (this file run as a script with
``TRITON_INTERPRET=1``) runs every case once and prints its errors as JSON, and the tests
assert on them case by case. On a CUDA machine the same cases also run natively, in
float32, bfloat16 and float16. Without one, every kernel is still compiled ahead of time
for sm_90, which the interpreter does not do.

Every case compares output, final state and the gradients w.r.t. q, k, v, g, beta and the
initial state (of a fixed random loss on the output and the final state) with the float64
reference, by relative RMSE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archkit.kernels.reference import gated_delta_rule_reference, gated_linear_rule_reference

# float32 kernels vs the float64 reference: ~1e-7 to 1e-6 measured under the interpreter.
# Half-precision inputs: o and the gradients come back rounded to the input dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
NAMES = ("q", "k", "v", "g", "beta", "initial_state")

# (B, T, H, K, V, initial state given): T = 1 is a decode step; 7 and 37 are not multiples
# of the chunk (16 below: 37 = 2 chunks + 5 tokens); K = 8 is padded to tl.dot's minimum
# block (16), 40 and 72 to 64 and 128, V = 72 spans three 32-column value blocks.
SHAPES = [(1, 1, 2, 8, 8, True), (2, 7, 2, 40, 72, False), (1, 37, 2, 72, 40, True)]
# rule: delta; linear (scalar decay); linear_key (per-key decay); linear_nobeta (beta=None).
# kernel: recurrent; chunk (chunked, default chunk size: 32 here, 16 for per-key decay);
# chunk16 / chunk32 / chunk64 (that chunk size); api (the public op with impl="triton",
# which picks the kernel by T: recurrent up to 64 tokens, chunked beyond). decay multiplies
# g: 8 makes the cumulated log decay reach about -100 within a chunk of 16 tokens.
CASES = {
    f"{rule}-{kernel}-T{shape[1]}-K{shape[3]}-V{shape[4]}": (rule, kernel, shape, 1.0)
    for shape in SHAPES
    for rule in ("delta", "linear", "linear_key")
    for kernel in ("recurrent", "chunk16")
} | {
    "delta-chunk64-T37-K40-V24": ("delta", "chunk64", (2, 37, 1, 40, 24, True), 1.0),
    "linear-chunk64-T37-K24-V40": ("linear", "chunk64", (2, 37, 1, 24, 40, False), 1.0),
    "linear_key-chunk32-T37-K24-V40": ("linear_key", "chunk32", (2, 37, 1, 24, 40, True), 1.0),
    "linear_nobeta-recurrent-T7-K40-V24":
        ("linear_nobeta", "recurrent", (1, 7, 2, 40, 24, True), 1.0),
    "linear_nobeta-chunk16-T37-K24-V40":
        ("linear_nobeta", "chunk16", (1, 37, 2, 24, 40, True), 1.0),
    "delta-chunk16-T37-K24-V24-strong": ("delta", "chunk16", (1, 37, 2, 24, 24, True), 8.0),
    "linear_key-chunk16-T37-K24-V24-strong":
        ("linear_key", "chunk16", (1, 37, 2, 24, 24, True), 8.0),
    "delta-chunk-T37-K72-V40": ("delta", "chunk", (1, 37, 2, 72, 40, True), 1.0),
    "linear_key-chunk-T37-K24-V40": ("linear_key", "chunk", (1, 37, 2, 24, 40, False), 1.0),
    "delta-api-T37-K40-V24": ("delta", "api", (1, 37, 2, 40, 24, True), 1.0),
    "delta-api-T70-K24-V24": ("delta", "api", (1, 70, 1, 24, 24, True), 1.0),
    "linear_key-api-T7-K24-V40": ("linear_key", "api", (1, 7, 2, 24, 40, True), 1.0),
}
# run under the interpreter in half precision too (the dtype plumbing; native runs do all)
HALF_CASES = {"delta-chunk16-T37-K72-V40": torch.bfloat16,
              "linear_key-recurrent-T7-K40-V72": torch.float16}


def make_inputs(rule: str, shape: tuple, decay: float = 1.0,
                seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 inputs like a block's: unit-norm keys, beta in (0, 1), g = logsigmoid <= 0."""
    B, T, H, K, V, initial = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    return {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "g": decay * F.logsigmoid(randn(B, T, H, *((K,) if rule == "linear_key" else ()))),
        "beta": None if rule == "linear_nobeta" else torch.rand(B, T, H, generator=gen,
                                                                dtype=torch.float64),
        "initial_state": randn(B, H, K, V) if initial else None,
    }


def outputs_and_grads(fn, x: dict) -> dict[str, torch.Tensor]:
    """o, the final state and d(loss)/d(input) for a fixed random loss on both outputs."""
    x = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in x.items()}
    o, state = fn(x)
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
    w_s = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.device)
    loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
    names = [n for n, t in x.items() if t is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return {"o": o.detach(), "state": state.detach(), **dict(zip(names, grads, strict=True))}


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def case_errors(case: str, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative RMSE of the Triton path vs the float64 reference, per output and gradient.
    The reference gets the same inputs, rounded to ``dtype`` first."""
    from archkit import kernels
    from archkit.kernels import triton as kt

    rule, kernel, shape, decay = CASES[case]
    x64 = {n: None if t is None else t.to(dtype).double()
           for n, t in make_inputs(rule, shape, decay).items()}
    scale = shape[3] ** -0.5
    reference = gated_delta_rule_reference if rule == "delta" else gated_linear_rule_reference
    expected = outputs_and_grads(lambda x: reference(*(x[n] for n in NAMES[:5]), scale,
                                                     x["initial_state"]), x64)

    def triton_path(x):
        args = [x[n] for n in NAMES[:5]]
        if kernel == "api":
            op = kernels.gated_delta_rule if rule == "delta" else kernels.gated_linear_rule
            return op(*args, initial_state=x["initial_state"], output_final_state=True,
                      impl="triton")
        op = kt.gated_delta_rule if rule == "delta" else kt.gated_linear_rule
        mode = "recurrent" if kernel == "recurrent" else "chunk"
        size = kernel.removeprefix("chunk")
        chunk_size = int(size) if kernel.startswith("chunk") and size else None
        return op(*args, scale, x["initial_state"], mode=mode, chunk_size=chunk_size)

    xd = {n: None if t is None else t.to(device=device, dtype=dtype) for n, t in x64.items()}
    got = outputs_and_grads(triton_path, xd)
    assert got["o"].dtype == dtype and got["o"].device.type == device
    assert got["state"].dtype == torch.float32
    for n, t in xd.items():
        assert t is None or got[n].dtype == dtype, f"gradient w.r.t. {n} has a wrong dtype"
    return {name: rel_rmse(got[name], ref) for name, ref in expected.items()}


def tolerance(case: str, dtype: torch.dtype) -> float:
    """Strong decay: float32 cumsums of g reach ~-100 within a chunk; measured errors up to
    ~7e-6 there, so those cases get 5x the room."""
    return TOLERANCE[dtype] * (5 if case.endswith("strong") else 1)


def assert_small(errors: dict[str, float], tol: float) -> None:
    assert set(errors) >= {"o", "state", "q", "k", "v", "g"}, errors
    bad = {name: err for name, err in errors.items() if not err < tol}  # catches nan too
    assert not bad, f"relative RMSE above {tol}: {bad}"


# --- CPU: the interpreter lane --------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Run every case once in a subprocess with TRITON_INTERPRET=1; its JSON results.

    A failed worker is returned, not raised: pytest would rerun a raising fixture for
    every test. ``results`` then fails each test with the worker's error."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"],
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"_failed": proc.stderr[-6000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def results(interpreted: dict, key: str):
    if "_failed" in interpreted:
        pytest.fail(f"interpreter worker failed:\n{interpreted['_failed']}")
    return interpreted[key]


def test_interpreter_was_on_and_cpu_tensors_were_used(interpreted):
    assert results(interpreted, "_interpreting") is True
    assert results(interpreted, "_device") == "cpu"


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_float32_matches_reference(interpreted, case):
    assert_small(results(interpreted, case), tolerance(case, torch.float32))


@pytest.mark.parametrize("case", list(HALF_CASES))
def test_interpreted_half_precision_matches_reference(interpreted, case):
    dtype = HALF_CASES[case]
    assert_small(results(interpreted, f"{case}-{dtype}"), tolerance(case, dtype))


def test_interpreted_argument_errors(interpreted):
    assert results(interpreted, "_errors") == {
        "float64": "ValueError", "delta_key_decay": "ValueError", "chunk_size": "ValueError",
    }


def worker() -> None:
    """The subprocess: every case (float32, plus HALF_CASES), argument errors, as JSON."""
    from archkit.kernels import triton as kt

    torch.set_num_threads(1)  # the interpreter's numpy work is tiny; don't crowd the cores
    results: dict = {"_interpreting": kt.interpreting(), "_device": "cpu"}
    for case in CASES:
        results[case] = case_errors(case, "cpu", torch.float32)
    for case, dtype in HALF_CASES.items():
        results[f"{case}-{dtype}"] = case_errors(case, "cpu", dtype)
    x = make_inputs("linear_key", (1, 3, 1, 16, 16, False))
    calls = {
        "float64": lambda: kt.gated_delta_rule(*(x[n] for n in NAMES[:3]), x["g"][..., 0],
                                               x["beta"], 0.25),
        "delta_key_decay": lambda: kt.gated_delta_rule(
            *(x[n].float() for n in NAMES[:5]), 0.25, mode="chunk"),
        "chunk_size": lambda: kt.gated_linear_rule(
            *(x[n].float() for n in NAMES[:3]), x["g"][..., 0].float(), None, 0.25,
            mode="chunk", chunk_size=24),
    }
    results["_errors"] = {}
    for name, call in calls.items():
        try:
            call()
            results["_errors"][name] = "no error"
        except Exception as err:
            results["_errors"][name] = type(err).__name__
    print(json.dumps(results))


# --- compiled mode without a GPU: the kernels build for sm_90 ------------------------------


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels imported here would be interpreted, not compiled")
def test_kernels_compile_for_sm90():
    """The interpreter does not check what only the compiler does (types across branches,
    layouts, resources), so every kernel is also compiled ahead of time for an H100
    (``triton.compile`` with a GPU target needs no GPU), at K = V = 128 with the default
    chunk configuration, and must fit an sm_90 block's shared memory (227 KB)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    from archkit.kernels.triton import chunk, recurrent
    from archkit.kernels.triton._common import block_sizes, chunk_config

    def build(fn, num_warps: int = 4, **consts):
        kinds = {"T": "i32", "NT": "i32", "B": "i32", "scale": "fp32"}
        signature = {n: "constexpr" if n in consts else kinds.get(n, "*fp32")
                     for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(n),): c for n, c in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps})
        assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, compiled.metadata.shared)

    K = V = 128
    BK, BV = block_sizes(K, V)
    sizes = {"H": 4, "K": K, "V": V, "BK": BK, "BV": BV, "HAS_BETA": True}
    for delta, key in [(True, False), (False, True)]:
        flags = {**sizes, "IS_DELTA": delta, "KEY_DECAY": key}
        build(recurrent._fwd, **flags, HAS_H0=True, SAVE_E=delta)
        build(recurrent._bwd_reverse, **flags, HAS_DHT=True)
        build(recurrent._bwd_forward, **flags, HAS_H0=True)
    for delta, key in [(True, False), (False, False), (False, True)]:
        BT, num_warps = chunk_config(K, key, None)
        flags = {**sizes, "BT": BT, "PREC": "tf32", "IS_DELTA": delta, "KEY_DECAY": key}
        build(chunk._fwd, num_warps, **flags, HAS_H0=True, SAVE_STATES=True)
        build(chunk._bwd, num_warps, **flags, HAS_DHT=True)


# --- CUDA: the same cases natively, half precision included -----------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_reference(case, dtype):
    pytest.importorskip("triton")
    assert_small(case_errors(case, "cuda", dtype), tolerance(case, dtype))


@cuda
def test_cuda_auto_runs_triton():
    from archkit.kernels import resolve_impl

    x = {n: None if t is None else t.float().cuda()
         for n, t in make_inputs("delta", (1, 100, 2, 64, 64, True)).items()}
    assert resolve_impl("auto", *(x[n] for n in NAMES)) == "triton"
    key = {n: None if t is None else t.bfloat16().cuda()
           for n, t in make_inputs("linear_key", (1, 1000, 2, 64, 64, True)).items()}
    assert resolve_impl("auto", *(key[n] for n in NAMES)) == "triton"
    wide = {n: None if t is None else t.cuda() for n, t in x.items()}  # float64
    assert resolve_impl("auto", *(wide[n].double() for n in NAMES)) == "chunk"


# --- dispatch without a GPU ---------------------------------------------------------------


def test_auto_on_cpu_picks_pytorch(monkeypatch):
    """impl="auto" never picks Triton on CPU tensors, interpreter or not, and runs."""
    from archkit.kernels import gated_delta_rule, resolve_impl

    x = {n: None if t is None else t.float()
         for n, t in make_inputs("delta", (1, 40, 2, 16, 16, True)).items()}
    args = [x[n] for n in NAMES[:5]]
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert resolve_impl("auto", *args, x["initial_state"]) == "chunk"
        assert resolve_impl("auto", *(a[:, :1] for a in args), x["initial_state"]) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    o, _ = gated_delta_rule(*args, initial_state=x["initial_state"], impl="auto")
    o_chunk, _ = gated_delta_rule(*args, initial_state=x["initial_state"], impl="chunk")
    assert torch.equal(o, o_chunk)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from archkit.kernels import gated_linear_rule

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = make_inputs("linear", (1, 4, 1, 16, 16, False))
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1|triton is not installed"):
        gated_linear_rule(*(x[n].float() for n in NAMES[:5]), impl="triton")


def test_auto_falls_back_without_triton(monkeypatch):
    from archkit.kernels import triton as kt

    monkeypatch.setattr(kt, "available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kt.usable(torch.zeros(1))


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()

"""Benchmark the chunked fast-weight ops against the per-token reference on this CPU.

    python benchmarks/fast_weight_ops.py              # the tables in docs/results.md
    python benchmarks/fast_weight_ops.py --quick      # T in {512, 2048}, fewer repeats
    python benchmarks/fast_weight_ops.py --threads 1  # torch threads (default 2)
    python benchmarks/fast_weight_ops.py --auto       # short T: where impl="auto" should switch

Shapes B=4, H=4, K=V=64, float32; unit-norm keys, beta = sigmoid(N(0,1)),
g = logsigmoid(U(0,1)) (decay factors 0.5-0.73 per step). Times are medians of repeated
calls (other jobs share the cores, so single calls are noisy); the chunk op and fla's are
timed alternately, call by call, so that their ratio sees the same load; the reference at
T=8192 gets fewer repeats. The fp32 matmul rate (1024^3) is measured in the same run, with
the same number of threads.

Baseline from flash-linear-attention (optional: not a dependency of archkit). Its naive
chunked PyTorch gated delta rule, ``fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule``
(chunks of 64, the fla path that runs on CPU; same [B, T, H, K] layout and scale, it does
not normalise q or k), gets its own columns when fla is importable::

    pip install --no-deps flash-linear-attention fla-core einops

(fla 0.6 keeps ``fla.ops`` in fla-core, which imports einops; --no-deps leaves torch,
triton and transformers as they are). Its output is checked against ours (allclose)
before it is timed; without fla the columns are left out and the script says so.

FLOPs counted for the chunked gated delta rule (the "% of matmul" column): the matmul
FLOPs of the chunked algorithm with chunks of C = 64 tokens, per chunk and head (exp,
masks and other elementwise work not counted)::

    A = (βK) K^T                    2 C^2 K
    scores = Q K^T                  2 C^2 K
    right-hand side (β e^γ K) S     2 C K V
    triangular solve for U          C^2 V
    state update K^T U              2 C K V
    inter-chunk output (e^γ Q) S    2 C K V
    intra-chunk output scores U     2 C^2 V

i.e. 4C²K + 3C²V + 6CKV = 13 * 64^3 = 3.4 MFLOP per chunk and head at C = K = V = 64
(53 kFLOP per token and head; 1.75 GFLOP for B=4, H=4, T=2048). The op now runs with
C = 32 on CPU (``archkit/kernels/chunk.py`` says why), which executes fewer of them:
4CK + 3CV + 6KV = 38.9 kFLOP per token and head, 0.73 of the count above. The "% of
matmul" column keeps the C = 64 count (a rate of equivalent work, comparable with earlier
tables); "% executed" divides the FLOPs actually run by the time instead.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from archkit.kernels import chunk_gated_delta_rule, gated_delta_rule, gated_linear_rule

B, H, K, V, CHUNK = 4, 4, 64, 64, 64
OP_CHUNK = inspect.signature(chunk_gated_delta_rule).parameters["chunk_size"].default
FLA_INSTALL = "pip install --no-deps flash-linear-attention fla-core einops"


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after one warm-up call unless there is just
    one (the slow reference at long T), in seconds."""
    return timeit_alternating({"fn": fn}, repeats)["fn"]


def timeit_alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, calling them in turn (one call each per round),
    so that a change of load hits all of them alike; one warm-up round unless repeats == 1."""
    if repeats > 1:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timeit(lambda: a @ b, repeats) / 1e9


def delta_flops(T: int, C: int = CHUNK) -> float:
    """Matmul FLOPs of the chunked gated delta rule with chunks of C (module docstring)."""
    chunks = -(-T // C)
    return B * H * chunks * (4 * C * C * K + 3 * C * C * V + 6 * C * K * V)


def inputs(T: int, key_decay: bool = False, grad: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    g_shape = (B, T, H, K) if key_decay else (B, T, H)
    x = {
        "q": torch.randn(B, T, H, K, generator=gen),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": F.logsigmoid(torch.rand(*g_shape, generator=gen)),
        "beta": torch.randn(B, T, H, generator=gen).sigmoid(),
    }
    return {n: t.requires_grad_(grad) for n, t in x.items()}


def load_fla() -> Callable | None:
    """fla's naive chunked gated delta rule, or None (with a note) when fla is missing."""
    try:
        with warnings.catch_warnings():  # "Triton is not supported on current platform"
            warnings.simplefilter("ignore")
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    except Exception as error:  # ImportError, or a broken install failing on import
        print(f"\nfla not importable ({type(error).__name__}: {error}): the fla naive "
              f"columns are left out. Install with: {FLA_INSTALL}")
        return None

    def fla(q, k, v, g, beta, impl: str = "fla") -> tuple:  # called like our ops, impl unused
        return naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=CHUNK, scale=K**-0.5)

    return fla


def check_fla(fla: Callable, x: dict) -> None:
    """fla's output must match ours before its time means anything."""
    with torch.no_grad():
        ours, _ = gated_delta_rule(**x, impl="chunk")
        theirs, _ = fla(**x)
    if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4):
        err = (theirs - ours).abs().max().item()
        raise SystemExit(f"fla naive disagrees with the chunk op (max abs diff {err:.2e})")


def forward(op: Callable, x: dict, impl: str) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return op(**x, impl=impl)

    return run


def forward_backward(op: Callable, x: dict, impl: str) -> Callable[[], object]:
    def run() -> object:
        o, _ = op(**x, impl=impl)
        o.sum().backward()
        return o

    return run


def row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def delta_tables(lengths: list[int], peak: float, quick: bool, fla: Callable | None) -> None:
    fla_head = ["fla naive ms", "fla / chunk"] if fla else []
    print("\nGated delta rule, forward (no grad):\n")
    print(row(["T", "reference ms", "chunk ms", "speedup", *fla_head, "GFLOP (C=64)",
               "GFLOP/s", "% of matmul", "% executed"]))
    print(row(["---"] * (8 + len(fla_head))))
    for T in lengths:
        x = inputs(T)
        ref = timeit(forward(gated_delta_rule, x, "reference"), 1 if T > 2048 or quick else 5)
        fns = {"chunk": forward(gated_delta_rule, x, "chunk")}
        if fla:
            check_fla(fla, x)
            fns["fla"] = forward(fla, x, "fla")
        t = timeit_alternating(fns, 5 if quick else 20)
        chunk = t["chunk"]
        rate = delta_flops(T) / chunk / 1e9
        executed = delta_flops(T, OP_CHUNK) / chunk / 1e9
        fla_cells = [f"{t['fla'] * 1e3:.1f}", f"{t['fla'] / chunk:.1f}x"] if fla else []
        print(row([T, f"{ref * 1e3:.0f}", f"{chunk * 1e3:.1f}", f"{ref / chunk:.1f}x",
                   *fla_cells, f"{delta_flops(T) / 1e9:.2f}", f"{rate:.0f}",
                   f"{100 * rate / peak:.0f}%", f"{100 * executed / peak:.0f}%"]))

    print("\nGated delta rule, forward + backward (sum of outputs):\n")
    print(row(["T", "reference ms", "chunk ms", "speedup", *fla_head]))
    print(row(["---"] * (4 + len(fla_head))))
    for T in lengths:
        x = inputs(T, grad=True)
        ref = timeit(forward_backward(gated_delta_rule, x, "reference"), 1 if T > 512 else 3)
        fns = {"chunk": forward_backward(gated_delta_rule, x, "chunk")}
        if fla:
            fns["fla"] = forward_backward(fla, x, "fla")
        t = timeit_alternating(fns, 3 if quick or T > 2048 else 10)
        chunk = t["chunk"]
        fla_cells = [f"{t['fla'] * 1e3:.1f}", f"{t['fla'] / chunk:.1f}x"] if fla else []
        print(row([T, f"{ref * 1e3:.0f}", f"{chunk * 1e3:.1f}", f"{ref / chunk:.1f}x",
                   *fla_cells]))


def linear_table(lengths: list[int], quick: bool) -> None:
    print("\nGated linear (Hebbian) rule, forward (no grad):\n")
    print(row(["T", "g", "reference ms", "chunk ms", "speedup"]))
    print(row(["---"] * 5))
    for T in lengths:
        for key_decay, name in ((False, "[B,T,H]"), (True, "[B,T,H,K]")):
            x = inputs(T, key_decay=key_decay)
            ref = timeit(forward(gated_linear_rule, x, "reference"), 1 if T > 2048 or quick else 3)
            chunk = timeit(forward(gated_linear_rule, x, "chunk"), 5 if quick else 10)
            print(row([T, name, f"{ref * 1e3:.0f}", f"{chunk * 1e3:.1f}", f"{ref / chunk:.1f}x"]))


def auto_table() -> None:
    """Short sequences, one sequence of 4 heads: the regime of token-by-token decode."""
    global B
    B = 1
    print("\nShort T (B=1, H=4, K=V=64), forward, median ms:\n")
    print(row(["T", "op", "reference", "chunk"]))
    print(row(["---"] * 4))
    ops = (("gated_delta", gated_delta_rule, False), ("hebbian", gated_linear_rule, False),
           ("hebbian, g per key", gated_linear_rule, True))
    for T in (1, 2, 3, 4, 8, 16, 64):
        for name, op, key_decay in ops:
            x = inputs(T, key_decay=key_decay)
            ref = timeit(forward(op, x, "reference"), 200)
            chunk = timeit(forward(op, x, "chunk"), 200)
            print(row([T, name, f"{ref * 1e3:.3f}", f"{chunk * 1e3:.3f}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in {512, 2048}, fewer repeats")
    parser.add_argument("--auto", action="store_true", help="time short T for impl='auto'")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if args.auto:
        auto_table()
        return
    lengths = [512, 2048] if args.quick else [512, 2048, 8192]
    # the best of three medians: a conservative (high) reference for the % column
    peak = max(matmul_gflops() for _ in range(3))
    print(f"fp32 matmul 1024^3: {peak:.0f} GFLOP/s")
    delta_tables(lengths, peak, args.quick, load_fla())
    linear_table(lengths, args.quick)
    print(f"\nfp32 matmul 1024^3 again after the tables: {matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()

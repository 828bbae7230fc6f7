"""Benchmark the Triton fast-weight kernels on a GPU against the chunked PyTorch path.

    python benchmarks/kernels_triton.py               # T in {2048, 8192, 32768}, both rules
    python benchmarks/kernels_triton.py --quick       # T = 2048 only
    python benchmarks/kernels_triton.py --crossover   # short T: recurrent vs chunked kernel

Shapes: B*H = 64 (B=4, H=16), K = V = 128, bfloat16 inputs by default (``--dtype``);
unit-norm keys, beta = sigmoid(N(0, 1)), g = logsigmoid(N(0, 1)) scalar decay. Each row
times forward + backward (gradients w.r.t. q, k, v, g, beta) with ``triton.testing.do_bench``
(median of repeated calls, after warm-up), for:

- ``triton``: ``archkit.kernels`` with impl="triton" (chunked kernels, chunk 64);
- ``chunk``: ``archkit.kernels`` with impl="chunk" (chunked PyTorch, computes in float32);
- ``fla``: flash-linear-attention's ``chunk_gated_delta_rule`` / ``chunk_simple_gla``, if
  installed (beta is folded into v for the linear rule, as fla's simple GLA has none).

TFLOP/s counts the chunked algorithm's matmul FLOPs, per chunk of C tokens and head,
forward (as in ``benchmarks/fast_weight_ops.py``)::

    gated delta rule:   4C²K + 3C²V + 6CKV   (A, scores, solve, S-reads and update, output)
    gated linear rule:  2C²(K + V) + 4CKV     (scores, intra output, S-read, state update)

and counts the backward as twice the forward (the usual convention), so fwd+bwd = 3x the
forward. Every implementation is credited the same count, so the column compares times.
Without a CUDA device the script says so and exits 0: there is nothing to time.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

B, H, K, V, CHUNK = 4, 16, 128, 128, 64


def flops_forward(rule: str, T: int, C: int = CHUNK) -> float:
    N = -(-T // C)
    per_chunk = (4 * C * C * K + 3 * C * C * V + 6 * C * K * V if rule == "delta"
                 else 2 * C * C * (K + V) + 4 * C * K * V)
    return float(N * per_chunk * B * H)


def make_inputs(T: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device="cuda")

    x = [randn(B, T, H, K), F.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V),
         F.logsigmoid(randn(B, T, H)), torch.sigmoid(randn(B, T, H))]
    return [t.to(dtype).requires_grad_() for t in x]


def implementations(rule: str) -> dict:
    """name -> fn(q, k, v, g, beta) returning the output, for those available."""
    from archkit import kernels

    op = kernels.gated_delta_rule if rule == "delta" else kernels.gated_linear_rule
    fns = {
        "triton": lambda *x: op(*x, impl="triton")[0],
        "chunk": lambda *x: op(*x, impl="chunk")[0],
    }
    try:
        if rule == "delta":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            fns["fla"] = lambda q, k, v, g, beta: chunk_gated_delta_rule(
                q=q, k=k, v=v, g=g, beta=beta, scale=K**-0.5)[0]
        else:
            from fla.ops.simple_gla import chunk_simple_gla

            fns["fla"] = lambda q, k, v, g, beta: chunk_simple_gla(
                q=q, k=k, v=v * beta[..., None], g=g, scale=K**-0.5)[0]
    except ImportError:
        pass
    return fns


def time_fwd_bwd(fn, x: list[torch.Tensor]) -> float:
    """Median milliseconds of forward + backward."""
    from triton.testing import do_bench

    do = torch.randn(B, x[0].shape[1], H, V, device="cuda", dtype=x[0].dtype)

    def step():
        for t in x:
            t.grad = None
        fn(*x).backward(do)

    return do_bench(step, warmup=5, rep=50, return_mode="median")


def check_agreement(rule: str, dtype: torch.dtype) -> None:
    """The Triton and chunked PyTorch outputs agree (a guard against timing a wrong run)."""
    x = make_inputs(512, dtype)
    fns = implementations(rule)
    a, b = fns["triton"](*x).float(), fns["chunk"](*x).float()
    err = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    print(f"{rule}: triton vs chunk relative RMSE at T=512, {dtype}: {err:.1e}")


def main_table(Ts: list[int], dtype: torch.dtype) -> None:
    print(f"\nforward+backward, B*H={B * H} (B={B}, H={H}), K=V={K}, {dtype}, "
          f"{torch.cuda.get_device_name()}\n")
    print("| rule | T | impl | ms | TFLOP/s |")
    print("|---|---:|---|---:|---:|")
    for rule in ("delta", "linear"):
        check_agreement(rule, dtype)
        for T in Ts:
            x = make_inputs(T, dtype)
            for name, fn in implementations(rule).items():
                try:
                    ms = time_fwd_bwd(fn, x)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {rule} | {T} | {name} | out of memory | |")
                    torch.cuda.empty_cache()
                    continue
                tflops = 3 * flops_forward(rule, T) / (ms * 1e-3) / 1e12
                print(f"| {rule} | {T} | {name} | {ms:.2f} | {tflops:.1f} |", flush=True)
            del x
            torch.cuda.empty_cache()


def crossover(dtype: torch.dtype) -> None:
    """Forward-only and forward+backward times of the two Triton kernels at short T: where
    ``archkit.kernels.triton.RECURRENT_MAX_T`` should sit."""
    from triton.testing import do_bench

    from archkit.kernels import triton as kt

    print(f"\nrecurrent vs chunked Triton kernel, B*H={B * H}, K=V={K}, {dtype}\n")
    print("| rule | T | recurrent fwd ms | chunk fwd ms | recurrent fwd+bwd ms | "
          "chunk fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for rule in ("delta", "linear"):
        op = kt.gated_delta_rule if rule == "delta" else kt.gated_linear_rule
        for T in (1, 4, 16, 32, 64, 128, 256):
            x = make_inputs(T, dtype)
            row = []
            for grad in (False, True):
                for mode in ("recurrent", "chunk"):
                    def fn(op=op, x=x, mode=mode):
                        return op(*x, K**-0.5, mode=mode)[0]
                    if grad:
                        row.append(time_fwd_bwd(fn, x))
                    else:
                        with torch.no_grad():
                            row.append(do_bench(fn, warmup=5, rep=50, return_mode="median"))
            print(f"| {rule} | {T} | " + " | ".join(f"{ms:.3f}" for ms in row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 2048 only")
    parser.add_argument("--crossover", action="store_true", help="short T, the two kernels")
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU available: the Triton kernels have nothing to be timed on here "
              "(tests/test_triton.py checks them on CPU under TRITON_INTERPRET=1).")
        return 0
    dtype = getattr(torch, args.dtype)
    if args.crossover:
        crossover(dtype)
    else:
        main_table([2048] if args.quick else [2048, 8192, 32768], dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

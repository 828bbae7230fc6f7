"""Training throughput of this tree against a baseline commit, eager and compiled, in one run.

    python benchmarks/train_throughput.py                 # the table in docs/results.md
    python benchmarks/train_throughput.py --specs specs/rule110_cpu.yaml --passes 1 2 4 \\
        --threads 1 --baseline HEAD~3 --no-compile

Every cell times full optimiser steps as ``archkit train`` takes them (forward through
every pass, backward, gradient clipping, Muon + AdamW) on the task's training batches
from step 0, in a fresh worker process per variant:

    baseline   the ``--baseline`` commit's archkit, checked out with ``git worktree``
    eager      this tree                      (``train.compile: false``, the default)
    compiled   this tree with ``train.compile: true``

Workers of one cell run one after another, so a shared machine's drift hits them alike;
each reports the median of its steps after ``--warmup`` steps, and the warm-up (which
holds compilation) separately. The same steps see the same batches from the same seed,
so the loss difference against the baseline checks that the numerics are unchanged: at
the first step (a forward pass: rounding only) and at worst over the steps, beside the
baseline's own difference between two thread counts (``noise``: the same code, only the
order of floating-point reductions differs), which shows how much training amplifies
float32 rounding. ``train_tokens_per_s`` counts the tokens of a batch once,
whatever N.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from against_baseline import (
    ROOT,
    add_variant_arguments,
    archkit_folder,
    baseline_checkout,
    in_worker,
    variants_or_work,
)


def run_worker(spec: str, passes: int, threads: int, steps: int, warmup: int,
               compile_passes: bool, profile: bool = False) -> dict[str, object]:
    """Time ``steps`` optimiser steps of ``spec`` at N = ``passes`` with whichever archkit
    this process imports; the first ``warmup`` are timed apart. With ``profile``, the
    operators' table of the last three steps comes back instead, under ``profile``."""
    import torch
    from torch import nn

    from archkit.sleep import SleepingModel
    from archkit.spec import load_spec
    from archkit.trainer import make_optimizers, require

    torch.set_num_threads(threads)
    spec_obj = load_spec(spec, {"sleep.passes": passes})
    train, task = require(spec_obj)
    sleeper = SleepingModel.from_spec(spec_obj).train()
    if compile_passes:
        sleeper.model.compile_passes()
    optimizers = make_optimizers(sleeper, train)
    seconds, losses = [], []
    profiler = torch.profiler.profile()
    for step in range(steps):
        if profile and step == steps - 3:
            profiler.start()
        batch = task.train_batch(step, train.batch_size, spec_obj.seed)
        start = time.perf_counter()
        out = sleeper(batch.tokens, batch.context_len, batch.loss_mask)
        out.loss.backward()
        nn.utils.clip_grad_norm_(sleeper.parameters(), train.grad_clip or float("inf"))
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(out.loss))
    if profile:
        profiler.stop()
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                              max_name_column_width=44)
        return {"profile": table, "archkit": archkit_folder()}
    step_s = statistics.median(seconds[warmup:])
    return {"train_tokens_per_s": batch.tokens.numel() / step_s, "step_ms": 1e3 * step_s,
            "warmup_s": sum(seconds[:warmup]), "losses": losses,
            "archkit": archkit_folder()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["specs/rule110_cpu.yaml",
                                                       "specs/gsm_cpu.yaml"])
    parser.add_argument("--passes", type=int, nargs="+", default=None,
                        help="N values (default: 1 and 4 for Rule 110, 1 otherwise)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=50, help="steps per worker")
    parser.add_argument("--warmup", type=int, default=5, help="of which timed apart")
    add_variant_arguments(parser)
    parser.add_argument("--profile", action="store_true",
                        help="print the operator profile of three steps per variant instead")
    args = parser.parse_args()
    variants = variants_or_work(args, run_worker)
    if variants is None:
        return
    print(f"median optimiser step after {args.warmup} warm-up steps, {args.steps} steps per "
          f"worker; baseline = {args.baseline}")
    if not args.profile:
        print(f"{'spec':<16} {'N':>2} {'thr':>3} "
              + " ".join(f"{v + ' tok/s':>15}" for v in variants)
              + f" {'speed-up':>9} {'compiled':>9} {'warm-up s':>10} {'|dloss| 0':>10}"
              f" {'max |dloss|':>12} {'noise':>9}")
    noise_reference: dict[tuple[str, int], list[float]] = {}  # baseline at the first threads
    with baseline_checkout(args.baseline) as base:
        for spec in args.specs:
            passes = args.passes or ([1, 4] if "rule110" in spec else [1])
            for n in passes:
                for threads in args.threads:
                    config = {"spec": spec, "passes": n, "threads": threads,
                              "steps": args.steps, "warmup": args.warmup,
                              "profile": args.profile}
                    results = {v: in_worker(__file__, base if v == "baseline" else ROOT,
                                            {**config, "compile_passes": v == "compiled"})
                               for v in variants}
                    if args.profile:
                        for variant, result in results.items():
                            print(f"\n{Path(spec).stem}, N = {n}, {threads} thread(s), "
                                  f"{variant}: three optimiser steps\n{result['profile']}")
                        continue
                    print_row(spec, n, threads, results, noise_reference.get((spec, n)))
                    noise_reference.setdefault((spec, n), results["baseline"]["losses"])


def max_drift(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def print_row(spec: str, passes: int, threads: int, results: dict[str, dict],
              noise_reference: list[float] | None) -> None:
    """One cell: rates, speed-ups over the baseline, the compiled warm-up, the loss
    difference from the baseline at the first step (forward only: rounding) and at worst
    over the steps, and ``noise``: the baseline's own worst difference from itself at the
    first thread count (only the reduction order differs)."""
    rate = {v: r["train_tokens_per_s"] for v, r in results.items()}
    base_losses = results["baseline"]["losses"]
    others = [r["losses"] for v, r in results.items() if v != "baseline"]
    first = max(abs(losses[0] - base_losses[0]) for losses in others)
    drift = max(max_drift(losses, base_losses) for losses in others)
    noise = f"{max_drift(base_losses, noise_reference):>9.1e}" if noise_reference else "-"
    compiled = results.get("compiled")
    cells = " ".join(f"{rate[v]:>15,.0f}" for v in results)
    speedup = f"{rate['eager'] / rate['baseline']:>8.2f}x"
    vs = f"{compiled['train_tokens_per_s'] / rate['baseline']:>8.2f}x" if compiled else "-"
    warm = f"{compiled['warmup_s']:>10.1f}" if compiled else "-"
    print(f"{Path(spec).stem:<16} {passes:>2} {threads:>3} {cells} {speedup} {vs:>9} {warm:>10}"
          f" {first:>10.1e} {drift:>12.1e} {noise:>9}", flush=True)


if __name__ == "__main__":
    main()

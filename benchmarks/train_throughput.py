"""Training throughput against sleep passes N (the paper's Fig. 6b), in one run.

Times full optimiser steps (forward through every pass, backward, Muon + AdamW) of the
spec's model on fresh task batches, after a warm-up, and prints tokens per second per N
with the ratio to N=1. Consolidation dominates, so cost should grow about linearly in N.

    python benchmarks/train_throughput.py                   # specs/rule110_cpu.yaml
    python benchmarks/train_throughput.py --spec specs/depo_cpu.yaml --passes 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from archkit.sleep import SleepingModel
from archkit.spec import load_spec
from archkit.trainer import make_optimizers, require

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(spec_path: Path, passes: int, steps: int, warmup: int) -> float:
    spec = load_spec(spec_path, {"sleep.passes": passes})
    train_spec, task = require(spec)
    sleeper = SleepingModel.from_spec(spec).train()
    optimizers = make_optimizers(sleeper, train_spec)
    seconds = []
    for step in range(warmup + steps):
        batch = task.train_batch(step, train_spec.batch_size, spec.seed)
        start = time.perf_counter()
        out = sleeper(batch.tokens, batch.context_len, batch.loss_mask)
        out.loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return batch.tokens.numel() / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs/rule110_cpu.yaml")
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per N")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.spec.name}: median over {args.steps} optimiser steps, {args.threads} threads")
    print(f"{'N':>3} {'train_tokens_per_s':>18} {'vs N=1':>8} {'1/N':>6}")
    base = None
    for n in args.passes:
        rate = tokens_per_second(args.spec, n, args.steps, args.warmup)
        base = base or rate
        print(f"{n:>3} {rate:>18,.0f} {rate / base:>8.2f} {1 / n:>6.2f}")


if __name__ == "__main__":
    main()

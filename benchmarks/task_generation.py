"""Data-generation throughput of each task's paper preset, in one process.

Generation must never hold training back: the target is at least ten times what a
training step consumes (the paper's batches are 512 Rule 110, 128 Depo and 256
GSM-Infinite examples per step). Prints a Markdown table::

    python benchmarks/task_generation.py [--seconds 3] [--tasks rule110 depo]
"""

from __future__ import annotations

import argparse
import time

from archkit.tasks import get_task

BATCH = {"rule110": 512, "depo": 128, "gsm_infinite": 256, "mqar": 256}  # per training step


def throughput(name: str, split: str, seconds: float) -> tuple[float, float]:
    """Examples and tokens generated per second, over whole batches for ``seconds``."""
    task = get_task(name, preset="paper")
    count, step, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        if split == "train":
            count += len(task.train_batch(step, BATCH[name]))
        else:  # a fresh evaluation set per run seed
            count += len(task.eval_batch(BATCH[name], seed=step))
        step += 1
    elapsed = time.perf_counter() - start
    return count / elapsed, count * task.seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per task and split")
    parser.add_argument("--tasks", nargs="+", default=list(BATCH), choices=list(BATCH))
    args = parser.parse_args()
    print("| task (paper preset) | split | examples/s | tokens/s | batches/s of a step's size |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.tasks:
        for split in ("train", "eval"):
            examples, tokens = throughput(name, split, args.seconds)
            print(
                f"| {name} | {split} | {examples:,.0f} | {tokens:,.0f} | "
                f"{examples / BATCH[name]:,.1f} |"
            )


if __name__ == "__main__":
    main()

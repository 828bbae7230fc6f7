"""Training throughput of one process against 2 ranks (DDP and FSDP, gloo) on this machine.

Each variant trains ``specs/rule110_cpu.yaml`` for the same steps and global batch, one
thread per rank, from the command a user types (``archkit train`` or ``torchrun ... -m
archkit train``), and is timed from its ``metrics.jsonl``: training tokens per second of
the global batch, averaged over the logged steps after the first ``--skip`` (start-up and
warm-up). Printed as ratios against one process measured in the same run. On a machine
with 2 cores, 2 ranks are expected near 1x: each rank computes half the batch on its own
core but also draws the whole batch and exchanges gradients; the point of ranks here is
correctness, speed comes with more cores or GPUs.

    python benchmarks/ranks_throughput.py [--steps 60] [--skip 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (ranks, train.parallel)
    "1 process": (1, "ddp"),
    "2 ranks, DDP": (2, "ddp"),
    "2 ranks, FSDP": (2, "fsdp"),
}


def tokens_per_s(runs: Path, name: str, ranks: int, parallel: str, steps: int, skip: int
                 ) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    settings = {"train.steps": steps, "train.log_every": 1, "train.eval_every": steps,
                "train.checkpoint_every": steps, "train.eval_size": 64, "train.threads": 1,
                "train.parallel": parallel}
    subprocess.run([*launcher, "-m", "archkit", "train", str(ROOT / "specs/rule110_cpu.yaml"),
                    "--runs", str(runs), "--name", name, "--no-progress",
                    *(f"--set={k}={v}" for k, v in settings.items())],
                   check=True, capture_output=True)
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text()
               .splitlines()]
    return statistics.fmean(r["train_tokens_per_s"] for r in records
                            if r["kind"] == "train" and r["step"] > skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        measured = {name: tokens_per_s(Path(folder), f"v{i}", ranks, parallel, args.steps,
                                       args.skip)
                    for i, (name, (ranks, parallel)) in enumerate(VARIANTS.items())}
    baseline = measured["1 process"]
    print(f"rule110_cpu, {args.steps} steps of batch 64, one thread per rank")
    for name, value in measured.items():
        print(f"{name:>14}: {value:10,.0f} train tokens/s  {value / baseline:5.2f}x")


if __name__ == "__main__":
    main()

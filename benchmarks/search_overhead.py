"""What each search backend adds per trial, on a trivial objective.

The trial is as cheap as archkit's trials get: a 2-layer model of width 32, one training
step, one evaluation of 16 examples and one short latency measurement. The baseline is the
same trials called directly (``run_trial`` in a loop, no backend); each backend then runs
them through its own machinery in the same process tree, and the difference per trial is
its overhead. Ray's figure includes starting and stopping a local Ray runtime, as a user's
first search would.

    python benchmarks/search_overhead.py [--trials 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from archkit.searching import load_space, run_search
from archkit.searching.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]
TRIVIAL = {
    "model.d_model": 32, "model.blocks.gated_delta.head_dim": 16, "task.width": 6,
    "sleep.window": 6, "train.batch_size": 8, "train.warmup_steps": 1, "train.eval_every": 1,
    "train.eval_size": 16, "train.checkpoint_every": 1,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        space_file = work / "trivial.yaml"
        space_file.write_text(yaml.safe_dump({
            "extends": str(ROOT / "specs/rule110_cpu.yaml"), "set": TRIVIAL,
            "params": {"train.lr": {"float": [1e-4, 1e-2], "log": True}},
            "budget": {"trials": args.trials, "steps": 1}, "sampler": "random",
            "threads": 1, "bench": {"repeats": 1, "decode": 2},
        }))
        space = load_space(space_file)
        start = time.perf_counter()
        for i in range(args.trials):
            run_trial(space, {"train.lr": 1e-3}, work / "direct/trials" / f"{i}", str(i), 1)
        direct = (time.perf_counter() - start) / args.trials
        figures = {"direct (no backend)": direct}
        for backend in ("optuna", "ray"):
            start = time.perf_counter()
            run_search(space.model_copy(update={"name": backend}), work / "runs", backend,
                       progress=False)
            figures[backend] = (time.perf_counter() - start) / args.trials
    print(f"\n{args.trials} trivial trials; seconds per trial, and overhead against the "
          "direct calls of the same run")
    print(f"{'backend':<22}{'s / trial':>10}{'overhead s':>12}{'ratio':>8}")
    for name, seconds in figures.items():
        print(f"{name:<22}{seconds:>10.2f}{seconds - direct:>12.2f}{seconds / direct:>8.2f}")


if __name__ == "__main__":
    main()

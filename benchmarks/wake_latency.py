"""Wake latency and sleep cost against a full-attention transformer, in one run.

For each sleep length N and total context length C, the sleeping model (the spec's
layout, window L) consolidates the C context tokens, then decodes awake across four
wake-window boundaries (4L + 1 tokens); we time each wake step (median, 99th percentile,
slowest), the boundary stall (the mean step that first sleeps on its full window) and
each window's sleep (mean ms over the context's windows). The baseline is a transformer
of the same width and depth, all attention, that keeps its whole cache: it prefills C
tokens, then decodes the same number of tokens with a cache of C tokens and more.

    python benchmarks/wake_latency.py          # the figures in docs/results.md
    python benchmarks/wake_latency.py --contexts 512 --passes 1 2 --tokens 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from archkit.bench import default_decode_tokens, measure, percentile
from archkit.model import HybridModel
from archkit.sleep import SleepingModel
from archkit.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def sleeper_run(spec_path: Path, passes: int, window: int, context: int, tokens: int | None
                ) -> dict[str, float]:
    spec = load_spec(spec_path, {"sleep.passes": passes, "sleep.window": window,
                                 "sleep.controller": "fixed", "sleep.eviction": "hard"})
    sleeper = SleepingModel.from_spec(spec)
    ids = torch.randint(0, spec.model.vocab_size, (1, context + 1))
    return measure(sleeper, ids[:, :context], ids[:, context:], decode_tokens=tokens)


def baseline_run(spec_path: Path, context: int, tokens: int, seed: int) -> dict[str, float]:
    spec = load_spec(spec_path)
    depth = len(spec.model.resolved_layers)
    spec = load_spec(spec_path, {"model.pattern": "A" * depth, "model.legend": {"A": "attention"}})
    torch.manual_seed(seed)
    model = HybridModel(spec.model).eval()
    ids = torch.randint(0, spec.model.vocab_size, (1, context + tokens))
    state = model.init_state(1)
    for start in range(0, context, 512):  # prefill in chunks; the cache keeps everything
        _, state = model(ids[:, start:min(start + 512, context)], state)
    step_ms = []
    for t in range(tokens):
        start = time.perf_counter()
        _, state = model.step(ids[:, context + t], state)
        step_ms.append((time.perf_counter() - start) * 1e3)
    kv = sum(layer.mixer.kv_bytes_per_token() for layer in model.layers) * (context + tokens)
    return {"wake_ms_per_token": statistics.median(step_ms),
            "wake_ms_p99": percentile(step_ms, 99), "wake_ms_max": max(step_ms),
            "kv_peak_bytes": kv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs/rule110.yaml")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=None,
                        help="decode steps timed (default: 4 windows and one token)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokens = args.tokens or default_decode_tokens(args.window)
    print(f"spec {args.spec.name}, window L={args.window}, {args.threads} threads, batch 1; "
          f"{tokens} decode steps timed")
    columns = ("wake_ms_per_token", "wake_ms_p99", "wake_ms_max", "wake_stall_ms",
               "sleep_ms_per_window")
    print(f"{'model':>12} {'context':>8} " + " ".join(f"{c:>19}" for c in columns)
          + f" {'kv_peak_bytes':>14}")

    def show(label: str, context: int, row: dict[str, float]) -> None:
        cells = " ".join(f"{row[c]:>19.2f}" if c in row else f"{'-':>19}" for c in columns)
        print(f"{label:>12} {context:>8} {cells} {row['kv_peak_bytes'] / 2**20:>12.2f}Mi")

    rows = {}
    with torch.inference_mode():
        for context in args.contexts:
            rows["full", context] = baseline_run(args.spec, context, tokens, 0)
            show("full attn", context, rows["full", context])
            for n in args.passes:
                rows[n, context] = sleeper_run(args.spec, n, args.window, context, tokens)
                show(f"sleep N={n}", context, rows[n, context])

    lo, hi = min(args.contexts), max(args.contexts)
    n_lo, n_hi = min(args.passes), max(args.passes)
    wake = {k: v["wake_ms_per_token"] for k, v in rows.items()}
    print("\nratios (same run):")
    print(f"  wake latency, N={n_hi} / N={n_lo} at context {hi}: "
          f"{wake[n_hi, hi] / wake[n_lo, hi]:.2f}")
    print(f"  wake latency, context {hi} / {lo} at N={n_hi}: {wake[n_hi, hi] / wake[n_hi, lo]:.2f}")
    print(f"  full attention wake latency, context {hi} / {lo}: "
          f"{wake['full', hi] / wake['full', lo]:.2f}")
    print(f"  full attention / sleeping N={n_hi} wake latency at {hi}: "
          f"{wake['full', hi] / wake[n_hi, hi]:.2f}")
    for n in args.passes:
        ratio = rows[n, hi]["sleep_ms_per_window"] / rows[n_lo, hi]["sleep_ms_per_window"]
        stall = rows[n, hi]["wake_stall_ms"] / rows[n, hi]["wake_ms_per_token"]
        print(f"  sleep cost per window, N={n} / N={n_lo}: {ratio:.2f}; boundary stall / "
              f"median wake step at N={n}: {stall:.1f}")


if __name__ == "__main__":
    main()

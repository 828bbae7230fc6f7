"""Wake latency and sleep cost against a full-attention transformer, in one run.

For each sleep length N and total context length C, the sleeping model (the spec's
layout, window L) consolidates the C context tokens, then decodes tokens awake; we time
each wake step (median ms per token) and each window's sleep (mean ms over the context's
windows). The baseline is a transformer of the same width and depth, all attention, that
keeps its whole cache: it prefills C tokens, then decodes with a cache of C tokens and more.

    python benchmarks/wake_latency.py          # the figures in docs/results.md
    python benchmarks/wake_latency.py --contexts 512 --passes 1 2 --tokens 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from archkit.bench import measure
from archkit.model import HybridModel
from archkit.sleep import SleepingModel
from archkit.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def sleeper_run(spec_path: Path, passes: int, window: int, context: int, tokens: int
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
    return {"wake_ms_per_token": statistics.median(step_ms), "kv_peak_bytes": kv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs/rule110.yaml")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"spec {args.spec.name}, window L={args.window}, {args.threads} threads, batch 1; "
          f"median over {args.tokens} decode steps")
    print(f"{'model':>12} {'context':>8} {'wake_ms_per_token':>18} {'sleep_ms_per_window':>20} "
          f"{'kv_peak_bytes':>14}")
    rows = {}
    with torch.inference_mode():
        for context in args.contexts:
            base = baseline_run(args.spec, context, args.tokens, 0)
            rows["full", context] = base
            print(f"{'full attn':>12} {context:>8} {base['wake_ms_per_token']:>18.2f} "
                  f"{'-':>20} {base['kv_peak_bytes'] / 2**20:>12.2f}Mi")
            for n in args.passes:
                row = sleeper_run(args.spec, n, args.window, context, args.tokens)
                rows[n, context] = row
                print(f"{'sleep N=' + str(n):>12} {context:>8} {row['wake_ms_per_token']:>18.2f}"
                      f" {row['sleep_ms_per_window']:>20.1f} "
                      f"{row['kv_peak_bytes'] / 2**20:>12.2f}Mi")

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
        print(f"  sleep cost per window, N={n} / N={n_lo}: {ratio:.2f}")


if __name__ == "__main__":
    main()

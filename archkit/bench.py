"""Wake latency, sleep cost and memory of a sleeping model, measured on this machine.

Wake latency is what a user waits for per token once the context has been slept on: the
median over decode steps of ``wake_step`` (one pass, whatever N). That is not the whole
story: every L-th decode step finds its wake window full and first sleeps on it (N
passes over L tokens) before reading on, so a decoder stalls at each window boundary.
Decoding therefore runs over at least four windows by default, and the figures include
the tail (``wake_ms_p99``, ``wake_ms_max``) and the boundary stall itself
(``wake_stall_ms``, the mean decode step that slept). Sleep cost is the mean time to
consolidate one context window with the configured controller. Figures use a fixed thread
count and a warm-up run, so that two models compare on equal terms.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from archkit.sleep import SleepingModel
from archkit.spec import Spec


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


BOUNDARIES = 4  # wake windows a default decode crosses


def default_decode_tokens(window: int) -> int:
    """Decode steps that cross :data:`BOUNDARIES` wake-window boundaries, whatever the
    prompt: a boundary comes every ``window`` steps."""
    return BOUNDARIES * window + 1


@torch.inference_mode()
def measure(sleeper: SleepingModel, context: torch.Tensor, prompt: torch.Tensor,
            decode_tokens: int | None = None, warmup: bool = True) -> dict[str, Any]:
    """Sleep on ``context`` [1, C], read ``prompt`` [1, P] awake (the question), then decode
    ``decode_tokens`` greedily (default: across four window boundaries). Returns the
    figures ``archkit bench`` reports, under their ``archkit.metrics`` names, and the
    settings they were measured at under ``settings``."""
    if decode_tokens is None:
        decode_tokens = default_decode_tokens(sleeper.window)
    sleeper.eval()
    if warmup:  # across a window boundary: a compiled model compiles each path it takes
        warm = sleeper.init_wake(context[:, : sleeper.window])
        for _ in range(sleeper.window + 2):
            _, warm = sleeper.wake_step(prompt[:, 0], warm)
    start = time.perf_counter()
    wake = sleeper.init_wake(context)
    sleep_ms = _ms_since(start) / max(1, wake.report.sleeps)
    start = time.perf_counter()
    for t in range(prompt.shape[1]):
        logits, wake = sleeper.wake_step(prompt[:, t], wake)
    answer_ms = _ms_since(start)
    steps, stalls = [], []
    for _ in range(decode_tokens):
        sleeps = wake.report.sleeps
        start = time.perf_counter()
        logits, wake = sleeper.wake_step(logits.argmax(-1), wake)
        steps.append(_ms_since(start))
        if wake.report.sleeps > sleeps:
            stalls.append(steps[-1])
    kv_per_token = sum(layer.mixer.kv_bytes_per_token() for layer in sleeper.model.layers)
    report = wake.report
    return {
        "wake_ms_per_token": statistics.median(steps),
        "wake_ms_p99": percentile(steps, 99),
        "wake_ms_max": max(steps),
        "wake_stall_ms": statistics.fmean(stalls) if stalls else 0.0,
        "decode_sleeps": len(stalls),
        "answer_ms": answer_ms,
        "sleep_ms_per_window": sleep_ms,
        "sleeps": report.sleeps,
        "passes_per_sleep": statistics.fmean(report.passes) if report.passes else 0.0,
        "kv_peak_tokens": report.kv_peak_tokens,
        "kv_peak_bytes": report.kv_peak_tokens * kv_per_token,
        "fast_weight_bytes": report.fast_weight_bytes,
        "params": sum(p.numel() for p in sleeper.parameters()),  # tied weights counted once
        "settings": {"context_tokens": context.shape[1], "prompt_tokens": prompt.shape[1],
                     "decode_tokens": decode_tokens, "threads": torch.get_num_threads()},
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bench_inputs(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """What to sleep on and the prompt to read awake after it: one evaluation example of
    the spec's task, split where ``sleep.split`` starts reading awake, or four windows of
    random tokens when the spec has no task."""
    assert spec.sleep is not None
    if spec.task is not None:
        task = spec.task.build()
        tokens = task.eval_batch(1, spec.seed).tokens
        awake_from = spec.sleep.awake_from(task.context_len)
    else:
        awake_from = 4 * spec.sleep.window
        generator = torch.Generator().manual_seed(spec.seed)
        tokens = torch.randint(0, spec.model.vocab_size, (1, awake_from + 1),
                               generator=generator)
    return tokens[:, :awake_from], tokens[:, awake_from:]

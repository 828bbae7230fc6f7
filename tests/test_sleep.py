"""The sleep runtime against explicit constructions, in float64."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from archkit.blocks.common import FastWeightState, KVCache
from archkit.model import HybridModel
from archkit.sleep import SleepingModel, SleepReport
from archkit.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
L = 5


def build(tied: bool = True, spec: str = "mixed", **sleep: Any) -> SleepingModel:
    overrides = {"model.dtype": "float64", "model.tie_embeddings": tied, "sleep.window": L,
                 **{f"sleep.{k}": v for k, v in sleep.items()}}
    spec = load_spec(ROOT / f"specs/tiny/{spec}.yaml", overrides=overrides)
    torch.manual_seed(0)
    return SleepingModel(HybridModel(spec.model), spec.sleep)


def batch(total: int = 23, context: int = 12) -> tuple[torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (2, total), generator=gen)
    mask = torch.zeros(2, total, dtype=torch.bool)
    mask[:, context + 3:] = True
    return tokens, mask, context


def windows(start: int, stop: int) -> list[tuple[int, int]]:
    return [(s, min(s + L, stop)) for s in range(start, stop, L)]


def masked_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, context: int
                ) -> torch.Tensor:
    m = mask[:, context + 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][m], tokens[:, context + 1:][m])


def awake_from(split: str, context: int) -> int:
    """Where reading awake starts: the first window holding a prediction token (sequence),
    or the end of the context."""
    return context if split == "context" else context // L * L


@pytest.mark.parametrize("split", ["sequence", "context"])
def test_one_pass_hard_eviction_is_the_plain_model_window_by_window(split: str) -> None:
    sleeper = build(passes=1, split=split)
    model, (tokens, mask, context) = sleeper.model, batch()
    out = sleeper(tokens, context, mask)
    state, pieces, start = model.init_state(2), [], awake_from(split, context)
    for a, b in windows(0, start):
        _, state = model(tokens[:, a:b], state)
        state = model.evict(state, "hard")
    for i, (a, b) in enumerate(windows(start, tokens.shape[1])):
        if i:
            state = model.evict(state, "hard")
        logits, state = model(tokens[:, a:b], state)
        pieces.append(logits)
    expected = torch.cat(pieces, dim=1)[:, context - start:]
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, masked_loss(expected, tokens, mask, context))
    sleeps = len(windows(0, start)) + len(windows(start, tokens.shape[1])) - 1
    assert out.report.passes == [1] * sleeps and (split, sleeps) in {("sequence", 4),
                                                                     ("context", 5)}


def test_splits_agree_when_the_window_divides_the_context() -> None:
    tokens, mask, _ = batch()
    by_sequence, by_context = build(passes=2), build(passes=2, split="context")
    a, b = by_sequence(tokens, 2 * L, mask), by_context(tokens, 2 * L, mask)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert a.report.passes == b.report.passes


def test_the_answer_window_attends_to_the_context_it_shares() -> None:
    """Under ``split: sequence`` the context tokens of the window that holds the first
    prediction token stay in the KV cache while the answers are read: changing one
    changes the answers' logits, and it is never slept on."""
    sleeper = build(passes=2)
    tokens, mask, context = batch()  # context 12 with L = 5: tokens 10, 11 are read awake
    out = sleeper(tokens, context, mask)
    assert out.report.context_windows == 2 and out.report.kv_peak_tokens == L
    changed = tokens.clone()
    changed[:, 11] = (changed[:, 11] + 1) % 16
    after = sleeper(changed, context, mask)
    assert not torch.allclose(after.logits[:, :L - 2], out.logits[:, :L - 2])
    evicted = build(passes=2, split="context")
    assert evicted(tokens, context, mask).report.context_windows == 3


def test_one_pass_sliding_eviction_is_sliding_window_attention() -> None:
    sleeper = build(passes=1, eviction="sliding")
    model, (tokens, mask, context) = sleeper.model, batch()
    out = sleeper(tokens, context, mask)
    banded = [dataclasses.replace(s, span=L) if isinstance(s, KVCache) else s
              for s in model.init_state(2)]
    direct, _ = model(tokens, banded)  # the whole sequence at once, each query sees L tokens
    torch.testing.assert_close(out.logits, direct[:, context:], rtol=1e-10, atol=1e-12)
    assert out.report.kv_peak_tokens <= 2 * L - 1


def test_two_passes_equal_two_manual_passes() -> None:
    sleeper = build(passes=2, split="context")
    model, (tokens, mask, context) = sleeper.model, batch()
    out = sleeper(tokens, context, mask)

    def sleep_on(window: torch.Tensor, state: list[Any]) -> list[Any]:
        h, after = model.run_layers(model.embed(window), state)
        rewound = []
        for before_i, after_i in zip(state, after, strict=True):
            if isinstance(after_i, FastWeightState):  # keep S, re-read the conv context
                rewound.append(FastWeightState(after_i.weights, before_i.conv_tail))
            else:  # attention rebuilds its KV from the new h
                rewound.append(before_i)
        _, after = model.run_layers(h, rewound)
        return model.evict(after, "hard")

    state, pieces = model.init_state(2), []
    for a, b in windows(0, context):
        state = sleep_on(tokens[:, a:b], state)
    window_start = state
    for i, (a, b) in enumerate(windows(context, tokens.shape[1])):
        if i:
            state = sleep_on(tokens[:, a - L:a], window_start)
        window_start = state
        logits, state = model(tokens[:, a:b], state)
        pieces.append(logits)
    torch.testing.assert_close(out.logits, torch.cat(pieces, 1), rtol=1e-10, atol=1e-12)


def test_only_the_configured_layers_loop() -> None:
    sleeper = build(passes=3, layers=[1, 2])
    calls: Counter[int] = Counter()
    for i, layer in enumerate(sleeper.model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.update([i]))
    tokens, _, _ = batch(total=16, context=15)
    sleeper(tokens, 15)
    # 3 context windows: layers 1-2 run 3 times each, the others once; plus 1 wake pass.
    assert calls == {0: 3 + 1, 1: 9 + 1, 2: 9 + 1, 3: 3 + 1, 4: 3 + 1}


def test_memory_stays_bounded_and_fast_weights_change() -> None:
    sleeper = build(passes=2)
    tokens = torch.randint(0, 16, (2, 10 * L + 3))
    out = sleeper(tokens, 10 * L)
    assert out.report.sleeps == 10
    assert out.report.kv_peak_tokens <= L
    assert max(s.tokens for s in out.state if isinstance(s, KVCache)) == 3
    fresh = sleeper.model.init_state(2)
    for now, start in zip(out.state, fresh, strict=True):
        if isinstance(now, FastWeightState):
            assert not torch.allclose(now.weights, start.weights)
    assert out.report.fast_weight_bytes > 0


def first_window_embedding_grad(sleeper: SleepingModel) -> torch.Tensor:
    tokens = torch.randint(1, 16, (2, 3 * L + 4))
    tokens[:, 0] = 0  # token 0 appears only in the first context window (embeddings untied)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -2:] = True
    sleeper.zero_grad()
    sleeper(tokens, 3 * L, mask).loss.backward()
    return sleeper.model.embedding.weight.grad[0]


@pytest.mark.parametrize("passes", [1, 4])
def test_gradient_reaches_the_first_context_window(passes: int) -> None:
    assert first_window_embedding_grad(build(False, passes=passes)).abs().sum() > 0


def test_last_k_truncates_earlier_passes_and_none_cuts_sleep() -> None:
    truncated = build(False, passes=4, backprop="last_k", last_k=1)
    assert first_window_embedding_grad(truncated).abs().sum() == 0
    assert truncated.model.layers[1].mixer.qkv_proj.weight.grad.abs().sum() > 0
    whole = build(False, passes=2, backprop="last_k", last_k=2)
    assert first_window_embedding_grad(whole).abs().sum() > 0
    assert first_window_embedding_grad(build(False, passes=2, backprop="none")).abs().sum() == 0


def test_pass_norm_rescales_each_later_pass_to_the_first_pass_scale() -> None:
    tokens, mask, context = batch()
    plain, normed = build(passes=1), build(passes=1, pass_norm="rms")
    torch.testing.assert_close(plain(tokens, context, mask).logits,
                               normed(tokens, context, mask).logits, rtol=0, atol=0)
    sleeper = build(passes=3, pass_norm="rms")
    entries: list[torch.Tensor] = []
    first_loop_layer = sleeper.model.layers[sleeper.loop.start]
    handle = first_loop_layer.register_forward_pre_hook(
        lambda _module, args: entries.append(args[0].detach()))
    window = tokens[:, :L]
    sleeper.consolidate(window, sleeper.model.init_state(2), SleepReport(context_windows=1))
    handle.remove()
    assert len(entries) == 3
    rms = [e.pow(2).mean(-1).sqrt() for e in entries]
    torch.testing.assert_close(rms[1], rms[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(rms[2], rms[0], rtol=1e-8, atol=0)
    unnormed = build(passes=3)
    assert not torch.allclose(sleeper(tokens, context, mask).logits,
                              unnormed(tokens, context, mask).logits)
    assert first_window_embedding_grad(build(False, passes=2, pass_norm="rms")).abs().sum() > 0


@pytest.mark.parametrize(("spec", "rule"), [("mixed", "same"), ("mixed", "hebbian"),
                                            ("gated_delta", "delta"), ("hebbian", "gated_delta")])
def test_checkpointing_gives_the_same_gradients(spec: str, rule: str) -> None:
    """Also under a sleep rule, which the backward pass must use again when it recomputes
    a checkpointed pass (it runs after the sleep has ended)."""
    grads = []
    for flag in (False, True):
        sleeper = build(spec=spec, passes=2, checkpoint=flag, rule=rule)
        tokens, mask, context = batch()
        sleeper(tokens, context, mask).loss.backward()
        grads.append([p.grad.clone() for p in sleeper.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaptive_stops_early_when_fast_weights_converge() -> None:
    # Delta-rule memory re-reading the same window converges to a fixed point (Hebbian
    # memory with decay near 1 would keep growing); with no layer writing to the residual
    # stream, every pass reads the same h.
    sleeper = build(spec="gated_delta", controller="adaptive", max_passes=40, tol=1e-4,
                    split="context").eval()
    with torch.no_grad():
        for name, param in sleeper.model.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down.weight")):
                param.zero_()
    tokens, _, context = batch()
    used = sleeper(tokens, context).report.passes
    assert all(1 < n < 40 for n in used), used
    strict = build(controller="adaptive", max_passes=6, tol=1e-300, split="context").eval()
    assert strict(tokens, context).report.passes == [6] * 5


def test_adaptive_decides_per_sequence_whatever_the_batch() -> None:
    """A sequence's passes and logits are the same alone and in a batch; one that stopped
    keeps its state while the rest sleep on, so it equals a fixed-N model at its count."""
    def adaptive_or_fixed(**sleep: Any) -> SleepingModel:
        sleeper = build(spec="gated_delta", **sleep).eval()
        with torch.no_grad():  # small outputs, so that passes change h a little
            for name, param in sleeper.model.named_parameters():
                if name.endswith(("o_proj.weight", "out_proj.weight", "down.weight")):
                    param.mul_(0.1)
        return sleeper

    adaptive = adaptive_or_fixed(controller="adaptive", max_passes=8, tol=5e-2)
    tokens = torch.randint(0, 16, (6, L + 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = adaptive(tokens, L)  # one context window, then three tokens awake
        (passes,) = together.report.passes_per_sequence
        assert len(set(passes.tolist())) > 2 and 8 in passes.tolist(), passes
        for i, n in enumerate(passes.tolist()):
            alone = adaptive(tokens[i:i + 1], L)
            assert alone.report.passes_per_sequence[0].tolist() == [n]
            torch.testing.assert_close(alone.logits[0], together.logits[i],
                                       rtol=1e-9, atol=1e-12)
            fixed = adaptive_or_fixed(passes=n)(tokens[i:i + 1], L)
            torch.testing.assert_close(fixed.logits[0], together.logits[i],
                                       rtol=1e-9, atol=1e-12)
    assert together.report.passes == [passes.double().mean().item()]


def test_adaptive_sleeps_at_most_the_passes_it_trained_at_by_default() -> None:
    tokens, _, context = batch()
    never = {"controller": "adaptive", "tol": 1e-300, "split": "context"}
    assert build(passes=3, **never).eval()(tokens, context).report.passes == [3] * 5
    drawn = build(train_passes=[1, 4], **never).eval()
    assert drawn(tokens, context).report.passes == [4] * 5


def test_adaptive_trains_at_fixed_passes() -> None:
    sleeper = build(controller="adaptive", max_passes=8, passes=3, split="context").train()
    tokens, _, context = batch()
    assert sleeper(tokens, context).report.passes == [3] * 5
    torch.manual_seed(0)
    drawn = build(controller="adaptive", train_passes=[1, 2], split="context").train()
    assert set(drawn(tokens, context).report.passes) == {1, 2}


def test_schedule_by_window_and_by_depth() -> None:
    tokens, _, context = batch(total=16, context=15)
    first = build(controller="schedule", schedule=[3, 1])
    assert first(tokens, context).report.passes == [3, 1, 1]
    last = build(controller="schedule", schedule=[3, 2], order="last")
    assert last(tokens, context).report.passes == [2, 2, 3]


def test_only_an_adaptive_controller_at_inference_sees_fast_weight_snapshots() -> None:
    settings = {"fixed": {}, "schedule": {"schedule": [2]}, "adaptive": {}}
    watching = {(name, training): build(controller=name, **extra).controller
                .watches_weights(training)
                for name, extra in settings.items() for training in (True, False)}
    assert watching == {("fixed", True): False, ("fixed", False): False,
                        ("schedule", True): False, ("schedule", False): False,
                        ("adaptive", True): False, ("adaptive", False): True}
    fixed, snapshots = build(passes=2, split="context").eval(), []

    def snapshot(state: list[Any]) -> list[torch.Tensor]:
        snapshots.append(state)
        return []

    fixed._fast_weights = snapshot  # type: ignore[method-assign]
    tokens, _, context = batch()
    assert fixed(tokens, context).report.passes == [2] * 5
    assert snapshots == []


def test_window_index_counts_context_then_decode_sleeps() -> None:
    sleeper = build(controller="schedule", schedule=[3, 1], split="context").eval()
    asked: list[tuple[int, int]] = []
    passes = sleeper.controller.passes

    def spy(index: int, n_windows: int, training: bool) -> int:
        asked.append((index, n_windows))
        return passes(index, n_windows, training)

    sleeper.controller.passes = spy  # type: ignore[method-assign]
    tokens, _, context = batch(total=30, context=12)  # 3 context windows, 18 tokens awake
    report = sleeper(tokens, context).report
    assert asked == [(i, 3) for i in range(3 + 3)]
    assert (report.context_windows, report.sleeps, report.passes) == (3, 6, [3] + [1] * 5)
    asked.clear()
    _, _, report = sleeper.generate(tokens[:, :14], context, max_new_tokens=9)
    assert asked == [(i, 3) for i in range(3 + 2)]  # 2 + 9 tokens read awake: 2 wake sleeps
    assert (report.context_windows, report.sleeps) == (3, 5)


def test_sleep_rule_override_equals_a_block_with_that_rule() -> None:
    tokens, _, context = batch(total=16, context=15)
    swapped = build(spec="gated_delta", passes=2, rule="delta")
    native = build(spec="gated_delta", passes=2)
    for layer in native.model.layers:
        if layer.block_name == "gated_delta":
            layer.mixer.rule = "delta"
    wake = build(spec="gated_delta", passes=2)
    slept = [m.init_wake(tokens[:, :context]).layers for m in (swapped, native, wake)]
    for a, b, c in zip(*slept, strict=True):
        if isinstance(a, FastWeightState):
            torch.testing.assert_close(a.weights, b.weights, rtol=1e-10, atol=1e-12)
            assert not torch.allclose(a.weights, c.weights)
    assert swapped.model.layers[1].mixer.rule == "gated_delta"  # restored after sleeping


@pytest.mark.parametrize(("split", "sleeps"), [("sequence", 2 + 2), ("context", 3 + 2)])
def test_generate_equals_teacher_forced_logits(split: str, sleeps: int) -> None:
    sleeper = build(passes=2, split=split).eval()
    tokens, _, context = batch(total=14, context=12)
    new, logits, report = sleeper.generate(tokens, context, max_new_tokens=9)
    full = torch.cat([tokens, new], dim=1)
    with torch.no_grad():
        forced = sleeper(full, context).logits
    # the logits that chose token j sit at prompt position 13 + j
    torch.testing.assert_close(logits, forced[:, 1:1 + 9], rtol=1e-9, atol=1e-10)
    assert report.sleeps == sleeps and report.kv_peak_tokens <= L


def test_bad_sleep_sections(tmp_path: Path) -> None:
    cases = {
        "sleep.passes": ({"sleep.window": 4, "sleep.passes": 0}, "greater than 0"),
        "sleep.controller": ({"sleep.window": 4, "sleep.controller": "nap"}, "registered:"),
        "sleep.tol": ({"sleep.window": 4, "sleep.tol": 1}, "unknown key for sleep controller"),
        "sleep.layers": ({"sleep.window": 4, "sleep.layers": [2, 9]}, "within 0..4"),
        "sleep.rule": ({"sleep.window": 4, "sleep.rule": "hebb"}, "unknown rule"),
        "sleep.window": ({"sleep.window": 0}, "greater than 0"),
    }
    for path, (overrides, fragment) in cases.items():
        with pytest.raises(SpecError) as caught:
            load_spec(ROOT / "specs/tiny/mixed.yaml", overrides=overrides)
        assert caught.value.path == path and fragment in str(caught.value), str(caught.value)
    (tmp_path / "s.yaml").write_text((ROOT / "specs/tiny/attention.yaml").read_text()
                                     .replace("  window: 8\n", ""))
    with pytest.raises(SpecError, match="required field is missing") as caught:
        load_spec(tmp_path / "s.yaml")
    assert caught.value.path == "sleep.window"


def test_bench_decodes_across_window_boundaries_and_reports_the_stall() -> None:
    """By default the decode crosses four wake-window boundaries; the steps that slept are
    counted and their mean is the stall, which the slowest step bounds."""
    from archkit.bench import BOUNDARIES, measure

    sleeper = build(passes=3)
    tokens = torch.randint(0, 16, (1, 3 * L + 2), generator=torch.Generator().manual_seed(0))
    figures = measure(sleeper, tokens[:, :3 * L], tokens[:, 3 * L:])
    assert figures["settings"]["decode_tokens"] == BOUNDARIES * L + 1
    assert figures["decode_sleeps"] == BOUNDARIES
    assert figures["sleeps"] == 3 + BOUNDARIES  # the context's windows, then the stalls
    assert 0 < figures["wake_stall_ms"] <= figures["wake_ms_max"]
    short = measure(sleeper, tokens[:, :3 * L], tokens[:, 3 * L:], decode_tokens=L - 3)
    assert short["decode_sleeps"] == 0 and short["wake_stall_ms"] == 0.0

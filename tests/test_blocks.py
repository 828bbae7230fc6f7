"""Every block: one call == consecutive windows with the state carried == token by token."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archkit.blocks.common import FastWeightState, KVCache, map_state
from archkit.registry import BLOCKS

D_MODEL = 24
CASES = {
    "attention": {"n_heads": 3},
    "attention_gqa": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 10},
    "gated_delta": {"n_heads": 3, "expand_v": 1.5},
    "hebbian": {"n_heads": 2, "head_dim": 5},
    "hebbian_per_key": {"n_heads": 3, "decay": "per_key"},
    "jet": {"n_heads": 2, "head_dim": 6, "generator_ratio": 4},
    "mamba2": {"n_heads": 4, "state_size": 6},
    "mlp": {},
}


def make_block(case: str) -> Any:
    name = case.removesuffix("_gqa").removesuffix("_per_key")
    entry = BLOCKS.get(name)
    torch.manual_seed(0)
    block = entry.obj(D_MODEL, entry.config(**CASES[case])).double()
    with torch.no_grad():  # larger gates than at init, so decays and writes matter
        for param in block.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return block


def run_windows(block: Any, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, Any]:
    state, outputs, start = block.init_state(x.shape[0]), [], 0
    for size in sizes:
        y, state = block(x[:, start:start + size], state)
        outputs.append(y)
        start += size
    return torch.cat(outputs, dim=1), state


def assert_states_close(a: Any, b: Any) -> None:
    if a is None:
        assert b is None
        return
    flat_a, flat_b = [], []
    map_state(a, lambda t: flat_a.append(t) or t)
    map_state(b, lambda t: flat_b.append(t) or t)
    assert len(flat_a) == len(flat_b) > 0
    for ta, tb in zip(flat_a, flat_b, strict=True):
        torch.testing.assert_close(ta, tb, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_windows_and_steps_equal_one_call(case: str) -> None:
    block = make_block(case)
    x = torch.randn(2, 29, D_MODEL, dtype=torch.float64)
    whole, state_whole = block(x, block.init_state(2))
    windowed, state_windowed = run_windows(block, x, [11, 1, 9, 8])
    stepped, state_stepped = run_windows(block, x, [1] * 29)
    torch.testing.assert_close(windowed, whole, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(stepped, whole, rtol=1e-9, atol=1e-10)
    assert_states_close(state_windowed, state_whole)
    assert_states_close(state_stepped, state_whole)


@pytest.mark.parametrize("case", CASES)
def test_step_matches_forward_and_gradients_agree(case: str) -> None:
    block = make_block(case)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    whole, _ = block(x, block.init_state(2))
    state, outputs = block.init_state(2), []
    for t in range(x.shape[1]):
        y, state = block.step(x[:, t], state)
        outputs.append(y)
    stepped = torch.stack(outputs, dim=1)
    torch.testing.assert_close(stepped, whole, rtol=1e-9, atol=1e-10)

    weights = torch.randn_like(whole)
    grads_whole = torch.autograd.grad((whole * weights).sum(), list(block.parameters()))
    windowed, _ = run_windows(block, x, [3, 4])
    grads_windowed = torch.autograd.grad((windowed * weights).sum(), list(block.parameters()))
    for gw, gs in zip(grads_whole, grads_windowed, strict=True):
        torch.testing.assert_close(gs, gw, rtol=1e-8, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in grads_whole)


def test_attention_eviction() -> None:
    block = make_block("attention")
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    _, state = block(x, block.init_state(2))
    assert isinstance(state, KVCache) and state.tokens == 10 and state.pos == 10
    hard = block.evict(state, "hard")
    assert hard.tokens == 0 and hard.pos == 10
    sliding = block.evict(state, "sliding", keep=4)
    assert sliding.tokens == 4
    torch.testing.assert_close(sliding.k, state.k[:, :, -4:])
    # Relative positions: continuing after a hard eviction equals starting afresh.
    y_after, _ = block(x[:, :5], hard)
    y_fresh, _ = block(x[:, :5], block.init_state(2))
    torch.testing.assert_close(y_after, y_fresh, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["gated_delta", "hebbian", "mamba2", "jet"])
def test_fast_weights_persist_through_eviction(case: str) -> None:
    block = make_block(case)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    _, state = block(x, block.init_state(2))
    assert isinstance(state, FastWeightState)
    assert state.weights.abs().sum() > 0 and state.conv_tail.abs().sum() > 0
    hard = block.evict(state, "hard")
    assert torch.equal(hard.weights, state.weights)
    assert hard.conv_tail.abs().sum() == 0
    assert block.evict(state, "sliding") is state


def test_rule_can_be_swapped_with_the_same_projections() -> None:
    block = make_block("gated_delta")
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    y_delta, s_delta = block(x, block.init_state(1))
    block.rule = "hebbian"
    y_hebb, s_hebb = block(x, block.init_state(1))
    assert not torch.allclose(s_delta.weights, s_hebb.weights)
    assert not torch.allclose(y_delta, y_hebb)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_short_conv_is_the_depthwise_convolution_it_replaces(width: int) -> None:
    """ShortConv sums shifted views instead of calling nn.Conv1d (whose depthwise backward
    is slow on CPU): outputs, the carried tail and every gradient equal the convolution's,
    in float64, with a nonzero tail before the window."""
    from archkit.blocks.fast_weight import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, width).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(3, width - 1, 6, dtype=torch.float64, requires_grad=True)
    y, next_tail = conv(x, tail)
    padded = torch.cat([tail, x], dim=1)
    expected = F.silu(F.conv1d(padded.transpose(1, 2), conv.conv.weight, groups=6)
                      ).transpose(1, 2)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(next_tail, padded[:, 5:])
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, tail, conv.conv.weight), upstream)
    theirs = torch.autograd.grad(expected, (x, tail, conv.conv.weight), upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

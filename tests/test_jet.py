"""JetBlock against a per-token reference written here, windowed and stepped reading, its
state handling, and its life inside a sleeping model built from a spec."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from archkit.blocks.common import FastWeightState
from archkit.blocks.jet import Jet, JetConfig
from archkit.cli import main as cli_main
from archkit.kernels import RULE_NEEDS
from archkit.registry import BLOCKS, RULES
from archkit.sleep import SleepingModel
from archkit.spec import SpecError, parse_spec

D_MODEL = 24
CLOSE = {"rtol": 1e-9, "atol": 1e-10}


def make_jet(conv_size: int = 4, impl: str = "auto", **config: Any) -> Jet:
    torch.manual_seed(0)
    block = Jet(D_MODEL, JetConfig(n_heads=3, head_dim=4, expand_v=1.5, conv_size=conv_size,
                                   generator_ratio=6, impl=impl, **config)).double()
    with torch.no_grad():  # larger gates than at init, so decays and writes matter
        for param in block.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return block


def random_state(block: Jet, batch: int) -> FastWeightState:
    """A state as if earlier windows had been read: nonzero memory and conv tail."""
    zero = block.init_state(batch)
    return FastWeightState(torch.randn_like(zero.weights), torch.randn_like(zero.conv_tail))


def reference(block: Jet, x: Tensor, state: FastWeightState) -> tuple[Tensor, FastWeightState]:
    """The module docstring's Eqs. 1-7, one token at a time, from the block's parameters."""
    batch = x.shape[0]
    h, k_dim, v_dim, width = block.n_heads, block.key_dim, block.value_dim, block.conv.width
    w_q, w_k, w_v = block.qkv_proj.weight.split([h * k_dim, h * k_dim, h * v_dim])
    w_1, w_2, b_2 = (block.conv.generator[0].weight, block.conv.generator[2].weight,
                     block.conv.generator[2].bias)
    w_a, w_b = block.gate_logits.weight.chunk(2)
    history = list(state.conv_tail.unbind(1))  # raw values before the window, oldest first
    s, outputs = state.weights, []
    for x_t in x.unbind(1):
        q = F.normalize((x_t @ w_q.T).view(batch, h, k_dim), dim=-1)
        k = F.normalize((x_t @ w_k.T).view(batch, h, k_dim), dim=-1)
        history.append(x_t @ w_v.T)
        kernel = (F.silu(x_t @ w_1.T) @ w_2.T + b_2).view(batch, h, width)
        mixed = sum(kernel[:, :, j, None] * history[-1 - j].view(batch, h, v_dim)
                    for j in range(width))
        v = F.silu(mixed)
        beta = torch.sigmoid(x_t @ w_b.T)
        g = -block.A_log.exp() * F.softplus(x_t @ w_a.T + block.dt_bias)
        s = g.exp()[..., None, None] * s
        error = v - torch.einsum("bhk,bhkv->bhv", k, s)
        s = s + beta[..., None, None] * k[..., :, None] * error[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q, s) / math.sqrt(k_dim)
        z = (x_t @ block.gate_proj.weight.T).view(batch, h, v_dim)
        rms = torch.rsqrt(o.square().mean(-1, keepdim=True) + block.out_norm.eps)
        o = o * rms * block.out_norm.weight * F.silu(z)
        outputs.append(o.reshape(batch, h * v_dim) @ block.o_proj.weight.T)
    tail = torch.stack(history, dim=1)[:, len(history) - (width - 1):]
    return torch.stack(outputs, dim=1), FastWeightState(s, tail)


def run_windows(block: Jet, x: Tensor, sizes: list[int], state: FastWeightState
                ) -> tuple[Tensor, FastWeightState]:
    outputs, start = [], 0
    for size in sizes:
        y, state = block(x[:, start:start + size], state)
        outputs.append(y)
        start += size
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("conv_size", [1, 4])
def test_forward_and_gradients_equal_the_per_token_reference(impl: str, conv_size: int
                                                             ) -> None:
    block = make_jet(conv_size, impl)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64, requires_grad=True)
    start = random_state(block, 2)
    start.weights.requires_grad_(True)
    start.conv_tail.requires_grad_(True)
    y, state = block(x, start)
    y_ref, state_ref = reference(block, x, start)
    torch.testing.assert_close(y, y_ref, **CLOSE)
    torch.testing.assert_close(state.weights, state_ref.weights, **CLOSE)
    torch.testing.assert_close(state.conv_tail, state_ref.conv_tail, **CLOSE)

    r_y, r_s = torch.randn_like(y), torch.randn_like(state.weights)
    tail = {"initial tail": start.conv_tail} if conv_size > 1 else {}  # W = 1: no tail
    inputs = {"x": x, "initial weights": start.weights, **tail, **dict(block.named_parameters())}
    grads = torch.autograd.grad((y * r_y).sum() + (state.weights * r_s).sum(),
                                list(inputs.values()))
    grads_ref = torch.autograd.grad((y_ref * r_y).sum() + (state_ref.weights * r_s).sum(),
                                    list(inputs.values()))
    for name, got, want in zip(inputs, grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert got.abs().sum() > 0, name


@pytest.mark.parametrize("conv_size", [1, 4, 6])
def test_windows_and_steps_equal_one_call(conv_size: int) -> None:
    block = make_jet(conv_size)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    whole, state_whole = block(x, block.init_state(2))
    # W = 6 > the windows of 3, 5 and 1 tokens: the tail must carry across several windows
    windowed, state_windowed = run_windows(block, x, [3, 5, 1, 7], block.init_state(2))
    state, steps = block.init_state(2), []
    for x_t in x.unbind(1):
        y_t, state = block.step(x_t, state)
        steps.append(y_t)
    torch.testing.assert_close(windowed, whole, **CLOSE)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, **CLOSE)
    for other in (state_windowed, state):
        torch.testing.assert_close(other.weights, state_whole.weights, **CLOSE)
        torch.testing.assert_close(other.conv_tail, state_whole.conv_tail, **CLOSE)


def test_state_tail_eviction_and_rewind() -> None:
    block = make_jet(conv_size=4)
    start = block.init_state(2)
    assert start.conv_tail.shape == (2, 3, 3 * block.value_dim)
    assert start.weights.shape == (2, 3, 4, block.value_dim)
    assert start.conv_tail.abs().sum() == 0 and start.weights.abs().sum() == 0
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    _, state = block(x, start)
    values = (x @ block.qkv_proj.weight.T)[..., -3 * block.value_dim:]
    torch.testing.assert_close(state.conv_tail, values[:, -3:])  # the raw values, not v'
    hard = block.evict(state, "hard")
    assert torch.equal(hard.weights, state.weights) and hard.conv_tail.abs().sum() == 0
    assert block.evict(state, "sliding") is state
    rewound = block.rewind(start, state)
    assert rewound.weights is state.weights and rewound.conv_tail is start.conv_tail


def jet_spec(**sleep: Any) -> dict[str, Any]:
    return {
        "name": "tiny-jet",
        "model": {"vocab_size": 16, "d_model": 32, "n_heads": 2, "pattern": "AJJA",
                  "legend": {"A": "attention", "J": "jet"}, "mlp_ratio": 2.0,
                  "dtype": "float64", "blocks": {"jet": {"conv_size": 3}}},
        "sleep": {"window": 4, "passes": 2, **sleep},
    }


def test_runs_in_a_sleeping_model_built_from_a_spec() -> None:
    sleeper = SleepingModel.from_spec(parse_spec(jet_spec()))
    jets = [layer.mixer for layer in sleeper.model.layers if isinstance(layer.mixer, Jet)]
    assert len(jets) == 2 and jets[0].conv.width == 3
    tokens = torch.randint(0, 16, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, 11:] = True
    out = sleeper(tokens, 9, mask)
    assert out.report.passes[0] == 2 and torch.isfinite(out.loss)
    out.loss.backward()
    for jet in jets:
        for name, param in jet.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


def test_listed_by_archkit_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["blocks", "--json"])
    listing = json.loads(capsys.readouterr().out)
    jet = next(entry for entry in listing["block"] if entry["name"] == "jet")
    assert "Jet-Nemotron" in jet["description"]
    assert "generator_ratio" in jet["config"]["properties"]


def test_sleep_rules_it_can_and_cannot_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BLOCKS.get("jet").obj is Jet
    for rule in RULES.names():  # unit keys, sigmoid strength, scalar decay: every rule
        assert parse_spec(jet_spec(rule=rule)).sleep.rule == rule
    monkeypatch.setitem(RULE_NEEDS, "delta", RULE_NEEDS["delta"] | {"unbounded_keys"})
    with pytest.raises(SpecError, match=r"unbounded_keys.*layer 1, jet") as caught:
        parse_spec(jet_spec(rule="delta"))
    assert caught.value.path == "sleep.rule"


def test_generator_width_must_be_at_least_one() -> None:
    spec = jet_spec()
    spec["model"]["blocks"]["jet"]["generator_ratio"] = 33
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert caught.value.path.endswith("generator_ratio")

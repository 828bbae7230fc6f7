"""HybridModel end to end, the model card, and the CLI's build and blocks commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archkit.card import model_card
from archkit.cost import cost_plan
from archkit.model import HybridModel
from archkit.registry import BLOCKS, RULES
from archkit.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(dtype: str = "float64") -> HybridModel:
    spec = load_spec(ROOT / "specs/tiny/mixed.yaml", overrides={"model.dtype": dtype})
    torch.manual_seed(0)
    return HybridModel(spec.model)


def test_one_call_windows_and_steps_agree_end_to_end() -> None:
    model = tiny_model()
    tokens = torch.randint(0, model.spec.vocab_size, (2, 23))
    whole, state_whole = model(tokens)
    assert whole.shape == (2, 23, model.spec.vocab_size) and whole.dtype == torch.float64

    state, pieces = model.init_state(2), []
    for start, stop in [(0, 8), (8, 9), (9, 23)]:
        logits, state = model(tokens[:, start:stop], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-9, atol=1e-10)

    state, steps = model.init_state(2), []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, rtol=1e-9, atol=1e-10)
    for a, b in zip(state, state_whole, strict=True):
        if a is not None:
            torch.testing.assert_close(a.k if hasattr(a, "k") else a.weights,
                                       b.k if hasattr(b, "k") else b.weights)


def test_gradients_agree_between_one_call_and_windows() -> None:
    model = tiny_model()
    tokens = torch.randint(0, model.spec.vocab_size, (2, 12))
    whole, _ = model(tokens)
    state = model.init_state(2)
    first, state = model(tokens[:, :5], state)
    second, _ = model(tokens[:, 5:], state)
    params = [p for p in model.parameters() if p.requires_grad]
    g_whole = torch.autograd.grad(whole.square().mean(), params)
    g_split = torch.autograd.grad(torch.cat([first, second], 1).square().mean(), params)
    for a, b in zip(g_whole, g_split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_rewind_resets_local_context_of_the_given_layers_only() -> None:
    model = tiny_model()
    before = model.init_state(2)
    _, after = model(torch.randint(0, model.spec.vocab_size, (2, 7)), before)
    rewound = model.rewind(before, after, range(1, 4))
    assert rewound[0] is after[0] and rewound[4] is after[4]  # outside the range: as now
    assert rewound[1].weights is after[1].weights  # fast weights persist
    assert rewound[1].conv_tail is before[1].conv_tail  # the conv re-reads the window
    assert rewound[2].weights is after[2].weights and rewound[3].weights is after[3].weights
    attention = model.rewind(before, after, range(5))
    assert attention[0] is before[0] and attention[4] is before[4]  # KV rebuilt each pass


def test_tied_embeddings_share_one_tensor() -> None:
    model = tiny_model("float32")
    assert model.head.weight is model.embedding.weight
    untied = HybridModel(load_spec(ROOT / "specs/tiny/attention.yaml",
                                   overrides={"model.tie_embeddings": False}).model)
    assert untied.head.weight is not untied.embedding.weight


def test_model_card_counts() -> None:
    model = tiny_model("float32")
    card = model_card(model, window=24)
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert [layer["block"] for layer in card["layers"]] == [
        "attention", "gated_delta", "hebbian", "mamba2", "attention"]
    assert sum(layer["params"] for layer in card["layers"]) + card["embedding_params"] + 32 \
        == card["params"]  # + the final norm's weight
    # attention: d_model 32, 2 heads of 16 -> K and V of 32 floats per token; GQA 1 kv head.
    assert card["layers"][0]["kv_bytes_per_token"] == 2 * 2 * 16 * 4
    assert card["layers"][4]["kv_bytes_per_token"] == 2 * 1 * 16 * 4
    assert card["kv_bytes_window"] == card["kv_bytes_per_token"] * 24
    # gated_delta: 2 heads, K=8, V=16 -> 2*8*16 floats of fast weights + conv tail 3 x 64.
    assert card["layers"][1]["fast_weight_bytes"] == (2 * 8 * 16 + 3 * (8 + 8 + 16) * 2) * 4
    assert card["layers"][0]["fast_weight_bytes"] == 0


@pytest.mark.parametrize("tied", [True, False])
def test_an_uninitialised_model_has_the_same_card_and_cost_plan(tied: bool) -> None:
    """``archkit build`` skips initialising weights; what it reports must not change."""
    spec = load_spec(ROOT / "specs/depo_cpu.yaml", {"model.tie_embeddings": tied})
    initialised, uninitialised = HybridModel(spec.model), HybridModel.uninitialised(spec.model)
    assert (uninitialised.head.weight is uninitialised.embedding.weight) is tied
    assert all(p.device.type == "cpu" for p in uninitialised.parameters())
    cards = [{**model_card(m, 24, spec.sleep), "plan": cost_plan(m, spec)}
             for m in (initialised, uninitialised)]
    assert cards[0] == cards[1]
    mixed = load_spec(ROOT / "specs/tiny/mixed.yaml").model  # every block
    assert model_card(HybridModel(mixed), 24) == model_card(HybridModel.uninitialised(mixed), 24)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archkit.cli", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_build_json() -> None:
    result = run_cli("build", "specs/rule110.yaml", "--json", "--window", "24")
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)
    assert {"params", "layers", "fast_weight_bytes", "kv_bytes_per_token"} <= card.keys()
    assert [layer["block"] for layer in card["layers"]] == [
        "attention", "gated_delta", "attention", "gated_delta"]
    model = HybridModel(load_spec(ROOT / "specs/rule110.yaml").model)
    assert card["params"] == sum(p.numel() for p in model.parameters())


def test_cli_build_table_and_blocks_listing() -> None:
    table = run_cli("build", "specs/rule110.yaml")
    assert table.returncode == 0, table.stderr
    assert "gated_delta" in table.stdout and "parameters" in table.stdout
    listing = run_cli("blocks")
    assert listing.returncode == 0, listing.stderr
    for name in [*BLOCKS.names(), *RULES.names()]:
        assert name in listing.stdout
    assert "head_dim" in listing.stdout

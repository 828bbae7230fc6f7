"""Specs: shipped files load, broken ones fail with a SpecError naming the right field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from shipped import shipped

from archkit.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = shipped("*.yaml")

GOOD = """
name: t
model:
  vocab_size: 8
  d_model: 32
  n_heads: 2
  pattern: AG
  legend: {A: attention, G: gated_delta}
"""

# (the YAML, the field path the error must name, a fragment of the explanation)
BROKEN = [
    (GOOD + "  colour: red\n", "model.colour", "unknown key"),
    (GOOD + "  dmodel: 3\n", "model.dmodel", "Did you mean 'd_model'"),
    (GOOD.replace("vocab_size: 8", "vocab_size: eight"), "model.vocab_size", "integer"),
    (GOOD.replace("d_model: 32", "d_model: -32"), "model.d_model", "greater than 0"),
    (GOOD.replace("G: gated_delta", "G: gated_delt"), "model.legend.G", "registered:"),
    (GOOD.replace("pattern: AG", "pattern: AX"), "model.pattern", "'X' is not in model.legend"),
    (GOOD.replace("n_heads: 2", "n_heads: 3"), "model.n_heads", "must divide d_model=32"),
    (GOOD + "  blocks: {gated_delta: {head_dim: -4}}\n", "model.blocks.gated_delta.head_dim",
     "greater than 0"),
    (GOOD + "  blocks: {gated_delta: {head_dm: 4}}\n", "model.blocks.gated_delta.head_dm",
     "Did you mean 'head_dim'"),
    (GOOD + "  blocks: {gated_delta: {rule: nope}}\n", "model.blocks.gated_delta.rule",
     "unknown rule 'nope'"),
    (GOOD + "  blocks: {transformer: {}}\n", "model.blocks.transformer", "unknown block"),
    (GOOD + "  layers: [attention]\n", "model.pattern", "not both"),
    (GOOD.replace("name: t\n", ""), "name", "missing"),
    (GOOD + "  dtype: float8\n", "model.dtype", "float32"),
    ("extends: missing.yaml\n" + GOOD, "extends", "no such file"),
    ("extends: 3\n" + GOOD, "extends", "path to another YAML"),
    ("- a\n- b\n", "", "mapping"),
    ("model: [unclosed\n", "", "not valid YAML"),
]


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.model.resolved_layers


@pytest.mark.parametrize(("text", "field", "fragment"), BROKEN, ids=[b[1] or b[2]
                                                                      for b in BROKEN])
def test_broken_spec_names_the_field(tmp_path: Path, text: str, field: str, fragment: str
                                     ) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    err = caught.value
    assert err.path == field
    assert fragment in str(err)
    assert str(path) in str(err)


def test_per_layer_override_error_names_the_layer(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("  pattern: AG\n  legend: {A: attention, G: gated_delta}\n",
                                 "  layers: [attention, {block: hebbian, config: {decay: no}}]\n"))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.path == "model.layers[1].config.decay"


def test_circular_extends(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(SpecError, match="circular"):
        load_spec(tmp_path / "a.yaml")


def test_extends_merges_and_dotted_keys_override(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nmodel.d_model: 64\nmodel:\n  legend: {H: hebbian}\n"
        "  pattern: AHG\n"
    )
    spec = load_spec(tmp_path / "child.yaml", overrides={"model.n_heads": 4})
    assert (spec.name, spec.model.d_model, spec.model.n_heads) == ("child", 64, 4)
    assert [layer.block for layer in spec.model.resolved_layers] == [
        "attention", "hebbian", "gated_delta"]
    assert spec.model.vocab_size == 8


def test_pattern_and_list_validate_to_the_same_layers(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD)
    (tmp_path / "l.yaml").write_text(GOOD.replace(
        "  pattern: AG\n  legend: {A: attention, G: gated_delta}\n",
        "  layers: [attention, gated_delta]\n"))
    by_pattern = load_spec(tmp_path / "p.yaml").model.resolved_layers
    by_list = load_spec(tmp_path / "l.yaml").model.resolved_layers
    assert by_pattern == by_list
    assert by_pattern[1].config.n_heads == 2  # inherited from model.n_heads


def test_task_section_validates_through_the_task_config(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(GOOD + "task: {name: rule110, preset: paper}\n")
    spec = load_spec(path)
    assert (spec.task.config.width, spec.task.config.states) == (24, 4)
    for task, field, fragment in [
        ("{name: rule111}", "task.name", "Did you mean 'rule110'"),
        ("{name: rule110, widht: 8}", "task.widht", "unknown key for task 'rule110'"),
        ("{name: rule110, width: 0}", "task.width", "greater than 0"),
        ("{name: mqar, preset: paper}", "model.vocab_size", "at least the vocabulary"),
    ]:
        path.write_text(GOOD + f"task: {task}\n")
        with pytest.raises(SpecError) as caught:
            load_spec(path)
        assert caught.value.path == field and fragment in str(caught.value), str(caught.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archkit.cli", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_bad_spec_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("G: gated_delta", "G: gated_delt"))
    result = run_cli("build", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.legend.G" in result.stderr and str(path) in result.stderr
    assert "Did you mean 'gated_delta'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_override_exits_2() -> None:
    result = run_cli("build", "specs/rule110.yaml", "--set", "model.d_model=-1")
    assert result.returncode == 2
    assert "model.d_model" in result.stderr and "Traceback" not in result.stderr


def test_cli_tasks_show() -> None:
    result = run_cli("tasks", "show", "rule110", "-n", "2", "--set", "steps=4")
    assert result.returncode == 0, result.stderr
    assert "example 1 (steps = 4)" in result.stdout
    bad = run_cli("tasks", "show", "depo", "--set", "nodez=5")
    assert bad.returncode == 2 and "task.nodez" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(("spec", "overrides", "field", "missing"), [
    # the per-key Hebbian layer cannot feed the gated delta rule one decay per head
    ("mixed", {"sleep.rule": "gated_delta"}, "sleep.rule", "scalar_decay"),
    # Mamba-2's keys (B) are not unit vectors and its strength dt is not bounded by 1
    ("mamba2", {"sleep.rule": "delta"}, "sleep.rule", "unit_keys, write_at_most_one"),
    ("hebbian", {"model.blocks.hebbian.decay": "per_key",
                 "model.blocks.hebbian.rule": "gated_delta"},
     "model.blocks.hebbian.rule", "scalar_decay"),
])
def test_a_rule_a_block_cannot_feed_is_refused_when_the_spec_loads(
        spec: str, overrides: dict, field: str, missing: str) -> None:
    with pytest.raises(SpecError) as refused:
        load_spec(ROOT / f"specs/tiny/{spec}.yaml", overrides)
    assert refused.value.path == field and f"needs {missing}," in str(refused.value)


def test_every_rule_loads_where_its_block_feeds_it() -> None:
    for spec, rules in (("gated_delta", ["gated_delta", "delta", "hebbian"]),
                        ("hebbian", ["gated_delta", "delta", "hebbian"]),
                        ("mamba2", ["hebbian"]), ("mixed", ["hebbian"])):
        for rule in rules:
            assert load_spec(ROOT / f"specs/tiny/{spec}.yaml", {"sleep.rule": rule})


def test_cli_refuses_an_incompatible_sleep_rule_in_one_line() -> None:
    result = run_cli("build", "specs/tiny/mixed.yaml", "--set", "sleep.rule=gated_delta")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sleep.rule" in result.stderr and "layer 2, hebbian" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

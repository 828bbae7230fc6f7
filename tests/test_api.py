"""The Python front door does what the README's CLI does, with the same numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_metrics import assert_tags, assert_vocabulary, cli, scalar_tags
from test_search import FEW_STEPS
from test_train import ROOT, TINY

import archkit
from archkit.spec import SpecError
from archkit.tasks import get_task

SPEC = ROOT / "specs/rule110_cpu.yaml"
OVERRIDES = {**{k: v for k, v in TINY.items() if k != "name"}, "train.threads": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same spec trained by the CLI (``runs/cli``) and from Python (``runs/py``)."""
    folder = tmp_path_factory.mktemp("runs")
    done = cli("train", str(SPEC), "--runs", str(folder), "--name", "cli", "--no-progress",
               *(f"--set={k}={v}" for k, v in OVERRIDES.items()))
    assert done.returncode == 0, done.stderr
    archkit.train(SPEC, OVERRIDES, name="py", runs=folder, progress=False)
    return folder


def test_train_in_python_equals_train_on_the_command_line(runs: Path) -> None:
    cli_run, py_run = archkit.load_run(runs / "cli"), archkit.load_run(runs / "py")
    assert py_run.final == cli_run.final is not None
    assert cli_run.final == json.loads((runs / "cli/final.json").read_text())
    for a, b in zip(cli_run.model.parameters(), py_run.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_run_round_trip_matches_cli_eval_exactly(runs: Path) -> None:
    run = archkit.load_run(runs / "cli")
    assert not run.model.training and run.task.vocab_size <= run.spec.model.vocab_size
    assert run.spec.train is not None and run.spec.train.steps == TINY["train.steps"]
    assert archkit.evaluate(run) == run.final
    for passes in (2, 3):
        shown = cli("eval", str(runs / "cli"), "--passes", str(passes), "--json")
        assert shown.returncode == 0, shown.stderr
        assert archkit.evaluate(run, passes=passes) == json.loads(shown.stdout)
    other_seed = cli("eval", str(runs / "cli"), "--seed", "5", "--json")
    assert archkit.evaluate(run, seed=5) == json.loads(other_seed.stdout)
    assert run.spec.sleep is not None and run.spec.sleep.passes == 1  # not changed by passes=


def test_build_and_evaluate_a_bare_model() -> None:
    spec = archkit.load_spec(SPEC, OVERRIDES)
    model = archkit.build(spec)
    same = archkit.build(SPEC, OVERRIDES)
    for a, b in zip(model.parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded from spec.seed, whichever way it was given
    task = get_task("rule110", width=6, states=2)
    metrics = archkit.evaluate(model, task, eval_size=24)
    assert_vocabulary(metrics, "archkit.evaluate")
    assert 0 <= metrics["exact"] <= 1 and metrics["loss"] > 0
    with pytest.raises(SpecError, match="task"):
        archkit.evaluate(model)


def test_load_run_errors_are_one_line(tmp_path: Path, runs: Path) -> None:
    with pytest.raises(SpecError, match="no checkpoint"):
        archkit.load_run(tmp_path / "nothing")
    broken = tmp_path / "broken"
    (broken / "checkpoint").mkdir(parents=True)
    (broken / "checkpoint/spec.yaml").write_text((runs / "cli/checkpoint/spec.yaml").read_text())
    (broken / "checkpoint/model.safetensors").write_bytes(b"not safetensors")
    done = cli("eval", str(broken))
    assert done.returncode == 2 and "cannot load the weights" in done.stderr
    (broken / "checkpoint/model.safetensors").unlink()
    done = cli("eval", str(broken))
    assert done.returncode == 2 and "is missing" in done.stderr


def test_search_in_python_returns_the_trials_the_cli_reports(tmp_path: Path) -> None:
    space = {"extends": str(SPEC), "set": FEW_STEPS, "budget": {"trials": 2, "steps": 2},
             "sampler": "grid", "threads": 1, "bench": {"repeats": 2, "decode": 2},
             "params": {"sleep.passes": {"choices": [1, 2]}},
             "columns": ["flops_per_token", "wake_ms_p99"]}
    path = tmp_path / "py_search.yaml"
    path.write_text(yaml.safe_dump(space))
    trials = archkit.search(path, runs=tmp_path / "runs", progress=False)
    assert sorted(trials["params.sleep.passes"]) == [1, 2]
    assert set(trials["state"]) == {"complete"} and trials["on_front"].any()
    root = tmp_path / "runs/py_search"
    shown = cli("pareto", str(root))
    assert shown.returncode == 0, shown.stderr
    with open(root / "pareto.csv") as f:
        rows = {row["trial"]: row for row in csv.DictReader(f)}
    header = list(next(iter(rows.values())))
    assert header[-4:] == ["exact", "wake_ms_per_token", "flops_per_token", "wake_ms_p99"]
    for trial in trials.itertuples():
        row = rows[trial.trial]
        assert float(row["exact"]) == trial.exact
        assert float(row["flops_per_token"]) == trial.flops_per_token
        assert (row["on_front"] == "True") == trial.on_front
    for result in root.glob("trials/*/result.json"):
        assert_vocabulary(json.loads(result.read_text())["metrics"], "result.json")
        tags = scalar_tags(result.parent)
        assert_tags(tags, "a trial's run")
        assert {"trials/exact", "trials/flops_per_token", "trials/on_front"} <= set(tags)


def test_building_in_python_refuses_a_model_that_cannot_fit_in_memory() -> None:
    with pytest.raises(SpecError, match="fits in memory") as refused:
        archkit.build(SPEC, {"model.vocab_size": 99_999_999_999})
    assert refused.value.path == "model.vocab_size"


def test_an_error_about_a_whole_file_names_the_file_and_no_field() -> None:
    assert str(SpecError("", "not valid YAML", file="a.yaml")) == "a.yaml: not valid YAML"
    assert str(SpecError("", "a mapping", "list", file="a.yaml")) == \
        "a.yaml: (got 'list'): a mapping"
    assert str(SpecError("model.d_model", "a multiple of 2", 3)) == \
        "model.d_model (got 3): a multiple of 2"

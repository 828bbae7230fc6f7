"""Trainer, evaluation and bench on a tiny task: real runs of a few steps each."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from shipped import shipped
from torch import nn

from archkit.card import parameter_floor
from archkit.checkpoint import load_run, load_trainer_state
from archkit.evaluation import evaluate_run
from archkit.model import HybridModel
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, StopRule, load_spec
from archkit.trainer import TrainingDiverged, make_optimizers, split_parameters, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny", "model.d_model": 32, "model.blocks.gated_delta.head_dim": 16,
    "task.width": 6, "task.states": 2, "sleep.window": 6,
    "train.steps": 12, "train.batch_size": 16, "train.warmup_steps": 2,
    "train.eval_every": 6, "train.eval_size": 48, "train.checkpoint_every": 4,
    "train.log_every": 1, "train.lr": 1e-2, "train.adamw_lr": 1e-2,
}


def tiny_spec(**overrides: object) -> Spec:
    return load_spec(ROOT / "specs/rule110_cpu.yaml", {**TINY, **overrides})


def test_a_few_steps_lower_the_loss_and_repeat_exactly(tmp_path: Path) -> None:
    spec = tiny_spec(**{"train.steps": 30, "train.eval_every": 30})
    first = train(spec, tmp_path / "a", progress=False)
    second = train(spec, tmp_path / "b", progress=False)
    losses = list(first.losses.values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert first.losses == second.losses
    assert first.final is not None and 0 <= first.final.score.overall.exact <= 1


def interrupted_and_resumed(spec: Spec, run_dir: Path, cut_after: int) -> dict[int, float]:
    """Train ``spec`` with a Ctrl-C after step ``cut_after``, resume it, and return the
    losses of both parts."""
    def interrupt(step: int, loss: float, sleeper: SleepingModel) -> None:
        if step == cut_after:
            raise KeyboardInterrupt

    cut = train(spec, run_dir, progress=False, on_step=interrupt)
    assert cut.interrupted and max(cut.losses) == cut_after
    rest = train(spec, run_dir, resume=True, progress=False)
    assert min(rest.losses) == cut_after + 1
    return {**cut.losses, **rest.losses}


def test_resume_after_interruption_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    spec = tiny_spec()
    whole = train(spec, tmp_path / "whole", progress=False)
    # after a checkpoint at 4: the interruption itself must save step 7
    assert interrupted_and_resumed(spec, tmp_path / "cut", 6) == whole.losses
    records = [json.loads(line) for line in (tmp_path / "cut/metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 13))


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path: Path) -> None:
    spec = tiny_spec(**{"train.steps": 2})
    train(spec, tmp_path / "r", progress=False)
    with pytest.raises(SpecError, match="--resume"):
        train(spec, tmp_path / "r", progress=False)
    with pytest.raises(SpecError, match="nothing to resume"):
        train(spec, tmp_path / "other", resume=True, progress=False)


def test_muon_gets_exactly_the_hidden_matrices() -> None:
    sleeper = SleepingModel.from_spec(tiny_spec())
    hidden, others = split_parameters(sleeper)
    linear_weights = {id(m.weight) for name, m in sleeper.model.layers.named_modules()
                      if isinstance(m, nn.Linear)}
    assert {id(p) for p in hidden} == linear_weights
    assert all(p.dim() == 2 for p in hidden)
    embedding = sleeper.model.embedding.weight
    assert any(p is embedding for p in others) and all(p is not embedding for p in hidden)
    assert len(hidden) + len(others) == len(list(sleeper.parameters()))
    optimizers = make_optimizers(sleeper, tiny_spec().train)
    assert list(optimizers) == ["muon", "adamw"]
    assert isinstance(optimizers["muon"], torch.optim.Muon)
    assert isinstance(optimizers["adamw"], torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizers["muon"].param_groups) == len(hidden)
    only = make_optimizers(sleeper, tiny_spec(**{"train.optimizer": "adamw"}).train)
    assert list(only) == ["adamw"] and isinstance(only["adamw"], torch.optim.AdamW)


def test_eval_of_the_checkpoint_equals_the_final_evaluation(tmp_path: Path) -> None:
    result = train(tiny_spec(), tmp_path / "r", progress=False)
    again = evaluate_run(load_run(tmp_path / "r"))
    assert again == result.final
    final = json.loads((tmp_path / "r/final.json").read_text())
    assert final == again.metrics()
    assert {"baseline", *(f"baseline/{d}" for d in result.final.score.by_difficulty)} <= set(final)
    longer = evaluate_run(load_run(tmp_path / "r", {"sleep.passes": 3}))
    assert longer.score.overall.examples == again.score.overall.examples


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    def poison(step: int, loss: float, sleeper: SleepingModel) -> None:
        if step == 5:  # after the step-4 checkpoint
            with torch.no_grad():
                sleeper.model.embedding.weight.fill_(math.nan)

    with pytest.raises(TrainingDiverged, match="diverged at step 6"):
        train(tiny_spec(), tmp_path / "r", progress=False, on_step=poison)
    record = json.loads((tmp_path / "r/diverged.json").read_text())
    assert record["step"] == 6 and record["last_checkpoint"] == 4
    assert math.isfinite(evaluate_run(load_run(tmp_path / "r")).loss)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archkit.cli", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_train_eval_and_bench(tmp_path: Path) -> None:
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "name"]
    trained = run_cli("train", str(ROOT / "specs/rule110_cpu.yaml"), "--runs", str(tmp_path),
                      "--name", "cli", "--no-progress", *sets)
    assert trained.returncode == 0, trained.stderr
    assert "final evaluation" in trained.stdout
    evaluated = run_cli("eval", str(tmp_path / "cli"), "--passes", "2", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0 <= json.loads(evaluated.stdout)["exact"] <= 1
    bench = run_cli("bench", str(tmp_path / "cli"), "--json", "--decode", "4")
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout)
    for key in ("wake_ms_per_token", "sleep_ms_per_window", "kv_peak_bytes",
                "fast_weight_bytes", "params"):
        assert figures[key] > 0, key
    missing = run_cli("eval", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


def test_training_stops_at_the_first_evaluation_that_reaches_target_exact(
        tmp_path: Path) -> None:
    result = train(tiny_spec(**{"train.target_exact": 1e-9}), tmp_path / "r", progress=False)
    assert max(result.losses) == TINY["train.eval_every"] - 1  # steps 0..5, then stopped
    assert result.final is not None
    assert load_run(tmp_path / "r").final == result.final.metrics()
    assert load_trainer_state(tmp_path / "r")["step"] == 6


def test_the_stopping_rule_sees_a_plateau_in_either_direction() -> None:
    exact = StopRule(metric="exact", plateau_evals=2, min_delta=0.01)
    assert exact.improved([0.1, 0.2])  # too few evaluations to judge
    assert exact.improved([0.1, 0.2, 0.2, 0.3])
    assert not exact.improved([0.1, 0.5, 0.505, 0.3])  # +0.005 is not more than min_delta
    loss = StopRule(metric="loss", plateau_evals=1)
    assert loss.improved([2.0, 1.0]) and not loss.improved([2.0, 1.0, 1.0])
    with pytest.raises(SpecError, match="evaluation records"):
        StopRule(metric="wake_ms_per_token")
    with pytest.raises(SpecError, match="exact"):
        StopRule(metric="exakt")


def test_training_stops_on_a_plateau_and_resumes_with_its_history(tmp_path: Path) -> None:
    """min_delta 1 cannot be beaten, so the run stops at the first evaluation after
    plateau_evals more than the first: step 3 x eval_every of a 40-step cap."""
    every = TINY["train.eval_every"]
    rule = {"train.until": {"metric": "exact", "plateau_evals": 2, "min_delta": 1.0},
            "train.steps": 40, "train.checkpoint_every": every}
    result = train(tiny_spec(**rule), tmp_path / "r", progress=False)
    assert len(result.losses) == 3 * every and result.final is not None
    assert load_trainer_state(tmp_path / "r")["step"] == 3 * every

    def stop_after_the_first_evaluation(step: int, loss: float, model: SleepingModel) -> None:
        if step == every:  # step index every: the evaluation at step `every` has run
            raise KeyboardInterrupt

    half = train(tiny_spec(**rule), tmp_path / "h", progress=False,
                 on_step=stop_after_the_first_evaluation)
    assert half.interrupted
    resumed = train(tiny_spec(**rule), tmp_path / "h", resume=True, progress=False)
    # the evaluation before the interruption counts: stopped at the same step
    assert load_trainer_state(tmp_path / "h")["step"] == 3 * every
    assert resumed.final is not None


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, as in a terminal (a Ray runtime started earlier in this
    process leaves its handler installed)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_at_the_end_of_the_step_and_twice_stops_at_once(
        tmp_path: Path, terminal_sigint: None) -> None:
    presses = {2: 1, 5: 2}  # step index -> SIGINTs this process sends itself after it

    def press(step: int, loss: float, sleeper: SleepingModel) -> None:
        for _ in range(presses.get(step, 0)):
            os.kill(os.getpid(), signal.SIGINT)

    once = train(tiny_spec(), tmp_path / "once", progress=False, on_step=press)
    assert once.interrupted and max(once.losses) == 2
    assert load_trainer_state(tmp_path / "once")["step"] == 3  # the step finished and saved
    resumed = train(tiny_spec(), tmp_path / "once", resume=True, progress=False,
                    on_step=press)
    assert resumed.interrupted and max(resumed.losses) == 5
    assert load_trainer_state(tmp_path / "once")["step"] == 4  # the last periodic one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_refuses_any_change_but_a_larger_train_steps(tmp_path: Path) -> None:
    train(tiny_spec(**{"train.steps": 4}), tmp_path / "r", progress=False)
    for changed, named in ((tiny_spec(**{"train.steps": 4, "sleep.passes": 2}),
                            "sleep.passes 1 -> 2"),
                           (tiny_spec(**{"train.steps": 3}), "train.steps 4 -> 3")):
        with pytest.raises(SpecError, match=named):
            train(changed, tmp_path / "r", resume=True, progress=False)
    again = train(tiny_spec(**{"train.steps": 4}), tmp_path / "r", resume=True, progress=False)
    assert again.already_finished and again.losses == {}
    assert again.final is not None
    assert again.final.metrics() == json.loads((tmp_path / "r/final.json").read_text())


@pytest.mark.parametrize("path", shipped("*.yaml"))
def test_the_parameter_floor_is_the_model_without_its_mixers(path: Path) -> None:
    spec = load_spec(path)
    with torch.device("meta"):  # shapes only: a retrofit spec holds billions of parameters
        model = HybridModel(spec.model)
    mixers = sum(p.numel() for layer in model.layers for p in layer.mixer.parameters())
    vocabulary, rest = parameter_floor(spec.model)
    assert vocabulary + rest == sum(p.numel() for p in model.parameters()) - mixers
    assert vocabulary == model.embedding.weight.numel() * (1 if spec.model.tie_embeddings
                                                            else 2)


def test_resume_may_change_where_a_run_computes_but_nothing_else(tmp_path: Path) -> None:
    spec = tiny_spec(**{"train.threads": 2})
    train(spec, tmp_path / "r", progress=False)
    final = (tmp_path / "r/final.json").read_text()
    again = train(tiny_spec(**{"train.threads": 1}), tmp_path / "r", resume=True,
                  progress=False)
    assert again.already_finished and (tmp_path / "r/final.json").read_text() == final
    assert not (tmp_path / "r/superseded").exists()  # not an extension
    with pytest.raises(SpecError, match=r"sleep\.passes 1 -> 2"):
        train(tiny_spec(**{"train.threads": 1, "sleep.passes": 2}), tmp_path / "r",
              resume=True, progress=False)


def test_a_run_saved_before_a_field_existed_keeps_training_as_it_did(tmp_path: Path) -> None:
    """Checkpoints written before ``sleep.split`` and Depo's ``hops_per`` existed load with
    the values those runs trained at, not the new defaults."""
    depo = load_spec(ROOT / "specs/depo_cpu.yaml", {
        "train.steps": 2, "train.batch_size": 4, "train.eval_size": 8, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.warmup_steps": 1, "train.baseline_examples": 8})
    train(depo, tmp_path / "old", progress=False, final_table=False)
    saved = tmp_path / "old/checkpoint/spec.yaml"
    tree = yaml.safe_load(saved.read_text())
    del tree["sleep"]["split"], tree["task"]["hops_per"]
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    run = load_run(tmp_path / "old")
    assert (run.spec.sleep.split, run.spec.task.config.hops_per) == ("context", "example")
    fresh = load_spec(ROOT / "specs/rule110_cpu.yaml")
    assert fresh.sleep is not None and fresh.sleep.split == "sequence"

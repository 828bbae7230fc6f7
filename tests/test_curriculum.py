"""Training curriculum: stages of task settings before the task itself (``train.curriculum``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import ROOT, TINY, interrupted_and_resumed

from archkit.spec import Spec, SpecError, load_spec
from archkit.tasks import Task, TaskBatch
from archkit.trainer import curriculum, require, train

# The task draws t in 1..3; the first 6 steps only t in 1..2, as a stage.
STAGED = {**TINY, "train.curriculum": [{"steps": 6, "task": {"steps": [1, 2]}}]}


def rule110_spec(**overrides: object) -> Spec:
    return load_spec(ROOT / "specs/rule110_cpu.yaml", {**STAGED, **overrides})


def spec_error(file: str, **overrides: object) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load_spec(ROOT / file, overrides)
    return caught.value


def test_training_batches_come_from_the_stage_then_from_the_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: dict[int, set[int]] = {}
    original = Task.train_batch

    def spy(self: Task, step: int, n: int, seed: int = 0) -> TaskBatch:
        batch = original(self, step, n, seed)
        drawn[step] = set(batch.difficulty.tolist())
        return batch

    monkeypatch.setattr(Task, "train_batch", spy)
    result = train(rule110_spec(), tmp_path / "r", progress=False)
    assert sorted(drawn) == list(range(12))
    assert set().union(*(drawn[s] for s in range(6))) == {1, 2}
    assert set().union(*(drawn[s] for s in range(6, 12))) == {1, 2, 3}
    assert result.final is not None and set(result.final.score.by_difficulty) == {1, 2, 3}
    records = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").open()]
    stages = [r["curriculum_stage"] for r in records if r["kind"] == "train"]
    assert stages == [0] * 6 + [1] * 6  # records count finished steps: 6 ends stage 0


def test_stage_tasks_carry_the_overrides_over_the_task_settings() -> None:
    spec = rule110_spec(**{"train.curriculum": [
        {"steps": 3, "task": {"steps": [1, 2]}}, {"steps": 4, "task": {"width": 8}}]})
    _, task = require(spec)
    ends, tasks = curriculum(spec, task)
    assert ends == [3, 7] and len(tasks) == 3 and tasks[-1] is task
    settings = [t.config.model_dump() for t in tasks]
    assert [(s["steps"], s["width"], s["states"]) for s in settings] == [
        ((1, 2), 6, 2), ((1, 3), 8, 2), ((1, 3), 6, 2)]
    plain = load_spec(ROOT / "specs/rule110_cpu.yaml", TINY)
    assert curriculum(plain, task) == ([], [task])


def test_resume_across_a_stage_boundary_reproduces_the_uninterrupted_losses(
        tmp_path: Path) -> None:
    spec = rule110_spec()
    whole = train(spec, tmp_path / "whole", progress=False)
    unstaged = train(load_spec(ROOT / "specs/rule110_cpu.yaml", TINY), tmp_path / "plain",
                     progress=False)
    assert unstaged.losses[0] != whole.losses[0]

    # cut in stage 0 (step 5 saved); the resumed run crosses into the task
    assert interrupted_and_resumed(spec, tmp_path / "cut", 4) == whole.losses


@pytest.mark.parametrize(("stage_task", "path"), [
    ({"steps": [3, 1]}, "train.curriculum[0].task.steps"),
    ({"width": 0}, "train.curriculum[0].task.width"),
    ({"stpes": 2}, "train.curriculum[0].task.stpes"),
    ({"name": "mqar"}, "train.curriculum[0].task.name"),
])
def test_a_bad_stage_override_names_its_field(stage_task: dict[str, object], path: str) -> None:
    error = spec_error("specs/rule110_cpu.yaml",
                       **{"train.curriculum": [{"steps": 10, "task": stage_task}]})
    assert error.path == path


def test_stages_need_steps_a_task_and_at_most_train_steps() -> None:
    error = spec_error("specs/rule110_cpu.yaml", **{"train.steps": 100, "train.curriculum": [
        {"steps": 60, "task": {}}, {"steps": 41, "task": {}}]})
    assert error.path == "train.curriculum" and error.value == 101
    assert "100" in error.expected
    error = spec_error("specs/rule110_cpu.yaml", **{"train.curriculum": [{"steps": 0, "task": {}}]})
    assert error.path == "train.curriculum[0].steps"
    error = spec_error("specs/rule110_cpu.yaml", **{"train.curriculum": [{"steps": 5}]})
    assert error.path == "train.curriculum[0].task"


def test_a_stage_may_not_give_a_token_another_id() -> None:
    # One step only: the query token "?" would take the id of "t1".
    error = spec_error("specs/rule110_cpu.yaml",
                       **{"train.curriculum": [{"steps": 5, "task": {"steps": 1}}]})
    assert error.path == "train.curriculum[0].task" and "'?'" in error.expected
    gsm = {"model.vocab_size": 122, "task.names": 100, "task.ops": [1, 4],
           "task.context_tokens": [128, 160], "task.rendering": "symbolic"}
    error = spec_error("specs/gsm_cpu.yaml", **gsm, **{"train.curriculum": [
        {"steps": 5, "task": {"rendering": "story"}}]})
    assert error.path == "train.curriculum[0].task"
    fewer_names = load_spec(ROOT / "specs/gsm_cpu.yaml", {**gsm, "train.curriculum": [
        {"steps": 5, "task": {"names": 40, "context_tokens": [80, 96]}}]})
    assert fewer_names.curriculum_tasks[0].config.model_dump()["names"] == 40
    error = spec_error("specs/gsm_cpu.yaml", **gsm, **{"train.curriculum": [
        {"steps": 5, "task": {"names": 101}}]})
    assert error.path == "model.vocab_size" and "stage 0" in error.expected

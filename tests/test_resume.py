"""Resume is exact or refused, and every user mistake is one line and exit 2: real
``archkit`` processes on a tiny spec, interrupted with a real SIGINT."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from test_train import ROOT, TINY, tiny_spec

from archkit.sleep import SleepingModel
from archkit.trainer import train

SPEC = ROOT / "specs/rule110_cpu.yaml"
# An evaluation after every step, so that the step a run is stopped at has one.
RUN = {**{k: v for k, v in TINY.items() if k != "name"}, "train.steps": 20,
       "train.eval_every": 1, "train.eval_size": 16, "train.checkpoint_every": 2}
SETS = [f"--set={k}={v}" for k, v in RUN.items()]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "archkit.cli", *args]


def archkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=cwd)


def all_at_once(runs: dict[str, list[str]], cwd: Path
                ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several ``archkit`` commands side by side (each waits mostly on its imports)."""
    started = {name: subprocess.Popen(command(*args), cwd=cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in runs.items()}
    return {name: subprocess.CompletedProcess(p.args, p.wait(), *p.communicate())
            for name, p in started.items()}


def assert_one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archkit: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    """Training losses by step index from 0, as ``TrainResult.losses`` has them."""
    return {r["step"] - 1: r["loss"] for r in records(run_dir, "train")}


def hparams_sessions(run_dir: Path) -> int:
    """HParams sessions in the event files TensorBoard reads under ``run_dir``."""
    return sum(value.tag == "_hparams_/session_start_info"
               for path in run_dir.rglob("*tfevents*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file()}


@dataclass
class CutRun:
    folder: Path  # the working directory of every command
    run_dir: Path
    interrupted: subprocess.CompletedProcess[str]
    hint: str
    resumed: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory: pytest.TempPathFactory) -> CutRun:
    """``archkit train`` stopped by SIGINT after its first checkpoint, then resumed by
    running the command it printed, verbatim, from the same directory."""
    folder = tmp_path_factory.mktemp("resume")
    run_dir = folder / "elsewhere/cut"
    start = subprocess.Popen(command("train", str(SPEC), "--name", "cut", "--runs", "elsewhere",
                                     "--no-progress", *SETS),
                             cwd=folder, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    while not (run_dir / "checkpoint").exists():
        assert start.poll() is None, start.communicate()
        time.sleep(0.02)
    start.send_signal(signal.SIGINT)
    interrupted = subprocess.CompletedProcess(start.args, start.wait(), *start.communicate())
    assert interrupted.returncode == 130, interrupted.stderr
    hint = interrupted.stderr.split("Continue with: ", 1)[1].strip()
    printed = shlex.split(hint)
    assert printed[0] == "archkit"
    resumed = archkit(*printed[1:], cwd=folder)
    return CutRun(folder, run_dir, interrupted, hint, resumed)


def test_the_ctrl_c_hint_resumes_to_the_losses_of_an_uninterrupted_run(
        cut_run: CutRun, tmp_path: Path) -> None:
    assert "--runs elsewhere" in cut_run.hint
    assert cut_run.resumed.returncode == 0, cut_run.resumed.stderr
    commands = [json.loads(line) for line in (cut_run.run_dir / "commands.jsonl").open()]
    cut_at = commands[1]["from_step"]
    assert 2 <= cut_at < RUN["train.steps"]  # stopped after a checkpoint, before the end
    assert commands[1]["argv"][1:] == shlex.split(cut_run.hint)[1:]
    whole = train(tiny_spec(**RUN), tmp_path / "whole", progress=False)
    assert losses(cut_run.run_dir) == whole.losses


def test_tensorboard_keeps_every_point_of_the_step_the_run_resumed_from(
        cut_run: CutRun) -> None:
    cut_at = json.loads((cut_run.run_dir / "commands.jsonl").read_text().splitlines()[1]
                        )["from_step"]
    events = EventAccumulator(str(cut_run.run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for kind, tag in (("train", "train/loss"), ("eval", "eval/exact")):
        logged = {r["step"]: r[tag.split("/", 1)[1]] for r in records(cut_run.run_dir, kind)}
        shown = {e.step: e.value for e in events.Scalars(tag)}
        assert cut_at in shown and list(shown) == list(logged) == list(range(1, 21)), tag
        assert shown == pytest.approx(logged)
    assert hparams_sessions(cut_run.run_dir) == 1


def test_resuming_a_finished_run_changes_nothing(cut_run: CutRun) -> None:
    before = snapshot(cut_run.run_dir)
    again = archkit(*shlex.split(cut_run.hint)[1:], cwd=cut_run.folder)
    assert again.returncode == 0, again.stderr
    assert "has finished" in again.stdout and "nothing to do" in again.stdout
    assert snapshot(cut_run.run_dir) == before
    assert hparams_sessions(cut_run.run_dir) == 1


def test_resume_refuses_a_changed_spec_naming_the_changed_fields(cut_run: CutRun) -> None:
    before = snapshot(cut_run.run_dir)
    resume = ["--resume", "--name", "cut", "--runs", "elsewhere"]
    done = all_at_once({
        "passes": ["train", str(SPEC), *resume, *SETS, "--set=sleep.passes=2",
                   "--set=train.lr=0.02"],
        "shorter": ["train", *resume, "--set=train.steps=10"],
    }, cut_run.folder)
    assert_one_error_line(done["passes"], "sleep.passes 1 -> 2", "train.lr 0.01 -> 0.02")
    assert "train.steps 20" not in done["passes"].stderr  # an unchanged field is not named
    assert_one_error_line(done["shorter"], "train.steps 20 -> 10")
    assert snapshot(cut_run.run_dir) == before


def test_a_larger_train_steps_extends_the_run_at_the_schedules_last_rate(
        cut_run: CutRun, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs/cut"
    shutil.copytree(cut_run.run_dir, run_dir)
    first_final = (run_dir / "final.json").read_text()
    extended = archkit("train", "--resume", "--name", "cut", "--no-progress",
                       "--set=train.steps=26", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr

    # The schedule stays the one laid out over the 20 steps the run started with: a run
    # interrupted at step 5 and resumed with train.steps=26 trains exactly the same.
    def interrupt(step: int, loss: float, sleeper: SleepingModel) -> None:
        if step == 4:
            raise KeyboardInterrupt

    assert train(tiny_spec(**RUN), tmp_path / "early", progress=False,
                 on_step=interrupt).interrupted
    late = train(tiny_spec(**{**RUN, "train.steps": 26}), tmp_path / "early", resume=True,
                 progress=False)
    assert losses(run_dir) == losses(tmp_path / "early") and max(late.losses) == 25
    last_rate = RUN["train.lr"] * tiny_spec().train.min_lr_ratio
    rates = {r["step"]: r["lr/muon"] for r in records(run_dir, "train")}
    assert [rates[s] for s in range(20, 27)] == pytest.approx([last_rate] * 7)
    assert rates[19] > last_rate

    assert (run_dir / "superseded/step_20/final.json").read_text() == first_final
    assert json.loads((run_dir / "final.json").read_text()) == json.loads(
        (tmp_path / "early/final.json").read_text())
    assert hparams_sessions(run_dir) == 1
    assert torch.load(run_dir / "checkpoint/trainer.pt", weights_only=True)["step"] == 26


def test_every_user_mistake_is_one_line_and_exit_2(cut_run: CutRun, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    run = str(cut_run.run_dir)
    huge = "--set=model.vocab_size=99999999999"
    mistakes = {
        "runs is a file": ["train", str(SPEC), "--runs", "a_file", *SETS],
        "eval a wider model": ["eval", run, "--set=model.d_model=64", "--set=sleep.passes=2"],
        "train huge": ["train", str(SPEC), "--runs", "runs", huge],
        "eval huge": ["eval", run, huge],
        "bench huge": ["bench", str(SPEC), huge],
        "build huge": ["build", str(SPEC), huge],
        "background over a run": ["train", str(SPEC), "--name", "cut", "--runs",
                                  str(cut_run.run_dir.parent), "--background", *SETS],
    }
    if not torch.cuda.is_available():
        mistakes["no cuda"] = ["train", str(SPEC), "--runs", "runs", "--set=train.device=cuda"]
    done = all_at_once(mistakes, tmp_path)
    assert_one_error_line(done["runs is a file"], "--runs", "a_file")
    assert_one_error_line(done["eval a wider model"], "model.d_model 32 -> 64",
                          "do not fit the changed model")
    assert "sleep.passes" not in done["eval a wider model"].stderr
    for name in ("train huge", "eval huge", "bench huge", "build huge"):
        assert_one_error_line(done[name], "model.vocab_size", "fits in memory")
    assert_one_error_line(done["background over a run"], "already holds a run")
    if "no cuda" in done:
        assert_one_error_line(done["no cuda"], "train.device", "CUDA is not available")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no run was begun

"""The sleep-passes experiment command, reduced to a few steps (a smoke test of the real
experiment file), its resumption, background runs and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from archkit.experiment import load_experiment, run_experiment
from archkit.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
REDUCED = {
    "model.d_model": 32, "model.blocks.gated_delta.head_dim": 16, "train.steps": 3,
    "train.batch_size": 8, "train.warmup_steps": 1, "train.eval_every": 3,
    "train.eval_size": 64, "train.checkpoint_every": 3, "train.threads": 1,
}


def reduced_experiment(folder: Path) -> Path:
    """experiments/sleep_passes.yaml with one seed and a few steps per run."""
    data = yaml.safe_load((ROOT / "experiments/sleep_passes.yaml").read_text())
    data.update(name="reduced", extends=str(ROOT / "experiments" / data["extends"]),
                seeds=[0, 1], set={**data["set"], **REDUCED}, passes=[1, 2],
                tune_lr=data["tune_lr"][:2])
    path = folder / "reduced.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def archkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archkit.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_the_experiment_command_trains_every_arm_and_reports(tmp_path: Path) -> None:
    path = reduced_experiment(tmp_path)
    done = archkit("experiment", str(path), "--runs", "runs", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs/reduced"
    summary = json.loads((root / "summary.json").read_text())
    tuning = summary["tuning"]["lr"]
    tried = sorted(float(v) for v in tuning["validation_exact"])
    runs = sorted(p.name for p in (root / "runs").iterdir())
    # the learning rates tried at N=1 (two, and a step beyond an edge if the best sat on
    # one, at most twice), then every arm on both seeds
    assert 2 <= len(tried) <= 4 and {1e-3, 2e-3} <= set(tried)
    assert runs == sorted([*(f"tune_lr{v:g}_s0" for v in tried),
                           *(f"{arm}_s{s}" for arm in ("N1", "N2", "N1x2", "N2_hebbian")
                             for s in (0, 1))])
    assert summary["rates"]["lr"] == tuning["chosen"] in tried
    scores = {float(v): e for v, e in tuning["validation_exact"].items()}
    assert scores[tuning["chosen"]] == max(scores.values())
    # tuned on a validation set of its own; reported runs on their seed's
    tune_spec = yaml.safe_load((root / f"runs/tune_lr{tried[0]:g}_s0/checkpoint/spec.yaml")
                               .read_text())
    assert tune_spec["train"]["eval_seed"] == summary["tuning"]["validation_seed"]
    assert (root / f"runs/tune_lr{tried[0]:g}_s0/eval_set.json").read_text() != \
        (root / "runs/N1_s0/eval_set.json").read_text()
    arms = summary["cells"][0]["arms"]
    assert set(arms) == {"N1", "N2", "N1x2", "N2_hebbian"}
    n2 = arms["N2"]
    assert n2["seeds"] == [0, 1] and {"trained", "eval_N8", "difference"} <= set(n2)
    finals = {s: json.loads((root / f"runs/{arm}_s{s}/final.json").read_text())["exact"]
              for arm in ("N1", "N2") for s in (0, 1) if arm == "N2"}
    reference = {s: json.loads((root / f"runs/N1_s{s}/final.json").read_text())["exact"]
                 for s in (0, 1)}
    assert n2["trained"]["exact"]["mean"] == pytest.approx(sum(finals.values()) / 2)
    assert n2["difference"]["mean"] == pytest.approx(
        sum(finals[s] - reference[s] for s in (0, 1)) / 2)
    assert "difference" not in arms["N1"]  # the reference arm
    assert {"exact/1", "exact/2", "exact/4"} <= set(n2["trained"])  # depo evaluates 2^i hops
    spec = yaml.safe_load((root / "runs/N1x2_s1/checkpoint/spec.yaml").read_text())
    assert spec["train"]["steps"] == 6 and spec["sleep"]["passes"] == 1 and spec["seed"] == 1
    assert spec["train"]["lr"] == tuning["chosen"]
    rule = yaml.safe_load((root / "runs/N2_hebbian_s0/checkpoint/spec.yaml").read_text())
    assert rule["sleep"]["rule"] == "hebbian"
    report = (root / "report.md").read_text()
    assert "| N2 at test N=8 | 2 |" in report and "[" in report
    chance = [json.loads((root / f"runs/N1_s{s}/final.json").read_text())["baseline/1"]
              for s in (0, 1)]
    baseline = summary["cells"][0]["baseline"]
    assert baseline["baseline/1"]["mean"] == pytest.approx(sum(chance) / 2)
    assert "| chance (`baseline`) | 2 |" in report
    assert (root / "report.png").stat().st_size > 0
    before = {p: p.stat().st_mtime for p in root.glob("runs/*/final.json")}
    again = archkit("experiment", str(path), "--runs", "runs", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    best = max(json.loads(p.read_text())["exact"] for p in before)
    assert f"best exact {best:.4g}" in again.stderr
    assert {p: p.stat().st_mtime for p in root.glob("runs/*/final.json")} == before
    assert json.loads((root / "summary.json").read_text()) == summary
    (root / "runs/N2_s1/final.json").unlink()  # as if that run had not finished
    partial = archkit("experiment", str(path), "--runs", "runs", "--report-only", cwd=tmp_path)
    assert partial.returncode == 0, partial.stderr
    assert not (root / "runs/N2_s1/final.json").exists()
    cell = json.loads((root / "summary.json").read_text())["cells"][0]
    assert cell["arms"]["N2"]["seeds"] == [0]


def test_a_grid_crosses_arms_and_seeds_and_pairs_runs_on_the_same_questions(
        tmp_path: Path) -> None:
    """Any dotted field as a grid, an arm that changes the model, the stopping rule: every
    (arm, value, seed) runs once, runs of one seed and value share their questions, and
    the report has one section per value and a threshold per arm."""
    data = {"name": "grid", "extends": str(ROOT / "specs/rule110_cpu.yaml"),
            "set": {**REDUCED, "task.width": 6, "sleep.window": 6, "train.steps": 8,
                    "train.eval_every": 2, "train.checkpoint_every": 2,
                    "train.until": {"metric": "exact", "plateau_evals": 1,
                                    "min_delta": 1.0}},
            "grid": {"task.steps": [1, 2]}, "passes": [1],
            "arms": {"deep": {"model.pattern": "AGAG"}}, "seeds": [0, 1], "margin": 0.0}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    experiment = load_experiment(path)
    # one arm first (``--arms deep``): only its runs train, and the report has only them
    partial = run_experiment(experiment, tmp_path / "runs", progress=False, only=["deep"])
    root = tmp_path / "runs/grid/runs"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        f"deep_steps{t}_s{s}" for s in (0, 1) for t in (1, 2))
    assert [set(cell["arms"]) for cell in partial["cells"]] == [{"deep"}, {"deep"}]
    assert "difference" not in partial["cells"][0]["arms"]["deep"]
    trained_once = {p: p.stat().st_mtime_ns for p in root.glob("*/final.json")}
    summary = run_experiment(experiment, tmp_path / "runs", progress=False)
    assert {p: p.stat().st_mtime_ns for p in trained_once} == trained_once
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(f"{arm}_steps{t}_s{s}" for arm in ("N1", "deep")
                           for s in (0, 1) for t in (1, 2))
    for arm, t in (("N1", 2), ("deep", 1)):
        spec = yaml.safe_load((root / f"{arm}_steps{t}_s1/checkpoint/spec.yaml").read_text())
        assert spec["task"]["steps"] == t and spec["seed"] == 1
        assert spec["model"]["pattern"] == ("AGAG" if arm == "deep" else "AG")
    for t in (1, 2):
        for seed in (0, 1):
            questions = {(root / f"{arm}_steps{t}_s{seed}/eval_set.json").read_text()
                         for arm in ("N1", "deep")}
            assert len(questions) == 1
    assert (root / "N1_steps1_s0/eval_set.json").read_text() != \
        (root / "N1_steps1_s1/eval_set.json").read_text()
    assert [cell["value"] for cell in summary["cells"]] == [1, 2]
    assert list(summary["cells"][0]["arms"]) == ["N1", "deep"]  # the experiment's order
    deep = summary["cells"][1]["arms"]["deep"]
    assert deep["difference"]["n"] == 2 and deep["difference"]["p_value"] is not None
    # min_delta 1 cannot be beaten: every run stopped at its second evaluation, step 4 of 8
    assert deep["stopped_at"]["mean"] == 4
    assert set(summary["threshold"]) == {"N1", "deep"}
    report = (tmp_path / "runs/grid/report.md").read_text()
    assert "### task.steps = 2" in report and "| arm | t* |" in report


def test_the_depth_threshold_study_reduced_runs_every_arm_at_every_t(tmp_path: Path) -> None:
    """experiments/depth_threshold.yaml with a few steps, two seeds and two rates per list:
    every arm it names runs at every t on both seeds, the deeper arm has twice the layers,
    the equal-compute arms train longer, both rates are tuned, and the report gives t* for
    each arm. The shipped pilots load too."""
    data = yaml.safe_load((ROOT / "experiments/depth_threshold.yaml").read_text())
    data.update(name="depth", extends=str(ROOT / "experiments" / data["extends"]),
                seeds=[0, 1], set={**data["set"], **REDUCED, "task.width": 8,
                                   "sleep.window": 8})
    data["tune_lr"] = {**{rate: values[:2] for rate, values in data["tune_lr"].items()},
                       "widen": 0}
    path = tmp_path / "depth.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_experiment(load_experiment(path), tmp_path / "runs", progress=False)
    arms = {"N1", "N2", "N4", "N1_deep", "N1x2", "N1x4"}
    assert [cell["value"] for cell in summary["cells"]] == data["grid"]["task.steps"]
    for cell in summary["cells"]:
        assert set(cell["arms"]) == arms
        assert all(cell["arms"][arm]["seeds"] == [0, 1] for arm in arms)
    assert set(summary["threshold"]) == arms
    assert set(summary["rates"]) == {"lr", "adamw_lr"}
    root = tmp_path / "runs/depth/runs"
    deep = yaml.safe_load((root / "N1_deep_steps4_s1/checkpoint/spec.yaml").read_text())
    assert deep["model"]["pattern"] == "AGAG" and deep["sleep"]["passes"] == 1
    longer = yaml.safe_load((root / "N1x4_steps3_s0/checkpoint/spec.yaml").read_text())
    assert longer["train"]["steps"] == 4 * REDUCED["train.steps"]
    # equal compute means every one of those steps: no plateau rule, unlike the main arms
    assert longer["train"]["until"] is None
    main_arm = yaml.safe_load((root / "N1_steps3_s0/checkpoint/spec.yaml").read_text())
    assert main_arm["train"]["until"]["plateau_evals"] == 8
    for pilot in (ROOT / "experiments/depth_pilots").glob("*.yaml"):
        assert load_experiment(pilot).grid_field == "task.steps"
    depo = load_experiment(ROOT / "experiments/depo_pilots/pilot.yaml").spec({}, "pilot")
    assert depo.task is not None and depo.task.hops_per == "query"


def test_workers_and_a_second_command_share_one_experiment_and_train_each_run_once(
        tmp_path: Path) -> None:
    """``--workers 2`` and, at the same time, a second plain command on the same
    experiment: every run (the tuning runs included) is trained by one process, from step
    0, once, and the report equals one made by a single process in another directory
    (one thread per run, so training is deterministic)."""
    data = {"name": "shared", "extends": str(ROOT / "specs/rule110_cpu.yaml"),
            "set": {**REDUCED, "task.width": 6, "sleep.window": 6, "train.steps": 4,
                    "train.eval_every": 2, "train.checkpoint_every": 2},
            "grid": {"task.steps": [1, 2]}, "passes": [1, 2], "seeds": [0],
            "tune_lr": {"lr": [1.0e-3, 2.0e-3], "widen": 0}}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "archkit.cli", "experiment", str(path), "--runs", "runs",
               "--no-progress"]
    processes = [subprocess.Popen([*command, "--workers", "2"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    root = tmp_path / "runs/shared"
    runs = sorted((root / "runs").iterdir())
    assert len(runs) == 2 + 2 * 2  # two tuning runs; 2 arms x 2 values
    for run in runs:
        starts = [json.loads(line)["from_step"]
                  for line in (run / "commands.jsonl").read_text().splitlines()]
        assert starts == [0], run.name
    alone = run_experiment(load_experiment(path), tmp_path / "alone", progress=False)
    shared = json.loads((root / "summary.json").read_text())
    assert shared == json.loads(json.dumps(alone))


def test_a_training_run_in_the_background_outlives_its_command(tmp_path: Path) -> None:
    started = archkit("train", str(ROOT / "specs/rule110_cpu.yaml"), "--background",
                      "--name", "bg", *(f"--set={k}={v}" for k, v in REDUCED.items()),
                      "--set=task.width=6", "--set=sleep.window=6", cwd=tmp_path)
    assert started.returncode == 0 and "background" in started.stdout
    final = tmp_path / "runs/bg/final.json"
    deadline = time.time() + 120
    while not final.exists():
        assert time.time() < deadline, (tmp_path / "runs/bg.log").read_text()
        time.sleep(0.5)
    assert "final evaluation" in (tmp_path / "runs/bg.log").read_text()


def test_a_bad_experiment_names_the_file_and_field(tmp_path: Path) -> None:
    path = reduced_experiment(tmp_path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "sleep_rules": ["hebian"]}))
    with pytest.raises(SpecError, match="hebian") as err:
        load_experiment(path)
    assert err.value.file == str(path)
    path.write_text(yaml.safe_dump({**data, "seed": [0]}))
    done = archkit("experiment", str(path), cwd=tmp_path)
    assert done.returncode == 2 and f"{path}: seed" in done.stderr
    assert "Did you mean 'seeds'?" in done.stderr
    unknown = archkit("experiment", str(reduced_experiment(tmp_path)), "--arms", "N1,N3",
                      "--runs", "runs", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "archkit: error: --arms (got 'N3'): names of the experiment's arms: N1, N2, N1x2, "
        "N2_hebbian"]
    assert not (tmp_path / "runs").exists()

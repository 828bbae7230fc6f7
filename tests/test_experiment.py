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

from archkit.experiment import load_experiment
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
    runs = sorted(p.name for p in (root / "runs").iterdir())
    # two learning rates tried at N=1, then every arm on both seeds
    assert runs == sorted(["lr0.001_N1_s0", "lr0.002_N1_s0",
                           *(f"{arm}_s{s}" for arm in ("N1", "N2", "N1x2", "N2_hebbian")
                             for s in (0, 1))])
    summary = json.loads((root / "summary.json").read_text())
    assert summary["lr"] in (1e-3, 2e-3)
    assert set(summary["arms"]) == {"N1", "N2", "N1x2", "N2_hebbian"}
    n2 = summary["arms"]["N2"]
    assert n2["seeds"] == [0, 1] and set(n2) == {"trained", "eval_N8", "seeds"}
    finals = [json.loads((root / f"runs/N2_s{s}/final.json").read_text())["exact"]
              for s in (0, 1)]
    assert n2["trained"]["exact"][0] == pytest.approx(sum(finals) / 2)
    assert {"exact/1", "exact/2", "exact/4"} <= set(n2["trained"])  # depo evaluates 2^i hops
    spec = yaml.safe_load((root / "runs/N1x2_s1/checkpoint/spec.yaml").read_text())
    assert spec["train"]["steps"] == 6 and spec["sleep"]["passes"] == 1 and spec["seed"] == 1
    rule = yaml.safe_load((root / "runs/N2_hebbian_s0/checkpoint/spec.yaml").read_text())
    assert rule["sleep"]["rule"] == "hebbian"
    report = (root / "report.md").read_text()
    assert "| N2 at test N=8 | 2 |" in report and "+-" in report
    chance = [json.loads((root / f"runs/N1_s{s}/final.json").read_text())["baseline/1"]
              for s in (0, 1)]
    assert summary["baseline"]["baseline/1"][0] == pytest.approx(sum(chance) / 2)
    assert "| chance (`baseline`) | 2 |" in report
    assert (root / "report.png").stat().st_size > 0
    before = {p: p.stat().st_mtime for p in root.glob("runs/*/final.json")}
    again = archkit("experiment", str(path), "--runs", "runs", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    best = max(json.loads(p.read_text())["exact"] for p in before)
    assert "10/10 runs" in again.stderr and f"best exact {best:.4g}" in again.stderr
    assert {p: p.stat().st_mtime for p in root.glob("runs/*/final.json")} == before
    assert json.loads((root / "summary.json").read_text()) == summary
    (root / "runs/N2_s1/final.json").unlink()  # as if that run had not finished
    partial = archkit("experiment", str(path), "--runs", "runs", "--report-only", cwd=tmp_path)
    assert partial.returncode == 0, partial.stderr
    assert not (root / "runs/N2_s1/final.json").exists()
    assert json.loads((root / "summary.json").read_text())["arms"]["N2"]["seeds"] == [0]


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

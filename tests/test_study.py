"""One study, many processes: concurrent searches, storage URLs, extending a search, and
refusing a rerun whose base spec changed. Real Optuna storages, real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState
from test_search import FEW_STEPS

ROOT = Path(__file__).resolve().parents[1]


def write_space(folder: Path, name: str, trials: int, base: Path | None = None) -> Path:
    """A 2 x 2 grid of valid trials of three training steps, on ``base`` (a copy of the CPU
    Rule 110 spec in ``folder`` by default, so tests may edit it)."""
    if base is None:
        base = folder / "base.yaml"
        shutil.copy(ROOT / "specs/rule110_cpu.yaml", base)
    space = {"name": name, "extends": base.name, "set": {**FEW_STEPS, "train.log_every": 1},
             "budget": {"trials": trials, "steps": 3}, "sampler": "grid", "threads": 1,
             "bench": {"repeats": 1, "decode": 2},
             "params": {"sleep.passes": {"choices": [1, 2]},
                        "train.lr": {"choices": [1.0e-3, 2.0e-3]}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def search(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "archkit.cli", "search", *args,
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def check_trials(root: Path, study: optuna.Study, expected: int) -> None:
    """Exactly ``expected`` complete trials and no other, each in the directory of its
    Optuna number, each with strictly increasing logged steps."""
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * expected
    for trial in study.trials:
        run_dir = root / "trials" / f"{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        assert json.loads((run_dir / "result.json").read_text())["state"] == "complete"
        for kind in ("train", "eval"):
            steps = [r["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if (r := json.loads(line))["kind"] == kind]
            assert steps == sorted(set(steps)) and steps, (trial.number, kind, steps)


def journal_study(root: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(root / "study.journal")))
    return optuna.load_study(study_name=root.name, storage=storage)


def test_two_search_commands_on_one_space_are_workers_of_one_study(tmp_path: Path) -> None:
    path = write_space(tmp_path, "shared", trials=4)
    runs = str(tmp_path / "runs")
    first, second = search(str(path), "--runs", runs), search(str(path), "--runs", runs)
    for process in (finished(first), finished(second)):
        assert process.returncode == 0, process.stderr
        assert "Traceback" not in process.stderr
    root = tmp_path / "runs/shared"
    check_trials(root, journal_study(root), 4)


def test_a_sqlite_study_with_two_workers_and_its_rerun(tmp_path: Path) -> None:
    path = write_space(tmp_path, "db", trials=3)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    runs = str(tmp_path / "runs")
    done = finished(search(str(path), "--runs", runs, "--storage", url, "--workers", "2"))
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs/db"
    check_trials(root, optuna.load_study(study_name="db", storage=url), 3)
    again = finished(search(str(path), "--runs", runs))  # finds its storage in search.json
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="db", storage=url).trials) == 3
    other = finished(search(str(path), "--runs", runs, "--storage",
                            f"sqlite:///{tmp_path / 'other.db'}"))
    assert other.returncode == 2 and "--storage" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_a_search_extends_moves_and_refuses_a_changed_base_spec(tmp_path: Path) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    path = write_space(folder, "grow", trials=1)
    runs = str(tmp_path / "runs")
    assert finished(search(str(path), "--runs", runs)).returncode == 0
    root = tmp_path / "runs/grow"
    kept = (root / "trials/0000/result.json").read_text()
    grown = finished(search(str(path), "--runs", runs, "--trials", "2"))
    assert grown.returncode == 0, grown.stderr
    assert (root / "trials/0000/result.json").read_text() == kept
    check_trials(root, journal_study(root), 2)
    moved = tmp_path / "moved"
    folder.rename(moved)  # the same content elsewhere is the same search
    rerun = finished(search(str(moved / "grow.yaml"), "--runs", runs, "--trials", "2"))
    assert rerun.returncode == 0, rerun.stderr
    base = moved / "base.yaml"
    base.write_text(base.read_text().replace("mlp_ratio: 4.0", "mlp_ratio: 2.0"))
    refused = finished(search(str(moved / "grow.yaml"), "--runs", runs, "--trials", "3"))
    assert refused.returncode == 2 and "model.mlp_ratio: 4.0 -> 2.0" in refused.stderr
    assert "base spec" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    listed = subprocess.run([sys.executable, "-m", "archkit.cli", "studies", "--runs", runs,
                             "--json"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    (study,) = json.loads(listed.stdout)
    assert study["name"] == "grow" and study["complete"] == 2 and study["budget"] == 2
    assert study["storage"] == "study.journal" and study["on_front"] >= 1


def test_a_killed_search_leaves_its_trial_to_the_next_process(tmp_path: Path) -> None:
    """SIGKILL runs no handler: the trial stays RUNNING in the study, and only its free
    lock tells the next process that nobody is running it."""
    path = write_space(tmp_path, "killed", trials=1)
    space = yaml.safe_load(path.read_text())
    space["budget"]["steps"] = 400
    path.write_text(yaml.safe_dump(space))
    runs, root = str(tmp_path / "runs"), tmp_path / "runs/killed"
    process = search(str(path), "--runs", runs)
    checkpoint = root / "trials/0000/checkpoint/trainer.pt"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=60)
    assert [t.state for t in journal_study(root).trials] == [TrialState.RUNNING]
    done = finished(search(str(path), "--runs", runs))
    assert done.returncode == 0, done.stderr
    study = journal_study(root)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["retry_of"] == 0
    record = json.loads((root / "trials/0001/result.json").read_text())
    assert record["state"] == "complete" and not (root / "trials/0000").exists()
    steps = [json.loads(line)["step"] for line in
             (root / "trials/0001/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 400


def test_search_takes_set_and_name_and_reports_as_json(tmp_path: Path) -> None:
    path = write_space(tmp_path, "plain", trials=1)
    runs = str(tmp_path / "runs")
    done = finished(search(str(path), "--runs", runs, "--name", "renamed",
                           "--set", "train.adamw_lr=0.005"))
    assert done.returncode == 0, done.stderr
    root = tmp_path / "runs/renamed"
    assert not (tmp_path / "runs/plain").exists()
    assert json.loads((root / "search.json").read_text())["space"]["set"][
        "train.adamw_lr"] == 0.005
    spec = yaml.safe_load((root / "trials/0000/checkpoint/spec.yaml").read_text())
    assert spec["train"]["adamw_lr"] == 0.005 and spec["name"] == "renamed/0000"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "archkit.cli", *args],
                              capture_output=True, text=True)

    shown = json.loads(cli("pareto", str(root), "--json").stdout)
    assert shown["name"] == "renamed" and shown["objectives"] == ["exact", "wake_ms_per_token"]
    (trial,) = shown["trials"]
    assert trial["on_front"] and trial["state"] == "complete"
    blocks = json.loads(cli("blocks", "--json").stdout)
    assert "gated_delta" in [b["name"] for b in blocks["block"]]
    examples = json.loads(cli("tasks", "show", "depo", "-n", "2", "--json").stdout)
    assert len(examples["examples"]) == 2 and examples["examples"][0]["answers"]
    assert cli("--version").stdout.strip().startswith("archkit ")

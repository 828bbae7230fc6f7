"""A search reviewed in TensorBoard: a real ``tensorboard`` process over the runs directory,
queried over HTTP the way its HParams tab queries it, while the search grows."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_search import FEW_STEPS, write_space

from archkit import api
from archkit.searching import load_space, run_search
from archkit.searching.pareto import plot_front

TRIAL_METRICS = {"trials/exact", "trials/wake_ms_per_token", "trials/wake_ms_p99",
                 "trials/sleep_ms_per_window", "trials/fast_weight_bytes", "trials/on_front"}


class Board:
    """A ``tensorboard --logdir`` process and the two HParams routes its tab reads."""

    def __init__(self, logdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
             "127.0.0.1", "--port", str(self.port), "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/data/plugin/hparams/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Run name -> {hparams, metrics: tag -> value, status} for every session."""
        groups = self.post("session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 1000,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"]})
        return {g["name"]: {"hparams": g["hparams"],
                            "metrics": {m["name"]["tag"]: m["value"]
                                        for m in g.get("metricValues", [])},
                            "status": g["sessions"][0].get("status", "")}
                for g in groups.get("sessionGroups", [])}

    def wait_for(self, ready: Callable[[dict[str, dict[str, Any]]], bool],
                 timeout_s: float = 90) -> dict[str, dict[str, Any]]:
        """The sessions, once ``ready(sessions)`` holds (TensorBoard reloads every second)."""
        deadline, seen = time.time() + timeout_s, {}
        while time.time() < deadline:
            try:
                seen = self.sessions()
                if ready(seen):
                    return seen
            except OSError:  # not listening yet
                pass
            time.sleep(1)
        raise AssertionError(f"TensorBoard never showed the expected sessions: {seen}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    (tmp_path / "runs").mkdir()
    running = Board(tmp_path / "runs")
    yield running
    running.close()


def front_in_csv(root: Path) -> dict[str, float]:
    with open(root / "pareto.csv") as f:
        return {row["trial"]: float(row["on_front"] == "True") for row in csv.DictReader(f)}


def event_files(runs: Path) -> set[Path]:
    return set(runs.rglob("events.out.tfevents.*"))


def test_hparams_shows_every_trial_beside_training_runs_and_follows_a_growing_search(
        tmp_path: Path, board: Board) -> None:
    runs = tmp_path / "runs"
    # a training run first: its session must not hide the search's columns
    api.train(ROOT_SPEC, {**FEW_STEPS, "train.steps": 2}, name="solo", runs=runs,
              progress=False)
    space_file = write_space(tmp_path, name="grid", budget={"trials": 2, "steps": 3})
    run_search(load_space(space_file), runs, progress=False)
    root = runs / "grid"

    def trials_shown(count: int) -> Callable[[dict[str, dict[str, Any]]], bool]:
        return lambda seen: len([n for n in seen if n.startswith("grid/trials/")]) == count

    seen = board.wait_for(trials_shown(2))
    experiment = board.post("experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"model.n_heads", "model.d_model", "search", "trial", "state"} <= columns
    assert "sleep.passes" in columns  # the training run's spec, in the same table
    metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert TRIAL_METRICS | {"final/exact"} <= metric_tags
    assert "solo" in seen and "final/exact" in seen["solo"]["metrics"]
    before = event_files(runs)

    # the search grows under the running TensorBoard: nothing it reads is deleted
    grown = write_space(tmp_path, name="grid", budget={"trials": 4, "steps": 3})
    run_search(load_space(grown), runs, progress=False)
    front = front_in_csv(root)
    seen = board.wait_for(lambda s: trials_shown(4)(s) and all(
        s[f"grid/trials/{t}"]["metrics"].get("trials/on_front") == flag
        for t, flag in front.items()))
    assert before <= event_files(runs)
    records = {json.loads(p.read_text())["trial"]: json.loads(p.read_text())
               for p in root.glob("trials/*/result.json")}
    for trial, record in records.items():
        session = seen[f"grid/trials/{trial}"]
        assert session["hparams"]["search"] == "grid"
        assert session["hparams"]["state"] == record["state"]
        assert session["hparams"]["model.n_heads"] == record["params"]["model.n_heads"]
        if record["state"] == "failed":
            assert session["status"] == "STATUS_FAILURE"
            assert session["metrics"]["trials/on_front"] == 0
            continue
        assert session["status"] == "STATUS_SUCCESS"
        for name in ("exact", "wake_ms_per_token", "wake_ms_p99", "sleep_ms_per_window",
                     "fast_weight_bytes"):
            assert session["metrics"][f"trials/{name}"] == pytest.approx(
                record["metrics"][name], rel=1e-6)
        assert session["metrics"]["trials/on_front"] == front[trial]
    assert sum(front.values()) >= 1
    # one session per trial, and the front figure redrawn at a new step, not rewritten
    assert all(len(list(d.glob("*.hparams"))) == 1 for d in root.glob("trials/*"))
    assert len(list((root / "front").glob("events.out.tfevents.*"))) >= 2


def test_the_front_figure_names_the_search_its_trials_and_chance() -> None:
    def record(trial: str, head_dim: int, exact: float, ms: float) -> dict[str, Any]:
        return {"trial": trial, "state": "complete",
                "params": {"model.blocks.gated_delta.head_dim": head_dim, "sleep.passes": 2},
                "metrics": {"exact": exact, "wake_ms_per_token": ms, "baseline": 0.25}}

    candidates = [record("0000", 16, 0.9, 2.0), record("0001", 32, 0.5, 3.0)]
    figure = plot_front(candidates, {"0000"}, ["exact", "wake_ms_per_token"],
                        ["maximize", "minimize"], "state_size")
    axes = figure.axes[0]
    assert axes.get_title().startswith("state_size: 2 complete trials, 1 on the front")
    labels = {text.get_text() for text in axes.texts}
    assert labels == {"0000 head_dim=16", "0001 head_dim=32"}  # passes is the same for both
    chance = [line for line in axes.lines if line.get_label() == "chance (baseline)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.25, 0.25]


ROOT_SPEC = Path(__file__).resolve().parents[1] / "specs/rule110_cpu.yaml"

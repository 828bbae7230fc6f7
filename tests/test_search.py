"""Search: space validation, Pareto fronts, and real searches on Optuna and Ray Tune."""

from __future__ import annotations

import fcntl
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import torch
import yaml
from optuna.trial import TrialState

from archkit.card import model_card
from archkit.cli import main
from archkit.model import HybridModel
from archkit.searching import load_space, run_search
from archkit.searching.optuna_backend import open_study
from archkit.searching.pareto import front_markdown, front_of, pareto_front, short_names
from archkit.searching.space import SearchSpace
from archkit.searching.trial import load_results
from archkit.sleep import SleepingModel
from archkit.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "specs/rule110_cpu.yaml")
FEW_STEPS = {
    "model.d_model": 32, "model.blocks.gated_delta.head_dim": 16, "task.width": 6,
    "sleep.window": 6, "train.batch_size": 8, "train.warmup_steps": 1,
    "train.eval_every": 2, "train.eval_size": 16, "train.checkpoint_every": 2,
}


def write_space(folder: Path, **fields: object) -> Path:
    space = {"extends": BASE, "set": FEW_STEPS, "budget": {"trials": 4, "steps": 3},
             "sampler": "grid", "threads": 1, "bench": {"repeats": 2, "decode": 2},
             # d_model 32 splits into 2 heads but not 3: one of the four is invalid.
             "params": {"model.n_heads": {"choices": [2, 3]},
                        "model.d_model": {"choices": [32, 48]}}}
    space.update(fields)
    path = folder / f"{space.get('name', 'space')}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def dominated_by_brute_force(points: list[list[float]], directions: list[str]) -> set[int]:
    """Indices some other point beats: no worse on every objective, better on one."""
    flip = [1 if d == "maximize" else -1 for d in directions]
    beaten = set()
    for i, p in enumerate(points):
        for q in points:
            diffs = [f * (b - a) for f, a, b in zip(flip, p, q, strict=True)]
            if min(diffs) >= 0 and max(diffs) > 0:
                beaten.add(i)
    return beaten


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    n_obj = rng.choice([2, 3])
    directions = [rng.choice(["maximize", "minimize"]) for _ in range(n_obj)]
    # values from a small set, so that ties and duplicate points are common
    points = [[float(rng.randint(0, 3)) for _ in range(n_obj)] for _ in range(rng.randint(1, 25))]
    front = pareto_front(points, directions)
    assert set(front) == set(range(len(points))) - dominated_by_brute_force(points, directions)


def test_stopped_and_failed_trials_never_enter_the_front() -> None:
    def record(trial: str, state: str, acc: float, ms: float) -> dict:
        return {"trial": trial, "state": state, "params": {},
                "metrics": {"exact": acc, "wake_ms_per_token": ms}}

    results = [record("a", "complete", 0.5, 2.0), record("b", "complete", 0.8, 3.0),
               record("c", "stopped", 0.9, 1.0), record("d", "complete", 0.5, 2.0),
               {"trial": "e", "state": "failed", "params": {}, "metrics": {}, "reason": "x"}]
    front = front_of(results, ["exact", "wake_ms_per_token"], ["maximize", "minimize"])
    # "c" beats everyone but was stopped early; "a" and "d" tie and are both kept
    assert [r["trial"] for r in front] == ["a", "b", "d"]


@pytest.mark.parametrize(("fields", "where"), [
    ({"param": {}}, "param"),
    ({"params": {"sleep.pases": {"choices": [1, 2]}}}, "params.sleep.pases"),
    ({"params": {"sleep.passes": {"values": [1, 2]}}}, "params.sleep.passes"),
    ({"params": {"sleep.passes": {"int": [4, 1]}}}, "params.sleep.passes"),
    ({"objectives": [{"metric": "acuracy"}]}, "objectives[0]"),
    ({"objectives": [{"metric": "accuracy"}]}, "objectives[0]"),
    ({"objectives": [{"metric": "grad_norm"}]}, "objectives[0]"),
    ({"columns": ["flops_per_tokn"]}, "columns[0]"),
    ({"params": {"train.lr": {"float": [1e-4, 1e-2]}}}, "params.train.lr"),
    ({"ray": {"asha": {}}}, "ray.asha"),
    ({"extends": "missing.yaml"}, "extends"),
])
def test_a_bad_search_space_names_the_file_and_field(tmp_path: Path, fields: dict,
                                                      where: str) -> None:
    path = write_space(tmp_path, **fields)
    with pytest.raises(SpecError) as err:
        load_space(path)
    assert err.value.file == str(path) and err.value.path.startswith(where)


def test_the_command_reports_a_bad_space_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = write_space(tmp_path, params={"sleep.pases": {"choices": [1, 2]}})
    cli = subprocess.run([sys.executable, "-m", "archkit.cli", "search", str(path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert f"{path}: params.sleep.pases" in cli.stderr and "pases" in cli.stderr
    assert not (tmp_path / "runs").exists()


def test_list_valued_choices_reach_the_spec_intact(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, params={"sleep.layers": {"choices": [[0, 0],
                                                                                  [0, 1]]}}))
    params = space.suggest(optuna.trial.FixedTrial({"sleep.layers": "[0, 1]"}))
    assert params == {"sleep.layers": [0, 1]}
    assert space.trial_spec(params, "t").sleep.layers == (0, 1)


def check_search(root: Path, expected_trials: int) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(root.glob("trials/*/result.json"))]
    assert len(results) == expected_trials
    failed = [r for r in results if r["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["params"] == {"model.n_heads": 3, "model.d_model": 32}
    assert "n_heads" in failed[0]["reason"]
    complete = [r for r in results if r["state"] == "complete"]
    assert len(complete) == 3
    for r in complete:
        assert 0 <= r["metrics"]["exact"] <= 1 and r["metrics"]["wake_ms_per_token"] > 0
        assert min(r["wake_ms_per_token_repeats"]) <= r["metrics"]["wake_ms_per_token"]
        assert r["metrics"]["wake_ms_per_token"] <= r["metrics"]["wake_ms_max"]
        assert (root / "trials" / r["trial"] / "checkpoint").is_dir()
    csv_rows = (root / "pareto.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and "True" in csv_rows[1]  # the front comes first
    assert (root / "pareto.png").stat().st_size > 0
    assert list((root / "front").glob("events.out.tfevents.*"))
    return results


def test_optuna_search_on_two_workers_records_the_invalid_trial_and_the_front(
        tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, name="grid"))
    front = run_search(space, tmp_path / "runs", workers=2, progress=False)
    assert front
    check_search(tmp_path / "runs/grid", 4)
    study = optuna.load_study(study_name="grid", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "runs/grid/study.journal"))))
    assert study.metric_names == ["exact", "wake_ms_per_token"]
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        record = json.loads((Path(trial.user_attrs["run_dir"]) / "result.json").read_text())
        assert {k: trial.user_attrs[k] for k in record["metrics"]} == record["metrics"]
        assert trial.values == [record["metrics"]["exact"],
                                record["metrics"]["wake_ms_per_token"]]
        # evaluations at steps 2 and 3 (the last): [step, exact] each
        assert [step for step, _ in trial.user_attrs["intermediate/exact"]] == [2, 3]
        assert trial.user_attrs["intermediate/exact"][-1][1] == record["metrics"]["exact"]
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert any("n_heads" in t.user_attrs.get("reason", "") for t in study.trials)
    run_search(space, tmp_path / "runs", progress=False)  # already at its budget: no-op
    assert len(open_study(space, tmp_path / "runs/grid").trials) == 4
    shown = subprocess.run([sys.executable, "-m", "archkit.cli", "pareto",
                            str(tmp_path / "runs/grid")], capture_output=True, text=True)
    assert shown.returncode == 0 and "grid: Pareto front" in shown.stdout
    assert "3 complete, 1 failed" in shown.stdout and "must divide" in shown.stdout


def test_a_single_objective_study_gets_intermediate_values(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, name="one", objectives=[{"metric": "exact"}],
                                   budget={"trials": 1, "steps": 4},
                                   params={"sleep.passes": {"choices": [1]}}))
    run_search(space, tmp_path / "runs", progress=False)
    (trial,) = open_study(space, tmp_path / "runs/one").trials
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["exact"]
    assert sorted(trial.intermediate_values) == [2, 4]
    assert trial.intermediate_values[4] == trial.value


def test_a_rerun_over_a_changed_space_is_refused(tmp_path: Path) -> None:
    run_search(load_space(write_space(tmp_path, name="s", budget={"trials": 1, "steps": 1})),
               tmp_path / "runs", progress=False)
    changed = load_space(write_space(tmp_path, name="s", budget={"trials": 1, "steps": 2}))
    with pytest.raises(SpecError, match=r"space differs \(budget.steps: 1 -> 2\)"):
        run_search(changed, tmp_path / "runs", progress=False)


def finished_and_running(root: Path) -> tuple[Path, Path] | None:
    """A finished trial's result and another trial's run directory with a checkpoint."""
    done = [p for p in root.glob("trials/*/result.json")]
    running = [d for d in root.glob("trials/*") if (d / "checkpoint/trainer.pt").exists()
               and not (d / "result.json").exists()]
    return (done[0], running[0]) if done and running else None


def test_ctrl_c_on_the_search_command_stops_its_worker_processes_with_checkpoints(
        tmp_path: Path) -> None:
    """The workers run in their own process group, as after a Ctrl-C in a terminal that
    reaches the command alone: the command passes it on, once, and every worker stops
    after its step with a checkpoint that the rerun continues."""
    path = write_space(tmp_path, name="pair", budget={"trials": 2, "steps": 400},
                       params={"sleep.passes": {"choices": [1, 2]}})
    root = tmp_path / "runs/pair"
    command = [sys.executable, "-m", "archkit.cli", "search", str(path), "--workers", "2",
               "--runs", str(tmp_path / "runs"), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while len(list(root.glob("trials/*/checkpoint/trainer.pt"))) < 2:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    stderr = process.stderr.read()
    assert stderr.count("interrupted, checkpoint saved") == 2, stderr
    cut = {d: torch.load(d / "checkpoint/trainer.pt", weights_only=False)["step"]
           for d in root.glob("trials/*")}
    assert len(cut) == 2 and all(0 < step < 400 for step in cut.values())
    for run_dir in cut:  # no worker is left running: each trial's lock is free
        with open(run_dir / ".running.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    done = subprocess.run([*command[:-1]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = [json.loads(p.read_text()) for p in root.glob("trials/*/result.json")]
    assert sorted(r["params"]["sleep.passes"] for r in results) == [1, 2]
    assert all(r["state"] == "complete" and r["step"] == 400 for r in results)


def test_the_search_bar_goes_to_stderr_and_json_results_to_stdout(tmp_path: Path) -> None:
    path = write_space(tmp_path, name="quiet", budget={"trials": 2, "steps": 3},
                       params={"sleep.passes": {"choices": [1, 2]}})
    done = subprocess.run([sys.executable, "-m", "archkit.cli", "search", str(path), "--json",
                           "--runs", str(tmp_path / "runs")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # nothing but the JSON on stdout
    assert report["objectives"] == ["exact", "wake_ms_per_token"]
    assert len(report["trials"]) == 2 and any(t["on_front"] for t in report["trials"])
    best = max(t["metrics"]["exact"] for t in report["trials"])
    assert "2/2 trials" in done.stderr and f"best exact {best:.4g}" in done.stderr
    assert "final evaluation" not in done.stdout + done.stderr  # per-trial tables: -v only
    verbose = subprocess.run([sys.executable, "-m", "archkit.cli", "search", str(path), "-v",
                              "--name", "loud", "--runs", str(tmp_path / "runs"),
                              "--workers", "1", "--no-progress"], capture_output=True, text=True)
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout.count("final evaluation") == 2


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_an_interrupted_search_resumes_without_losing_finished_trials(
        tmp_path: Path, backend: str) -> None:
    path = write_space(tmp_path, name="cut", budget={"trials": 2, "steps": 150},
                       params={"sleep.passes": {"choices": [1, 2]}})
    root = tmp_path / "runs/cut"
    command = [sys.executable, "-m", "archkit.cli", "search", str(path), "--backend", backend,
               "--runs", str(tmp_path / "runs"), "--no-progress"]
    if backend == "optuna":
        command += ["--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while (found := finished_and_running(root)) is None:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.2)
    first, cut = found
    kept = first.read_text()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    assert "Run the same command again" in process.stderr.read()
    saved_step = torch.load(cut / "checkpoint/trainer.pt", weights_only=False)["step"]
    before = (cut / "metrics.jsonl").read_text().splitlines()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert first.read_text() == kept
    if backend == "optuna":  # the retry is Optuna trial 2 and takes the checkpoint along
        assert not cut.exists() and cut.name == "0001"
        cut = root / "trials/0002"
    second = json.loads((cut / "result.json").read_text())
    assert second["state"] == "complete"
    assert second["params"] != json.loads(kept)["params"]  # the grid's other point
    # the cut trial continued from its checkpoint: the records up to it are the same lines
    # (they hold timings, so a rerun from scratch would differ), the rest follow in order
    after = (cut / "metrics.jsonl").read_text().splitlines()
    assert saved_step > 0
    kept_lines = [line for line in before if json.loads(line)["step"] <= saved_step]
    assert after[:len(kept_lines)] == kept_lines
    steps = [json.loads(line)["step"] for line in after]
    assert steps == sorted(steps) and steps[-1] == 150
    if backend == "optuna":
        study = optuna.load_study(study_name="cut", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(root / "study.journal"))))
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert sorted(t.params["sleep.passes"] for t in complete) == [1, 2]
        assert all(Path(t.user_attrs["run_dir"]).name == f"{t.number:04d}" for t in complete)
        assert study.trials[2].user_attrs["retry_of"] == 1


def test_ray_tune_search_on_a_local_ray_runtime(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, name="ray"))
    asha = load_space(write_space(
        tmp_path, name="asha", sampler="random", objectives=[{"metric": "exact"}],
        params={"train.lr": {"float": [1e-4, 1e-1], "log": True}},
        budget={"trials": 6, "steps": 8}, ray={"asha": {"grace_period": 1}}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        front = run_search(space, tmp_path / "runs", backend="ray", progress=False)
        asha_front = run_search(asha, tmp_path / "runs", backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert front
    results = check_search(tmp_path / "runs/ray", 4)
    assert all(r["trial"].startswith("ray_") for r in results)
    asha_results = [json.loads(p.read_text())
                    for p in (tmp_path / "runs/asha").glob("trials/*/result.json")]
    assert len(asha_results) == 6
    assert {r["state"] for r in asha_results} <= {"complete", "stopped"}
    best = max(r["metrics"]["exact"] for r in asha_results if r["state"] == "complete")
    assert asha_front and all(r["state"] == "complete" and r["metrics"]["exact"] == best
                              for r in asha_front)
    with pytest.raises(SpecError, match="optuna"):
        run_search(space, tmp_path / "runs", backend="optuna", progress=False)
    # Tune's own experiment folder holds no TensorBoard runs: each trial shows up once
    assert not list((tmp_path / "runs/ray/ray").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "runs/ray/ray").rglob("progress.csv"))


def test_trials_of_two_ray_train_workers_match_single_process_trials(tmp_path: Path
                                                                   ) -> None:
    """``trial_workers: 2`` on the Ray backend: each trial trains as a Ray Train run of 2
    gloo ranks (its commands.jsonl says so) and scores what the same trial scores in one
    process; the optuna backend refuses such a space with one line."""
    fields = {"params": {"train.lr": {"choices": [1e-3, 3e-3]}}, "budget": {"trials": 2,
              "steps": 4}, "objectives": [{"metric": "exact"}]}
    space = load_space(write_space(tmp_path, name="ranks", trial_workers=2, **fields))
    alone = load_space(write_space(tmp_path, name="alone", **fields))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_search(space, tmp_path / "runs", backend="ray", progress=False)
    finally:
        ray.shutdown()
    run_search(alone, tmp_path / "runs", backend="optuna", workers=1, progress=False)
    scores = {}
    for name in ("ranks", "alone"):
        results = load_results(tmp_path / "runs" / name)
        assert [r["state"] for r in results] == ["complete", "complete"], results
        scores[name] = {r["params"]["train.lr"]: r["metrics"]["exact"] for r in results}
    assert scores["ranks"] == scores["alone"] and len(scores["ranks"]) == 2
    for run in (tmp_path / "runs/ranks").glob("trials/*"):
        entries = [json.loads(line) for line in (run / "commands.jsonl").read_text()
                   .splitlines()]
        assert [e["ranks"] for e in entries] == [2]
    with pytest.raises(SpecError, match="trial_workers"):
        run_search(space.model_copy(update={"name": "ranks_on_optuna"}), tmp_path / "runs",
                   backend="optuna", progress=False)


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_space_loads_and_its_first_trial_spec_is_valid(path: Path) -> None:
    space = load_space(path)
    params = space.suggest(optuna.trial.FixedTrial(
        {key: space.grid()[key][0] for key in space.params}))
    spec = space.trial_spec(params, "first")
    assert spec.train is not None and spec.train.steps == space.budget.steps
    assert space.trials() >= 1
    assert spec.task is not None
    torch.manual_seed(0)
    sleeper = SleepingModel.from_spec(spec)
    batch = spec.task.build().train_batch(0, 2)
    loss = sleeper(batch.tokens, batch.context_len, batch.loss_mask).loss
    loss.backward()
    assert torch.isfinite(loss)


def _wake_cost(space: SearchSpace, params: dict) -> tuple[int, int]:
    spec = space.trial_spec(space.suggest(optuna.trial.FixedTrial(params)), "probe")
    assert spec.sleep is not None
    card = model_card(HybridModel(spec.model), spec.sleep.window)
    return card["flops_per_token"], card["state_bytes_per_sequence"]


# sleep_n asks whether N moves wake latency (the paper: it does not): its flat latency
# axis is its answer, so it is the one space left without a wake-cost axis
WAKE_COST_CONTROLS = {"sleep_n"}


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "search_spaces").glob("*.yaml")
                                        if p.stem not in WAKE_COST_CONTROLS),
                         ids=lambda p: p.stem)
def test_every_shipped_space_has_an_axis_that_moves_the_wake_cost(path: Path) -> None:
    """A front of accuracy against wake latency carries information on both axes only if
    some parameter changes what a wake token costs (FLOPs or the state it reads)."""
    space = load_space(path)
    first = {key: values[0] for key, values in space.grid().items()}
    costs = {_wake_cost(space, {**first, key: value})
             for key, values in space.grid().items() for value in values}
    assert len(costs) > 1


def test_compare_puts_searches_of_two_tasks_side_by_side_at_equal_latency(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    depo = {"extends": str(ROOT / "specs/depo_cpu.yaml"),
            "set": {"model.d_model": 32, "model.blocks.gated_delta.head_dim": 16,
                    "train.batch_size": 8, "train.warmup_steps": 1, "train.eval_every": 2,
                    "train.eval_size": 16, "train.checkpoint_every": 2}}
    spaces = [write_space(tmp_path, name="r110", budget={"trials": 2, "steps": 2},
                          params={"model.pattern": {"choices": ["AG", "AGAG"]}}),
              write_space(tmp_path, name="r110_heads", budget={"trials": 2, "steps": 2},
                          params={"model.blocks.gated_delta.head_dim": {"choices": [8, 16]}}),
              write_space(tmp_path, name="depo", budget={"trials": 2, "steps": 2},
                          params={"model.pattern": {"choices": ["AG", "GG"]}}, **depo)]
    for path in spaces:
        run_search(load_space(path), tmp_path / "runs", workers=1, progress=False)
    roots = [tmp_path / "runs" / name for name in ("r110", "r110_heads", "depo")]
    figure = tmp_path / "figures/compare.png"
    main(["compare", *map(str, roots), "--figure", str(figure), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["search"]) for r in rows] == [
        ("rule110", "r110"), ("rule110", "r110_heads"), ("depo", "depo")]
    assert figure.stat().st_size > 0

    by_search = {r["search"]: r for r in rows}
    records = {root.name: [json.loads(p.read_text())
                           for p in sorted(root.glob("trials/*/result.json"))]
               for root in roots}
    for task, names in (("rule110", ["r110", "r110_heads"]), ("depo", ["depo"])):
        fastest = [min(records[n], key=lambda r: r["metrics"]["wake_ms_per_token"])
                   for n in names]
        budget = (max(r["metrics"]["wake_ms_per_token"] for r in fastest)
                  * (1 + max(r["metrics"]["wake_repeat_spread"] for r in fastest)))
        for name in names:
            row = by_search[name]
            assert row["task"] == task
            assert row["latency_budget_ms"] == pytest.approx(budget)
            within = [r for r in records[name] if r["metrics"]["wake_ms_per_token"] <= budget]
            assert within and row["at_budget"]["exact"] == max(r["metrics"]["exact"]
                                                                for r in within)
            assert row["best"]["exact"] == max(r["metrics"]["exact"] for r in records[name])
            assert row["chance"] == pytest.approx(
                sum(r["metrics"]["baseline"] for r in records[name]) / len(records[name]))

    with pytest.raises(SystemExit) as exited:
        main(["compare", str(tmp_path / "figures")])
    assert exited.value.code == 2
    assert "not a search directory" in capsys.readouterr().err


def test_workers_do_not_propose_the_same_trial_and_proposals_do_not_depend_on_workers(
        tmp_path: Path) -> None:
    """Each worker process has its own sampler; seeded alike, two workers' first random
    draws were the same trial. Seeded by trial number, they differ, and trial n proposes
    what a sampler seeded for n proposes, whichever worker asks."""
    params = {"train.lr": {"float": [1.0e-4, 1.0e-2], "log": True}}
    space = load_space(write_space(tmp_path, name="two", sampler="tpe", params=params,
                                   budget={"trials": 2, "steps": 1}))
    run_search(space, tmp_path / "runs", workers=2, progress=False)
    proposed = [json.loads(p.read_text())["params"]["train.lr"]
                for p in sorted((tmp_path / "runs/two").glob("trials/*/result.json"))]
    alone = []
    for number in range(2):  # TPE's first trials are random draws: history does not matter
        study = optuna.create_study(sampler=space.make_sampler(draw=number),
                                    directions=space.directions)
        alone.append(space.suggest(study.ask())["train.lr"])
    assert len(set(proposed)) == 2
    assert proposed == pytest.approx(alone)
    # the grid sampler gives trial n the n-th point of one shuffle: every worker's alike
    grid = load_space(write_space(tmp_path, name="subset", budget={"trials": 3, "steps": 1},
                                  params={"model.n_heads": {"choices": [1, 2, 4, 8]}}))
    run_search(grid, tmp_path / "runs", workers=2, progress=False)
    heads = [json.loads(p.read_text())["params"]["model.n_heads"]
             for p in (tmp_path / "runs/subset").glob("trials/*/result.json")]
    assert len(heads) == 3 and len(set(heads)) == 3


def test_the_markdown_front_puts_chance_beside_exact_and_the_repeat_range(
        tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path))

    def record(trial: str, heads: int, exact: float, ms: list[float]) -> dict:
        return {"trial": trial, "state": "complete", "params": {"model.n_heads": heads},
                "metrics": {"exact": exact, "exact/1": exact, "baseline": 0.33,
                            "wake_ms_per_token": sorted(ms)[1]},
                "wake_ms_per_token_repeats": ms}

    results = [record("0001", 2, 0.5, [1.0, 1.2, 1.1]), record("0000", 4, 0.9, [2.0, 2.2, 2.1]),
               record("0002", 2, 0.4, [1.5, 1.6, 1.7]),
               {"trial": "0003", "state": "failed", "params": {}, "metrics": {}}]
    lines = front_markdown(results, space).splitlines()
    assert lines[0] == ("| trial | n_heads | exact | baseline | exact/1 | wake_ms_per_token "
                        "| on_front |")
    assert lines[2] == "| 0000 | 4 | 0.9 | 0.33 | 0.9 | 2.1 (2-2.2) | yes |"
    assert lines[3].endswith("| 1.1 (1-1.2) | yes |") and lines[4].endswith("| no |")
    assert len(lines) == 5  # the failed trial is not a row


def test_parameters_are_named_by_their_shortest_unambiguous_suffix() -> None:
    keys = ["sleep.rule", "model.blocks.gated_delta.rule", "model.blocks.gated_delta.head_dim",
            "model.subrule"]
    assert short_names(keys) == {"sleep.rule": "sleep.rule",
                                 "model.blocks.gated_delta.rule": "gated_delta.rule",
                                 "model.blocks.gated_delta.head_dim": "head_dim",
                                 "model.subrule": "subrule"}

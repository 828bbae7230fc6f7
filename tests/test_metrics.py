"""The metric vocabulary: one table, and every file, log and report uses only its names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import ROOT, TINY

from archkit import metrics
from archkit.metrics import METRICS, RETIRED, SECTIONS, UnknownMetric, find, lookup, tag

TINY_SETS = [f"--set={k}={v}" for k, v in {**TINY, "train.threads": 1}.items() if k != "name"]
# Settings and structure in the JSON outputs: not numbers archkit measures.
NOT_METRICS = {"settings", "name", "dtype", "window", "layers", "sleep", "index", "block", "mlp",
               "controller", "options", "eviction", "loop_layers"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archkit.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def assert_vocabulary(names: object, where: str) -> None:
    unknown = sorted(n for n in names if n not in NOT_METRICS and find(n) is None)
    assert not unknown, f"{where} uses names outside archkit.metrics: {unknown}"


def assert_tags(tags: list[str], where: str) -> None:
    for full in tags:
        section, name = metrics.untag(full)
        assert section in SECTIONS and find(name) is not None, f"{where}: tag {full!r}"


def scalar_tags(folder: Path) -> list[str]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events.Tags()["scalars"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    done = cli("train", "specs/rule110_cpu.yaml", "--runs", str(runs), "--name", "tiny",
               "--no-progress", *TINY_SETS)
    assert done.returncode == 0, done.stderr
    return runs / "tiny"


def test_every_row_is_well_formed_and_names_are_unique() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for metric in METRICS:
        assert metric.sources and set(metric.sources) <= {"evaluation", "training", "bench",
                                                          "card", "search"}
        assert metric.direction in ("maximize", "minimize", None) and metric.meaning
        assert find(metric.name.replace("<difficulty>", "3").replace("<optimizer>", "muon")
                    ) is metric
    assert find("exact/3") is lookup("exact/<difficulty>")
    assert find("exact") is not find("exact/3") and find("exactly") is None
    for old, new in RETIRED.items():
        assert find(old) is None and find(new) is not None, old


def test_unknown_names_are_refused_with_the_closest_one() -> None:
    with pytest.raises(UnknownMetric, match="Did you mean 'wake_ms_per_token'"):
        lookup("wake_ms_per_tokn")
    with pytest.raises(UnknownMetric, match="renamed: use 'exact'"):
        lookup("accuracy")
    with pytest.raises(ValueError, match="unknown section"):
        tag("test", "exact")
    assert tag("eval", "exact/3") == "eval/exact/3"


def test_a_search_objective_outside_the_table_exits_2_naming_the_closest(
        tmp_path: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(f"extends: {ROOT / 'specs/rule110_cpu.yaml'}\n"
                     "params: {sleep.passes: {choices: [1, 2]}}\n"
                     "objectives: [{metric: exakt}, {metric: wake_ms_per_token}]\n")
    done = cli("search", str(space), "--runs", str(tmp_path / "runs"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "objectives[0]" in done.stderr and "Did you mean 'exact'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_archkit_metrics_lists_the_table() -> None:
    shown = cli("metrics", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [row["name"] for row in json.loads(shown.stdout)] == [m.name for m in METRICS]
    table = cli("metrics")
    assert table.returncode == 0 and "wake_ms_p99" in table.stdout


def test_a_training_run_records_only_table_names(tiny_run: Path) -> None:
    final = json.loads((tiny_run / "final.json").read_text())
    assert {"exact", "per_answer", "loss", "exact/1", "per_answer/1"} <= set(final)
    assert_vocabulary(final, "final.json")
    kinds: dict[str, set[str]] = {}
    for line in (tiny_run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        kinds.setdefault(record.pop("kind"), set()).update(set(record) - {"step"})
    assert set(kinds) == {"train", "eval"}
    assert {"loss", "grad_norm", "lr/muon", "lr/adamw", "train_tokens_per_s",
            "passes_per_sleep"} == kinds["train"]
    assert kinds["eval"] == set(final)
    for names in kinds.values():
        assert_vocabulary(names, "metrics.jsonl")
    tags = scalar_tags(tiny_run)
    assert {"train/loss", "eval/exact", "eval/exact/1", "final/exact"} <= set(tags)
    assert_tags(tags, "the run's TensorBoard")


def test_eval_bench_and_build_print_only_table_names(tiny_run: Path) -> None:
    evaluated = cli("eval", str(tiny_run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout) == json.loads((tiny_run / "final.json").read_text())
    bench = cli("bench", str(tiny_run), "--json", "--decode", "4")
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout)
    assert figures["wake_ms_per_token"] <= figures["wake_ms_p99"] <= figures["wake_ms_max"]
    assert_vocabulary(figures, "bench --json")
    card = cli("build", "specs/rule110.yaml", "--json")
    assert card.returncode == 0, card.stderr
    built = json.loads(card.stdout)
    assert_vocabulary(built, "build --json")
    assert_vocabulary(built["sleep"], "build --json: sleep")
    for layer in built["layers"]:
        assert_vocabulary(layer, "build --json: layers")
    planned = cli("build", "specs/rule110_cpu.yaml", "--json", "--plan", "1e9",
                  "--device-tflops", "10")
    assert planned.returncode == 0, planned.stderr
    assert_vocabulary(json.loads(planned.stdout)["plan"], "build --json: plan")


SOURCES = [p for folder in ("archkit", "benchmarks")
           for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "metrics.py"]


@pytest.mark.parametrize("retired", sorted(RETIRED))
def test_no_source_file_uses_a_retired_metric_name(retired: str) -> None:
    quoted = re.compile(rf"""["']{re.escape(retired)}(/[^"']*)?["']""")
    users = [str(p.relative_to(ROOT)) for p in SOURCES if quoted.search(p.read_text())]
    assert not users, f"{retired!r} is used in {users}"

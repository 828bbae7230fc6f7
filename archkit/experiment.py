"""Controlled experiments on sleep passes: models that differ only in N, over seeds.

    name: sleep_passes
    extends: ../specs/depo_cpu.yaml   # the base spec
    set: {task.max_hops: 4}           # dotted overrides for every run
    passes: [1, 2, 4]                 # one arm per N
    seeds: [0, 1, 2]
    tune_lr: [1.0e-3, 3.0e-3]         # the paper's protocol: pick lr at N=1, reuse for all N
    equal_compute: true               # an N=1 arm trained N times as many steps, per N > 1
    eval_passes: [8]                  # test-time sleep: every run also evaluated at these N
    sleep_rules: [hebbian]            # ablation: the largest N, asleep with another rule

Every run is an ordinary training run under ``runs/<name>/runs/<run>``, so TensorBoard and
``archkit eval`` work on it, and the experiment resumes: finished runs are kept, an
interrupted one continues from its checkpoint. ``report.md``, ``report.png`` and
``summary.json`` aggregate the arms as mean +- standard deviation over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from matplotlib.figure import Figure
from pydantic import Field

from archkit.checkpoint import load_run
from archkit.evaluation import evaluate_run
from archkit.progress import OverallProgress, Tally, trained_fraction
from archkit.spec import Spec, SpecError, StrictModel, load_spec, parse_spec
from archkit.spec_files import read_based_on_spec
from archkit.trainer import train

PositiveInt = Annotated[int, Field(gt=0)]


class Experiment(StrictModel):
    name: str
    extends: Path
    set: dict[str, Any] = Field(default_factory=dict)
    passes: list[PositiveInt] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    tune_lr: list[Annotated[float, Field(gt=0)]] | None = None
    equal_compute: bool = False
    eval_passes: list[PositiveInt] = Field(default_factory=list)
    sleep_rules: list[str] = Field(default_factory=list)

    def spec(self, overrides: dict[str, Any], name: str) -> Spec:
        return load_spec(self.extends, {**self.set, **overrides, "name": name})


@dataclass(frozen=True)
class Arm:
    """One configuration trained once per seed."""

    name: str
    overrides: dict[str, Any]


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    data = read_based_on_spec(path, "an experiment")
    experiment: Experiment = parse_spec(data, path, Experiment)
    for arm in arms(experiment, lr=None):
        try:
            experiment.spec(arm.overrides, arm.name)
        except SpecError as err:
            raise SpecError(f"arm {arm.name}", str(err), file=path) from None
    return experiment


def arm_groups(experiment: Experiment, lr: float | None) -> list[list[Arm]]:
    """The arms in the order they run: one per N, then the equal-compute arms, then the
    sleep-rule ablation. Each group runs on every seed before the next one starts, so a
    study cut short has the main comparison complete first."""
    base = experiment.spec({}, "base")
    assert base.train is not None
    lr_override = {"train.lr": lr} if lr is not None else {}
    deepest = max(experiment.passes)
    return [
        [Arm(f"N{n}", {"sleep.passes": n, **lr_override}) for n in experiment.passes],
        [Arm(f"N1x{n}", {"sleep.passes": 1, "train.steps": base.train.steps * n, **lr_override})
         for n in experiment.passes if n > 1 and experiment.equal_compute],
        [Arm(f"N{deepest}_{rule}", {"sleep.passes": deepest, "sleep.rule": rule, **lr_override})
         for rule in experiment.sleep_rules],
    ]


def arms(experiment: Experiment, lr: float | None) -> list[Arm]:
    return [arm for group in arm_groups(experiment, lr) for arm in group]


def planned_runs(experiment: Experiment) -> dict[str, int]:
    """Every run the experiment trains, by name, with its training steps."""
    base = experiment.spec({}, "base")
    assert base.train is not None
    runs = {f"lr{lr:g}_N1_s{experiment.seeds[0]}": base.train.steps
            for lr in experiment.tune_lr or []}
    for arm in arms(experiment, None):
        for seed in experiment.seeds:
            runs[f"{arm.name}_s{seed}"] = arm.overrides.get("train.steps", base.train.steps)
    return runs


def experiment_tally(root: Path, experiment: Experiment) -> Callable[[], Tally]:
    """Where the experiment stands, read from its runs: finished ones, those under way by
    their trained fraction, the best ``exact`` so far."""
    planned = planned_runs(experiment)

    def tally() -> Tally:
        finals = {name: root / "runs" / name / "final.json" for name in planned}
        done = [json.loads(path.read_text()) for path in finals.values() if path.exists()]
        under_way = sum(trained_fraction(root / "runs" / name, steps)
                        for name, steps in planned.items() if not finals[name].exists())
        return Tally(len(done), len(done) + under_way,
                     max((final["exact"] for final in done), default=None))
    return tally


def run_once(experiment: Experiment, root: Path, name: str, overrides: dict[str, Any],
             verbose: bool, train_missing: bool = True) -> dict[str, Any] | None:
    """Train one run (or resume it, or read it back if finished) and return final.json;
    without ``train_missing``, None for a run that has not finished. ``verbose`` prints
    the run's final evaluation by difficulty."""
    run_dir = root / "runs" / name
    final = run_dir / "final.json"
    if not final.exists() and not train_missing:
        return None
    if not final.exists():
        spec = experiment.spec(overrides, f"{experiment.name}/{name}")
        result = train(spec, run_dir, resume=(run_dir / "checkpoint").exists(),
                       progress=False, final_table=verbose)
        if result.interrupted:
            raise KeyboardInterrupt(f"{name} interrupted; its checkpoint is in {run_dir}")
    return json.loads(final.read_text())


def tuned_lr(experiment: Experiment, root: Path, verbose: bool, train_missing: bool = True
             ) -> float | None:
    """The learning rate with the best N=1 accuracy on the first seed (ties: the first)."""
    if not experiment.tune_lr:
        return None
    seed = experiment.seeds[0]
    finals = {lr: run_once(experiment, root, f"lr{lr:g}_N1_s{seed}",
                           {"sleep.passes": 1, "train.lr": lr, "seed": seed},
                           verbose, train_missing) for lr in experiment.tune_lr}
    scores = {lr: final["exact"] for lr, final in finals.items() if final is not None}
    if len(scores) < len(finals):
        raise SpecError("tune_lr", "the learning-rate runs at N=1 have not all finished; "
                        "run the experiment without --report-only first")
    return max(scores, key=lambda lr: scores[lr])


def run_experiment(experiment: Experiment, runs: Path, progress: bool = True,
                   train_missing: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Train every run the experiment names (``train_missing=False``: only report the
    finished ones) and write the report. ``progress`` shows one bar for the whole
    experiment on stderr, ``verbose`` each run's final table."""
    root = runs / experiment.name
    root.mkdir(parents=True, exist_ok=True)
    with OverallProgress(experiment.name, len(planned_runs(experiment)),
                         experiment_tally(root, experiment), "exact", "runs",
                         enabled=progress and train_missing):
        return _run_all(experiment, root, runs, train_missing, verbose)


def _run_all(experiment: Experiment, root: Path, runs: Path, train_missing: bool,
             verbose: bool) -> dict[str, Any]:
    lr = tuned_lr(experiment, root, verbose, train_missing)
    table: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    runs_in_order = [(arm, seed) for group in arm_groups(experiment, lr)
                     for seed in experiment.seeds for arm in group]
    for arm, seed in runs_in_order:
        name = f"{arm.name}_s{seed}"
        final = run_once(experiment, root, name, {**arm.overrides, "seed": seed}, verbose,
                         train_missing)
        if final is None:
            continue
        row = {"seed": seed, "trained": final}
        for n in experiment.eval_passes:
            row[f"eval_N{n}"] = evaluate_at(root / "runs" / name, n)
        table.setdefault(arm.name, []).append(row)
        summary = {"experiment": experiment.name, "lr": lr,
                   "arms": summarise(table, experiment), "baseline": chance_level(table)}
        write_report(root, summary, experiment, runs)
    return summary


def evaluate_at(run_dir: Path, passes: int) -> dict[str, float]:
    """The run's held-out metrics when it sleeps ``passes`` passes (kept in the run)."""
    path = run_dir / f"eval_N{passes}.json"
    if not path.exists():
        result = evaluate_run(load_run(run_dir, {"sleep.passes": passes}))
        path.write_text(json.dumps(result.metrics(), indent=2))
    return json.loads(path.read_text())


def write_report(root: Path, summary: dict[str, Any], experiment: Experiment, runs: Path
                 ) -> None:
    """Rewritten after every run: the report always covers what has finished."""
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "report.md").write_text(report_markdown(summary, experiment, runs))
    plot_by_difficulty(summary).savefig(root / "report.png", dpi=120, bbox_inches="tight")


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(table: dict[str, list[dict[str, Any]]], experiment: Experiment
              ) -> dict[str, Any]:
    """Per arm: exact match overall and per difficulty as [mean, std] over seeds, for the
    trained N and for every test-time N."""
    arms_summary = {}
    for arm, rows in table.items():
        evaluations = {"trained": [r["trained"] for r in rows]}
        evaluations.update({f"eval_N{n}": [r[f"eval_N{n}"] for r in rows]
                            for n in experiment.eval_passes})
        arms_summary[arm] = {
            where: {key: _mean_std([m[key] for m in metrics])
                    for key in metrics[0] if (key == "exact" or key.startswith("exact/"))
                    and all(key in m for m in metrics)}  # a difficulty every seed scored
            for where, metrics in evaluations.items()
        }
        arms_summary[arm]["seeds"] = [r["seed"] for r in rows]
    return arms_summary


def chance_level(table: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """``baseline`` and ``baseline/<d>`` as [mean, std] over the seeds run (the chance
    level depends on a seed's evaluation set, not on the arm)."""
    by_seed = {row["seed"]: row["trained"] for rows in table.values() for row in rows}
    finals = list(by_seed.values())
    return {key: _mean_std([f[key] for f in finals]) for key in finals[0]
            if key.startswith("baseline") and all(key in f for f in finals)}


def report_markdown(summary: dict[str, Any], experiment: Experiment, runs: Path) -> str:
    arms_summary = summary["arms"]
    first = next(iter(arms_summary.values()))["trained"]
    difficulties = sorted((k for k in first if k != "exact"), key=lambda k: int(k.split("/")[1]))
    head = ["arm", "seeds", "exact", *difficulties]
    lines = [f"Experiment `{experiment.name}` (base `{experiment.extends.name}`, "
             f"lr {summary['lr'] if summary['lr'] is not None else 'from the spec'}); "
             "`exact` (held-out exact match), mean +- std over seeds; the last row is "
             "the chance level (`baseline`, the best constant answers) on the same sets. "
             f"Runs: `{runs / experiment.name}/runs`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def cells(metrics: dict[str, list[float]], prefix: str) -> str:
        return " | ".join(f"{metrics[k][0]:.3f} +- {metrics[k][1]:.3f}" if k in metrics else "-"
                          for k in [prefix, *(f"{prefix}/{d.split('/')[1]}"
                                              for d in difficulties)])

    for arm, result in arms_summary.items():
        for where, metrics in result.items():
            if where == "seeds":
                continue
            label = arm if where == "trained" else f"{arm} at test N={where[6:]}"
            lines.append(f"| {label} | {len(result['seeds'])} | {cells(metrics, 'exact')} |")
    chance = summary.get("baseline", {})
    if chance:
        seeds = len({s for r in arms_summary.values() for s in r["seeds"]})
        lines.append(f"| chance (`baseline`) | {seeds} | {cells(chance, 'baseline')} |")
    return "\n".join(lines) + "\n"


def plot_by_difficulty(summary: dict[str, Any]) -> Figure:
    """Exact match against difficulty, one line per arm, error bars one std over seeds."""
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.subplots()
    count = len(summary["arms"])
    for i, (arm, result) in enumerate(summary["arms"].items()):
        trained = result["trained"]
        keys = sorted((k for k in trained if k != "exact"), key=lambda k: int(k.split("/")[1]))
        dodge = (i - (count - 1) / 2) * 0.08  # side by side, so error bars stay readable
        xs = [int(k.split("/")[1]) + dodge for k in keys]
        ax.errorbar(xs, [trained[k][0] for k in keys], yerr=[trained[k][1] for k in keys],
                    marker="o", capsize=3, label=f"{arm} ({len(result['seeds'])} seeds)")
    chance = summary.get("baseline", {})
    keys = sorted((k for k in chance if k != "baseline"), key=lambda k: int(k.split("/")[1]))
    if keys:
        ax.plot([int(k.split("/")[1]) for k in keys], [chance[k][0] for k in keys],
                linestyle="--", color="grey", marker="_", label="chance (baseline)")
    ax.set_xlabel("difficulty")
    ax.set_ylabel("exact (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(summary["experiment"])
    return figure

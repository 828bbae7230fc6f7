"""Controlled experiments: arms that differ in any spec field, crossed with a grid over one
more field and with seeds, reported with intervals and paired differences.

    name: depth_threshold
    extends: ../specs/rule110_cpu.yaml   # the base spec
    set: {train.threads: 1}              # dotted overrides for every run
    grid: {task.steps: [2, 4, 6]}        # one dotted field: every arm runs at every value
    passes: [1, 2, 4]                    # shorthand: an arm N<n> per value
    arms:                                # more arms, each any dotted fields
      N1_deep: {sleep.passes: 1, model.pattern: AGAG}
    reference: N1                        # differences are arm - reference (default: first)
    seeds: [0, 1, 2, 3, 4]
    equal_compute: true                  # an arm N1x<n>: N = 1 at n x the steps, per n > 1,
                                         # without train.until (it uses every step)
    tune_lr: {lr: [1.0e-3, 2.0e-3, 4.0e-3], adamw_lr: [1.0e-3, 4.0e-3]}
    eval_passes: [8]                     # test-time sleep: every run also evaluated at these N
    sleep_rules: [hebbian]               # ablation: the largest N, asleep with another rule
    margin: 0.1                          # t*: the largest grid value an arm solves

How it runs:

1. Learning rates (``tune_lr``; a plain list tunes Muon's ``train.lr`` only): the
   reference arm at the first grid value and the first seed, scored on a validation set
   (``train.eval_seed: validation_seed``) that no reported run is evaluated on. Each rate
   in turn (Muon's, then AdamW's at the chosen Muon rate); a best rate on an edge of its
   list extends the list by one geometric step beyond it, at most ``widen`` times, so the
   chosen rate lies inside what was tried unless the report says otherwise.
2. The arms, group by group (the main arms, then equal compute, then the rule ablation),
   each group on every seed and grid value before the next starts, so a study cut short
   has its main comparison complete. Runs of one seed and grid value answer the same
   held-out questions (the evaluation set depends on the task and the seed only), which is
   what makes differences between arms paired. ``arms`` (``--arms`` on the command line)
   trains only the arms it names; the report covers every finished run of every arm.
3. The report (:mod:`archkit.experiment_report`).

Every run is an ordinary training run under ``runs/<name>/runs/<run>``, so TensorBoard and
``archkit eval`` work on it, and the experiment resumes: finished runs are kept, an
interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from archkit.checkpoint import load_run
from archkit.evaluation import eval_seed, evaluate_run
from archkit.experiment_report import RunResult, write_report
from archkit.progress import OverallProgress, Tally, trained_fraction
from archkit.spec import Spec, SpecError, StrictModel, load_spec, parse_spec
from archkit.spec_files import read_based_on_spec
from archkit.tracking import read_records
from archkit.trainer import train
from archkit.workers import claim, run_in_processes

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
RATES = ("lr", "adamw_lr")
REPORT_LOCK = "report.lock"


class TuneLR(StrictModel):
    """Learning rates to try, each on a validation set of its own."""

    lr: list[PositiveFloat] = Field(min_length=2, description="Muon (or AdamW-only) rates")
    adamw_lr: list[PositiveFloat] | None = Field(
        None, min_length=2, description="AdamW rates for the non-matrix parameters")
    validation_seed: int = Field(
        999_983, description="evaluation seed of the tuning runs; no reported run's")
    widen: Annotated[int, Field(ge=0)] = Field(
        2, description="steps beyond the list's edge at most, per rate")


class Experiment(StrictModel):
    name: str
    extends: Path
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict, max_length=1)
    passes: list[PositiveInt] = Field(default_factory=list)
    arms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    reference: str | None = None
    seeds: list[int] = Field(min_length=1)
    tune_lr: TuneLR | None = None
    equal_compute: bool = False
    eval_passes: list[PositiveInt] = Field(default_factory=list)
    sleep_rules: list[str] = Field(default_factory=list)
    margin: Annotated[float, Field(ge=0, le=1)] = 0.1

    @model_validator(mode="before")
    @classmethod
    def _rate_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tune_lr"), list):
            return {**data, "tune_lr": {"lr": data["tune_lr"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [f"N{n}" for n in self.passes] + list(self.arms)
        if not names:
            raise SpecError("arms", "at least one arm: `passes: [...]` or `arms: {name: ...}`")
        if len(set(names)) < len(names):
            raise SpecError("arms", "arm names must differ from the N<n> arms of passes",
                            names)
        if self.reference is not None and self.reference not in names:
            raise SpecError("reference", f"one of the arms: {', '.join(names)}",
                            self.reference)
        for field, values in self.grid.items():
            if not values:
                raise SpecError(f"grid.{field}", "at least one value")
        return self

    @property
    def grid_field(self) -> str | None:
        return next(iter(self.grid), None)

    def cells(self) -> list[Cell]:
        """The grid's values as cells; one unnamed cell without a grid."""
        field = self.grid_field
        if field is None:
            return [Cell(None, None, "")]
        leaf = field.rsplit(".", 1)[-1]
        return [Cell(field, value, f"{leaf}{_slug(value)}") for value in self.grid[field]]

    def spec(self, overrides: dict[str, Any], name: str) -> Spec:
        return load_spec(self.extends, {**self.set, **overrides, "name": name})


@dataclass(frozen=True)
class Cell:
    """One value of the grid field (``field`` None: no grid)."""

    field: str | None
    value: Any
    label: str

    @property
    def overrides(self) -> dict[str, Any]:
        return {} if self.field is None else {self.field: self.value}

    def run_name(self, arm: str, seed: int) -> str:
        return f"{arm}_{self.label}_s{seed}" if self.label else f"{arm}_s{seed}"


@dataclass(frozen=True)
class Arm:
    """One configuration trained once per seed and grid value."""

    name: str
    overrides: dict[str, Any]


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    data = read_based_on_spec(path, "an experiment")
    experiment: Experiment = parse_spec(data, path, Experiment)
    reported_eval_seeds = set()
    for arm in arms(experiment, {}):
        for cell in experiment.cells():
            try:
                spec = experiment.spec({**arm.overrides, **cell.overrides}, arm.name)
            except SpecError as err:
                raise SpecError(f"arm {arm.name} {cell.label}".strip(), str(err),
                                file=path) from None
            reported_eval_seeds |= {eval_seed(spec.model_copy(update={"seed": seed}))
                                    for seed in experiment.seeds}
    tune = experiment.tune_lr
    if tune is not None and tune.validation_seed in reported_eval_seeds:
        raise SpecError("tune_lr.validation_seed", "a seed no reported run is evaluated on",
                        tune.validation_seed, file=path)
    return experiment


def reference_arm(experiment: Experiment) -> str:
    return experiment.reference or ([f"N{n}" for n in experiment.passes]
                                    + list(experiment.arms))[0]


def arm_groups(experiment: Experiment, rates: dict[str, float]) -> list[list[Arm]]:
    """The arms in the order they run: the main arms (passes, then ``arms``), then the
    equal-compute arms, then the sleep-rule ablation; every arm at the tuned ``rates``.

    An equal-compute arm trains without the plateau rule (``train.until``): it asks whether
    N = 1 gets there given n times the steps, which a run stopped at a plateau after a
    fraction of them cannot answer. Reaching ``train.target_exact`` still ends it."""
    base = experiment.spec({}, "base")
    assert base.train is not None and base.sleep is not None
    tuned = {f"train.{rate}": value for rate, value in rates.items()}
    main = [Arm(f"N{n}", {"sleep.passes": n, **tuned}) for n in experiment.passes]
    main += [Arm(name, {**overrides, **tuned}) for name, overrides in experiment.arms.items()]
    sleep_passes = sorted({arm.overrides.get("sleep.passes", base.sleep.passes)
                           for arm in main})
    deepest = max(sleep_passes)
    return [
        main,
        [Arm(f"N1x{n}", {"sleep.passes": 1, "train.steps": base.train.steps * n,
                         "train.until": None, **tuned})
         for n in sleep_passes if n > 1 and experiment.equal_compute],
        [Arm(f"N{deepest}_{rule}", {"sleep.passes": deepest, "sleep.rule": rule, **tuned})
         for rule in experiment.sleep_rules],
    ]


def arms(experiment: Experiment, rates: dict[str, float]) -> list[Arm]:
    return [arm for group in arm_groups(experiment, rates) for arm in group]


def check_arm_names(experiment: Experiment, names: Sequence[str]) -> None:
    """Every name one of the experiment's arms (``--arms``)."""
    known = [arm.name for arm in arms(experiment, {})]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SpecError("--arms", f"names of the experiment's arms: {', '.join(known)}",
                        ",".join(unknown))


def tuning_run_name(rate: str, value: float, seed: int) -> str:
    return f"tune_{rate}{value:g}_s{seed}"


def planned_runs(experiment: Experiment) -> dict[str, int]:
    """Every run the experiment trains, by name, with its training steps (tuning runs
    beyond the lists' edges are not known in advance)."""
    base = experiment.spec({}, "base")
    assert base.train is not None
    tune, seed = experiment.tune_lr, experiment.seeds[0]
    runs = {}
    for rate in RATES:
        for value in (getattr(tune, rate) or []) if tune is not None else []:
            runs[tuning_run_name(rate, value, seed)] = base.train.steps
    for arm in arms(experiment, {}):
        for cell in experiment.cells():
            for seed in experiment.seeds:
                runs[cell.run_name(arm.name, seed)] = arm.overrides.get("train.steps",
                                                                        base.train.steps)
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


def tune_rates(experiment: Experiment, root: Path, verbose: bool, train_missing: bool = True
               ) -> tuple[dict[str, float], dict[str, Any]]:
    """The tuned rates ({} without ``tune_lr``) and what was tried: per rate, the
    validation ``exact`` of every value and the step its run stopped at, the chosen one
    and whether it is on an edge. The best rate has the highest ``exact``; among equal
    ones (runs that all reached ``train.target_exact``, say), the one that stopped first,
    having got there in fewer steps."""
    tune = experiment.tune_lr
    if tune is None:
        return {}, {}
    seed, cell = experiment.seeds[0], experiment.cells()[0]
    reference = next(a for a in arms(experiment, {}) if a.name == reference_arm(experiment))
    chosen: dict[str, float] = {}
    tried: dict[str, Any] = {}
    for rate in RATES:
        values = sorted(getattr(tune, rate) or [])
        if not values:
            continue
        scores: dict[float, tuple[float, int]] = {}  # (exact, -step it stopped at)
        widened = 0
        while True:
            jobs = [(tuning_run_name(rate, value, seed),
                     {**reference.overrides, **cell.overrides, "seed": seed,
                      "train.eval_seed": tune.validation_seed,
                      **{f"train.{r}": v for r, v in chosen.items()},
                      f"train.{rate}": value}) for value in values if value not in scores]
            finals = dict(settle(experiment, root, jobs, verbose, train_missing))
            if len(finals) < len(jobs):
                raise SpecError("tune_lr", "the learning-rate runs have not all "
                                "finished; run the experiment without --report-only")
            for index, final in finals.items():
                name, overrides = jobs[index]
                stopped_at = last_evaluated_step(root / "runs" / name) or 0
                scores[overrides[f"train.{rate}"]] = (final["exact"], -stopped_at)
            beyond = beyond_edge(values, scores)
            if beyond is None or widened == tune.widen:
                break
            values = sorted([*values, beyond])
            widened += 1
        best = max(values, key=lambda v: scores[v])
        chosen[rate] = best
        tried[rate] = {"validation_exact": {f"{v:g}": scores[v][0] for v in values},
                       "stopped_at": {f"{v:g}": -scores[v][1] for v in values},
                       "chosen": best, "at_edge": beyond is not None}
    return chosen, {"validation_seed": tune.validation_seed, **tried}


def beyond_edge(values: list[float], scores: dict[float, Any]) -> float | None:
    """When the best-scoring of ``values`` (sorted; ties go to the smaller rate) is the
    smallest or the largest, the next rate to try: one geometric step beyond it, the
    step of its neighbour; None when the best lies inside."""
    best = max(values, key=lambda v: scores[v])
    if best == values[0]:
        return best * values[0] / values[1]
    if best == values[-1]:
        return best * values[-1] / values[-2]
    return None


def run_experiment(experiment: Experiment, runs: Path, progress: bool = True,
                   train_missing: bool = True, verbose: bool = False, workers: int = 1,
                   only: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every run the experiment names (``train_missing=False``: only report the
    finished ones; ``only``: train the runs of these arms and the tuning runs, report the
    finished runs of the others) and write the report. ``workers`` > 1 trains that many
    runs at once, each in a process of its own; ``progress`` shows one bar for the whole
    experiment on stderr, ``verbose`` each run's final table."""
    if only is not None:
        check_arm_names(experiment, only)
    root = runs / experiment.name
    root.mkdir(parents=True, exist_ok=True)
    with OverallProgress(experiment.name, len(planned_runs(experiment)),
                         experiment_tally(root, experiment), "exact", "runs",
                         enabled=progress and train_missing):
        if workers > 1 and train_missing:
            run_in_processes(_worker, [(experiment, root, runs, verbose, only)] * workers)
        return _run_all(experiment, root, runs, train_missing, verbose, only)


def _worker(experiment: Experiment, root: Path, runs: Path, verbose: bool,
            only: Sequence[str] | None) -> None:
    with contextlib.suppress(KeyboardInterrupt):  # the parent says so, once
        _run_all(experiment, root, runs, True, verbose, only)


def _run_all(experiment: Experiment, root: Path, runs: Path, train_missing: bool,
             verbose: bool, only: Sequence[str] | None = None) -> dict[str, Any]:
    rates, tuning = tune_rates(experiment, root, verbose, train_missing)
    header = experiment_header(experiment, rates, tuning)
    planned = [(arm, cell, seed) for group in arm_groups(experiment, rates)
               for seed in experiment.seeds for cell in experiment.cells() for arm in group]
    jobs = [(cell.run_name(arm.name, seed), {**arm.overrides, **cell.overrides, "seed": seed})
            for arm, cell, seed in planned]
    chosen = [only is None or arm.name in only for arm, _, _ in planned]
    trained = [i for i, train_it in enumerate(chosen) if train_it]
    reported = [i for i, train_it in enumerate(chosen) if not train_it]
    results: dict[int, RunResult] = {}  # by index in ``planned``: the report's order
    summary: dict[str, Any] = {}
    for indices, train_these in ((trained, train_missing), (reported, False)):
        for position, final in settle(experiment, root, [jobs[i] for i in indices], verbose,
                                      train_these):
            index = indices[position]
            arm, cell, seed = planned[index]
            run_dir = root / "runs" / jobs[index][0]
            results[index] = RunResult(
                arm.name, cell.label, cell.value, seed, final,
                {n: evaluate_at(run_dir, n) for n in experiment.eval_passes},
                last_evaluated_step(run_dir),
                hashlib.sha256((run_dir / "eval_set.json").read_bytes()).hexdigest())
            with claim(root / REPORT_LOCK, wait=True):
                summary = write_report(root, runs, header,
                                       [results[i] for i in sorted(results)])
    return summary


def settle(experiment: Experiment, root: Path, jobs: Sequence[tuple[str, dict[str, Any]]],
           verbose: bool, train_missing: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """The final.json of each job (run name, overrides) with its index, training it where
    needed (``train_missing``; otherwise finished runs only). Other processes on the same
    experiment may train some of the jobs: a job is claimed while it trains, so this
    process goes on to the next free one and comes back to the claimed ones at the end,
    waiting for each (and training it, when its process died before it finished)."""
    claimed_elsewhere = []
    for index, (name, overrides) in enumerate(jobs):
        if not train_missing:
            final = run_once(experiment, root, name, overrides, verbose, train_missing)
            if final is not None:
                yield index, final
            continue
        with claim(_claim_path(root, name), wait=False) as mine:
            if mine:
                yield index, run_once(experiment, root, name, overrides, verbose)
        if not mine:
            claimed_elsewhere.append(index)
    for index in claimed_elsewhere:
        name, overrides = jobs[index]
        with claim(_claim_path(root, name), wait=True):
            yield index, run_once(experiment, root, name, overrides, verbose)


def _claim_path(root: Path, name: str) -> Path:
    return root / "claims" / f"{name}.lock"


def experiment_header(experiment: Experiment, rates: dict[str, float],
                      tuning: dict[str, Any]) -> dict[str, Any]:
    """What the report says about the experiment itself."""
    return {"experiment": experiment.name, "base": experiment.extends.name,
            "grid_field": experiment.grid_field,
            "grid": [cell.label for cell in experiment.cells()],
            "reference": reference_arm(experiment), "margin": experiment.margin,
            "rates": rates, "tuning": tuning}


def last_evaluated_step(run_dir: Path) -> int | None:
    """The step of the run's last evaluation in ``metrics.jsonl`` (where it stopped)."""
    evaluations = read_records(run_dir, "eval")
    return evaluations[-1]["step"] if evaluations else None


def evaluate_at(run_dir: Path, passes: int) -> dict[str, float]:
    """The run's held-out metrics when it sleeps ``passes`` passes (kept in the run)."""
    path = run_dir / f"eval_N{passes}.json"
    if not path.exists():
        result = evaluate_run(load_run(run_dir, {"sleep.passes": passes}))
        path.write_text(json.dumps(result.metrics(), indent=2))
    return json.loads(path.read_text())

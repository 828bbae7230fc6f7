"""Search spaces: a base spec, the dotted spec fields to vary, objectives and a budget.

    name: sleep_n                       # default: the file's stem; results in runs/<name>/
    extends: ../specs/rule110_cpu.yaml  # the base spec every trial starts from
    set: {train.eval_every: 300}        # fixed overrides for every trial
    params:
      sleep.passes: {choices: [1, 2, 4]}
      train.lr: {float: [1.0e-4, 1.0e-2], log: true}
      model.d_model: {int: [32, 128], step: 32}
    objectives:                         # default: maximise exact, minimise wake latency
      - {metric: exact}                 # any archkit.metrics name a trial records;
      - {metric: wake_ms_per_token}     # the direction defaults to the metric's
    columns: [wake_repeat_spread, params]   # more metrics for pareto.csv and the table
    budget: {trials: 3, steps: 1200, wall_minutes: 15}
    sampler: grid                       # tpe | nsga2 | random | grid
    seed: 0

A trial's spec is the base spec with ``set``, ``budget.steps`` and the sampled ``params``
applied as dotted overrides, validated like any spec before it runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from archkit.metrics import Metric, UnknownMetric, lookup, recorded_by_trials
from archkit.spec import Spec, SpecError, StrictModel, load_spec, parse_spec
from archkit.spec_files import read_based_on_spec

PRIMITIVE = (str, int, float, bool, type(None))
PositiveInt = Annotated[int, Field(gt=0)]


class Choices(StrictModel):
    choices: list[Any] = Field(min_length=1)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        labels = self.labels()
        picked = trial.suggest_categorical(name, labels)
        return picked if labels is self.choices else json.loads(str(picked))

    def labels(self) -> list[Any]:
        """What Optuna stores: the values themselves, or JSON text when they are lists or
        mappings (Optuna's categorical values must be scalars)."""
        if all(isinstance(c, PRIMITIVE) for c in self.choices):
            return self.choices
        return [json.dumps(c) for c in self.choices]

    def values(self) -> list[Any]:
        return self.choices


class IntRange(StrictModel):
    bounds: tuple[int, int] = Field(alias="int")
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        _check_bounds(*self.bounds, self.log)
        if self.log and self.step != 1:
            raise ValueError("a log-scaled int range takes no step")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, *self.bounds, step=self.step, log=self.log)

    def values(self) -> list[int]:
        return list(range(self.bounds[0], self.bounds[1] + 1, self.step))


class FloatRange(StrictModel):
    bounds: tuple[float, float] = Field(alias="float")
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        _check_bounds(*self.bounds, self.log)
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, *self.bounds, log=self.log)

    def values(self) -> list[float]:
        return list(self.bounds)


def _check_bounds(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"the range [{low}, {high}] is empty: low must not exceed high")
    if log and low <= 0:
        raise ValueError("a log-scaled range must be positive")


def _param_kind(value: Any) -> str | None:
    kinds = {Choices: "choices", IntRange: "int", FloatRange: "float"}
    if isinstance(value, dict):
        return next((k for k in kinds.values() if k in value), None)
    return kinds.get(type(value))


Param = Annotated[
    Annotated[Choices, Tag("choices")] | Annotated[IntRange, Tag("int")]
    | Annotated[FloatRange, Tag("float")],
    Discriminator(_param_kind, custom_error_type="param_kind",
                  custom_error_message="a parameter is {choices: [...]}, {int: [low, high]} "
                                       "or {float: [low, high]}"),
]


def trial_metric(name: str) -> Metric:
    """The vocabulary's row for ``name``, if a search trial records it; else ValueError
    naming the closest metric."""
    try:
        metric = lookup(name)
    except UnknownMetric as err:
        raise ValueError(str(err)) from None
    if not recorded_by_trials(metric):
        raise ValueError(f"{name!r} is a {'/'.join(metric.sources)} metric; a search trial "
                         "records evaluation, bench and card metrics")
    return metric


class Objective(StrictModel):
    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _known(self) -> Objective:
        metric = trial_metric(self.metric)
        if self.direction is None:
            if metric.direction is None:
                raise ValueError(f"{self.metric!r} has no natural direction; give one")
            self.direction = metric.direction
        return self


def _trial_column(name: str) -> str:
    trial_metric(name)
    return name


Column = Annotated[str, AfterValidator(_trial_column)]


class Budget(StrictModel):
    trials: PositiveInt = 3
    steps: PositiveInt | None = Field(None, description="training steps per trial "
                                                        "(default: the base spec's)")
    wall_minutes: float | None = Field(None, gt=0, description="start no trial after this")


class BenchSettings(StrictModel):
    repeats: PositiveInt = 3
    decode: PositiveInt | None = Field(
        None, description="decode steps timed (default: across 4 wake-window boundaries)")


class AshaSettings(StrictModel):
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 2


class RaySettings(StrictModel):
    asha: AshaSettings | None = None


class SearchSpace(StrictModel):
    name: str
    extends: Path
    set: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Param] = Field(min_length=1)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="exact"),
                                 Objective(metric="wake_ms_per_token")], min_length=1)
    columns: list[Column] = Field(
        default_factory=lambda: ["baseline", "wake_repeat_spread", "params"],
        description="metrics shown beside the objectives in pareto.csv and the front table")
    budget: Budget = Budget()
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    seed: int = 0
    threads: PositiveInt | None = Field(None, description="CPU threads per trial (default: "
                                                          "the machine's cores / workers)")
    trial_workers: PositiveInt = Field(
        1, description="training processes per trial (ranks of one data-parallel run); "
                       "above 1, the ray backend runs each trial as a Ray Train TorchTrainer")
    bench: BenchSettings = BenchSettings()
    ray: RaySettings = RaySettings()

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        if self.ray.asha is not None and len(self.objectives) > 1:
            raise SpecError("ray.asha", "ASHA early stopping needs a single objective")
        if self.sampler == "grid":
            for key, param in self.params.items():
                if isinstance(param, FloatRange):
                    raise SpecError(f"params.{key}", "the grid sampler takes choices or int "
                                                     "ranges, not float ranges")
        return self

    @property
    def directions(self) -> list[str]:
        return [str(o.direction) for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        """The objectives' metrics, in order."""
        return [o.metric for o in self.objectives]

    @property
    def shown_metrics(self) -> list[str]:
        """The objectives' metrics, then the columns that are not objectives."""
        return [*self.metrics, *(c for c in self.columns if c not in self.metrics)]

    def grid(self) -> dict[str, list[Any]]:
        return {key: p.labels() if isinstance(p, Choices) else p.values()
                for key, p in self.params.items()}

    def trials(self) -> int:
        """The budget, capped at the grid's size for the grid sampler."""
        if self.sampler != "grid":
            return self.budget.trials
        return min(self.budget.trials, math.prod(len(v) for v in self.grid().values()))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run: draw every parameter through ``trial``."""
        return {key: param.suggest(trial, key) for key, param in self.params.items()}

    def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Parameter values from what Optuna stored (JSON text for list choices)."""
        params = {}
        for key, value in raw.items():
            param = self.params[key]
            is_json = isinstance(param, Choices) and param.labels() is not param.choices
            params[key] = json.loads(value) if is_json else value
        return params

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        steps = {"train.steps": self.budget.steps} if self.budget.steps else {}
        return {**self.set, **steps, **params}

    def steps_per_trial(self) -> int:
        """Training steps of a trial: the budget's, else the base spec's."""
        train = self.trial_spec({}, self.name).train
        assert train is not None
        return train.steps

    def trial_spec(self, params: dict[str, Any], name: str, threads: int | None = None) -> Spec:
        threads_override = {"train.threads": threads} if threads else {}
        return load_spec(self.extends,
                         {**self.overrides(params), "name": name, **threads_override})

    def make_sampler(self, draw: int = 0) -> optuna.samplers.BaseSampler:
        """The space's sampler for proposing trial number ``draw``. Workers are separate
        processes, each with its own sampler: seeded alike, they would all propose the same
        first trials (TPE, NSGA-II and random start with random draws), so those are seeded
        by the space's seed and ``draw``, and trial n's proposal depends only on the seed and
        the trials before it, whoever asks. The grid sampler keeps the space's seed: it
        shuffles the grid once with it and gives trial n the n-th point, so every worker
        must shuffle alike."""
        if self.sampler == "grid":
            return BudgetedGridSampler(self.grid(), seed=self.seed)
        seed = int(np.random.SeedSequence([self.seed, draw]).generate_state(1)[0])
        if self.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def canonical(self) -> str:
        """The space as JSON text; a resumed search must find the same one."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)


class BudgetedGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` once the grid is used up: that
    call only works inside ``study.optimize``, and both backends ask and tell instead. The
    budget, capped at the grid's size, ends the search."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        return None


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None,
               name: str | None = None) -> SearchSpace:
    """Read and validate a search space; every parameter must give a valid spec for at least
    one of its values, so that a misspelt field fails here and not trial by trial.
    ``overrides`` (dotted spec keys) join the space's ``set``; ``name`` renames it."""
    path = Path(path)
    data = read_based_on_spec(path, "a search space")
    if overrides:
        data["set"] = {**(data.get("set") or {}), **overrides}
    if name is not None:
        data["name"] = name
    space: SearchSpace = parse_spec(data, path, SearchSpace)
    try:
        base = space.trial_spec({}, space.name)
    except SpecError as err:
        raise SpecError("extends", f"the base spec with `set` and the budget is invalid: {err}",
                        str(space.extends), file=path) from None
    for section in ("sleep", "task", "train"):
        if getattr(base, section) is None:
            raise SpecError("extends", f"the base spec needs a `{section}:` section",
                            str(space.extends), file=path)
    for key, param in space.params.items():
        _check_param(space, key, param.values(), path)
    return space


def _check_param(space: SearchSpace, key: str, values: list[Any], file: Path) -> None:
    first: SpecError | None = None
    for value in values:
        try:
            space.trial_spec({key: value}, space.name)
            return
        except SpecError as err:
            first = first or err
    assert first is not None
    raise SpecError(f"params.{key}", f"no value gives a valid spec; with {values[0]!r}: "
                    f"{first.path}: {first.expected}", file=file)


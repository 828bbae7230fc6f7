"""The Python front door, exported from ``archkit``: what the CLI does, as functions.

    import archkit

    spec = archkit.load_spec("specs/rule110_cpu.yaml", overrides={"sleep.passes": 2})
    model = archkit.build(spec)                        # a SleepingModel
    run = archkit.train(spec, name="n2")               # trains into runs/n2, returns a Run
    run = archkit.load_run("runs/n2")                  # .spec .model .task .final
    metrics = archkit.evaluate(run, passes=4)          # == archkit eval runs/n2 --passes 4
    trials = archkit.search("search_spaces/sleep_n.yaml")   # a pandas DataFrame

Metric names are ``archkit.metrics``'. The heavy modules (the trainer, the search
backends) load on first use, so ``import archkit`` stays quick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archkit.spec import Spec, SpecError, load_spec, with_overrides

if TYPE_CHECKING:
    import pandas

    from archkit.checkpoint import Run
    from archkit.sleep import SleepingModel
    from archkit.tasks import Task

__all__ = ["build", "evaluate", "load_run", "load_spec", "search", "train"]


def _spec(spec_or_path: Spec | str | Path, overrides: Mapping[str, Any] | None) -> Spec:
    if isinstance(spec_or_path, Spec):
        return with_overrides(spec_or_path, overrides) if overrides else spec_or_path
    return load_spec(spec_or_path, overrides)


def build(spec_or_path: Spec | str | Path, overrides: Mapping[str, Any] | None = None
          ) -> SleepingModel:
    """The spec's sleeping model, initialised from its seed (as training starts it)."""
    from archkit.sleep import SleepingModel

    return SleepingModel.from_spec(_spec(spec_or_path, overrides))


def load_run(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> Run:
    """A trained run: ``.spec``, ``.model`` (weights loaded, eval mode), ``.task`` and
    ``.final`` (its final metrics, None until it finishes)."""
    from archkit.checkpoint import load_run as load

    return load(run_dir, overrides)


def train(spec_or_path: Spec | str | Path, overrides: Mapping[str, Any] | None = None, *,
          name: str | None = None, runs: str | Path = "runs", resume: bool = False,
          progress: bool = True) -> Run:
    """Train into ``runs/<name>`` (default: the spec's name), as ``archkit train`` does, and
    return the run. Ctrl-C saves a checkpoint and raises KeyboardInterrupt; ``resume``
    continues it."""
    from archkit.checkpoint import load_run as load
    from archkit.trainer import train as train_spec

    spec = _spec(spec_or_path, overrides)
    run_dir = Path(runs) / (name or spec.name)
    result = train_spec(spec, run_dir, resume=resume, progress=progress)
    if result.interrupted:
        raise KeyboardInterrupt(f"interrupted; the checkpoint is in {run_dir}")
    return load(run_dir)


def evaluate(run_or_model: Run | SleepingModel, task: Task | None = None, *,
             passes: int | None = None, seed: int | None = None, eval_size: int | None = None
             ) -> dict[str, float]:
    """Held-out metrics (``exact``, ``per_answer``, per difficulty, ``loss``), as
    ``archkit eval --json`` prints them.

    A run is evaluated on its own evaluation set and task unless ``task``, ``seed`` or
    ``eval_size`` say otherwise; a bare model needs ``task``. ``passes`` sleeps N passes
    instead of the trained N.
    """
    from archkit.checkpoint import Run
    from archkit.evaluation import evaluate_run

    if isinstance(run_or_model, Run):
        run = run_or_model
    elif task is None:
        raise SpecError("task", "a task to evaluate a bare model on, e.g. "
                        "archkit.tasks.get_task('rule110')")
    else:
        spec = Spec(name="model", model=run_or_model.model.spec, sleep=run_or_model.sleep)
        run = Run(Path("."), spec, run_or_model, task, None)
    if passes is not None:
        run = _sleeping_longer(run, passes)
    if task is not None:
        run = dataclasses.replace(run, task=task)
    return evaluate_run(run, seed, eval_size).metrics()


def _sleeping_longer(run: Run, passes: int) -> Run:
    """The run with its weights shared and its spec set to sleep ``passes`` passes."""
    from archkit.sleep import SleepingModel

    spec = _spec(run.spec, {"sleep.passes": passes})
    assert spec.sleep is not None
    model = SleepingModel(run.model.model, spec.sleep).eval()
    return dataclasses.replace(run, spec=spec, model=model)


def search(space_path: str | Path, *, runs: str | Path = "runs", backend: str = "optuna",
           workers: int | None = None, address: str | None = None, progress: bool = True,
           storage: str | None = None, verbose: bool = False) -> pandas.DataFrame:
    """Run (or resume) a search as ``archkit search`` does (``workers`` None: one per free
    core); return every finished trial as a DataFrame: ``trial``, ``state``, ``on_front``,
    ``reason``, one column per parameter (``params.<key>``) and per recorded metric."""
    import pandas

    from archkit.searching import front_of, load_search, load_space, run_search

    space = load_space(space_path)
    run_search(space, Path(runs), backend, workers, address, progress, storage, verbose)
    _, results = load_search(Path(runs) / space.name)
    on_front = {r["trial"] for r in front_of(results, space.metrics, space.directions)}
    rows = [{"trial": r["trial"], "state": r["state"], "on_front": r["trial"] in on_front,
             "reason": r.get("reason"),
             **{f"params.{k}": v for k, v in r["params"].items()}, **r["metrics"]}
            for r in results]
    return pandas.DataFrame(rows)

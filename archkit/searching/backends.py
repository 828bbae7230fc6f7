"""The search backends by name, and the one call every backend answers.

A backend is a module with ``run(job: SearchJob) -> None`` that runs trials of
``job.space`` (with ``archkit.searching.trial.run_trial``) until the budget is used or
``job.deadline`` has passed, leaving each trial's ``result.json`` under
``job.root / "trials"``. To add one, write the module and name it in :data:`BACKENDS`;
``archkit search --backend`` offers every name here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # backends.py stays light: the CLI reads BACKENDS for --backend
    from archkit.searching.space import SearchSpace

BACKENDS: dict[str, str] = {
    "optuna": "archkit.searching.optuna_backend",  # embedded, a study file on disk
    "ray": "archkit.searching.ray_backend",  # Ray Tune, on a local or remote cluster
}


@dataclass(frozen=True)
class SearchJob:
    space: SearchSpace
    root: Path  # runs/<name>
    workers: int | None  # local worker processes asked for (--workers; None: auto)
    address: str | None  # a cluster to join (--address)
    verbose: bool  # each trial's live bar and final table by difficulty
    deadline: float | None  # time.time() after which no trial starts
    storage: str | None = None  # an Optuna storage URL (None: root/study.journal)


def run_backend(name: str, job: SearchJob) -> None:
    importlib.import_module(BACKENDS[name]).run(job)

"""Architecture search: a search-space YAML -> trials on Optuna or Ray Tune -> Pareto fronts.

    space.py      the search-space YAML (params, objectives, columns, budget, sampler)
    trial.py      one trial, whatever the backend: validate, measure, train, record
    backends.py   the backends by name; optuna_backend.py, ray_backend.py
    run.py        run_search / load_search: one search directory, resumable
    pareto.py     fronts, pareto.csv, pareto.png, the TensorBoard front

The names below load on first use (the backends pull in Optuna, Ray, matplotlib).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "SearchSpace": "space", "load_space": "space",
    "run_search": "run", "load_search": "run", "SearchInterrupted": "run",
    "front_of": "pareto", "front_table": "pareto", "pareto_front": "pareto",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)

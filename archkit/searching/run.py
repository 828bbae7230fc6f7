"""Running a search: claim ``runs/<name>``, hand the trials to a backend, write the front.

``runs/<name>/`` holds everything: ``search.json`` (the space, so that a rerun resumes only
the same search), the study (``study.journal`` or ``ray/``), one run directory per trial
under ``trials/`` (TensorBoard curves, checkpoint, ``result.json``), ``pareto.csv``,
``pareto.png`` and the TensorBoard front under ``front/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from archkit.searching.backends import SearchJob, run_backend
from archkit.searching.pareto import write_reports
from archkit.searching.space import SearchSpace
from archkit.searching.trial import load_results
from archkit.spec import SpecError

SEARCH_FILE = "search.json"

def run_search(space: SearchSpace, runs: Path, backend: str = "optuna", workers: int = 1,
               address: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) ``space`` into ``runs/<name>``; return the Pareto front."""
    root = runs / space.name
    root.mkdir(parents=True, exist_ok=True)
    _claim(root, space, backend)
    wall = space.budget.wall_minutes
    deadline = time.time() + wall * 60 if wall else None
    run_backend(backend, SearchJob(space, root, workers, address, progress, deadline))
    results = load_results(root)
    front = write_reports(root, results, space)
    if len(results) < space.trials() and (deadline is None or time.time() < deadline):
        raise SearchInterrupted(f"{len(results)} of {space.trials()} trials finished")
    return front


class SearchInterrupted(KeyboardInterrupt):
    """The backend stopped before the budget was used (Ray Tune handles Ctrl-C itself and
    returns): finished trials are kept and a rerun resumes."""


def _claim(root: Path, space: SearchSpace, backend: str) -> None:
    """Record the search in ``root``, or check that a rerun is the same search."""
    path = root / SEARCH_FILE
    record = {"backend": backend, "space": json.loads(space.canonical())}
    if not path.exists():
        path.write_text(json.dumps(record, indent=2))
        return
    saved = json.loads(path.read_text())
    if saved["backend"] != backend:
        raise SpecError("--backend", f"{root} holds a {saved['backend']} search; resume it "
                        f"with --backend {saved['backend']}, or give this search another name",
                        backend)
    if saved["space"] != record["space"]:
        changed = sorted(k for k in record["space"]
                         if record["space"][k] != saved["space"].get(k))
        raise SpecError(", ".join(changed), f"{root} holds a search over a different space; "
                        "to start afresh, give the space another `name:` or remove the "
                        "directory", file=path)


def load_search(root: Path) -> tuple[SearchSpace, list[dict[str, Any]]]:
    """A search directory's space and trial records, for ``archkit pareto``."""
    path = root / SEARCH_FILE
    if not path.exists():
        raise SpecError("", f"not a search directory: no {SEARCH_FILE} in {root}", file=root)
    saved = json.loads(path.read_text())
    return SearchSpace.model_validate(saved["space"]), load_results(root)

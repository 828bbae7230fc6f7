"""Running a search: claim ``runs/<name>``, hand the trials to a backend, write the front.

``runs/<name>/`` holds everything: ``search.json`` (a snapshot of the space and of its
resolved base spec, so that a rerun resumes only the same search), the study
(``study.journal``, an Optuna storage URL named by ``--storage``, or ``ray/``), one run
directory per trial under ``trials/`` (TensorBoard curves, checkpoint, ``result.json``),
``pareto.csv``, ``pareto.png`` and the TensorBoard front under ``front/``.

A rerun may raise ``budget.trials`` (``--trials``) or change ``budget.wall_minutes``;
anything else that changes what a trial would train (the space, or the base spec's
content, wherever the file now lives) is refused, naming the changed fields.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archkit.progress import OverallProgress, Tally, trained_fraction
from archkit.searching.backends import SearchJob, run_backend
from archkit.searching.pareto import front_of, write_reports
from archkit.searching.space import SearchSpace
from archkit.searching.trial import load_results
from archkit.spec import SpecError
from archkit.spec_files import changed_fields, flatten_dotted

SEARCH_FILE = "search.json"

def run_search(space: SearchSpace, runs: Path, backend: str = "optuna",
               workers: int | None = None, address: str | None = None, progress: bool = True,
               storage: str | None = None, verbose: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) ``space`` into ``runs/<name>``; return the Pareto front. ``workers``
    None picks as many as there are free cores (optuna backend); ``storage`` is an Optuna
    storage URL (default: the journal file ``runs/<name>/study.journal``), and a rerun
    uses the one the search was started with. ``progress`` shows one bar for the whole
    search on stderr, ``verbose`` each trial's final table."""
    root = runs / space.name
    if root.exists() and not root.is_dir():
        raise SpecError("--runs", f"{root} is a file, not a directory for the search", str(runs))
    root.mkdir(parents=True, exist_ok=True)
    storage = _claim(root, space, backend, storage)
    wall = space.budget.wall_minutes
    deadline = time.time() + wall * 60 if wall else None
    with OverallProgress(space.name, space.trials(), search_tally(root, space),
                         space.metrics[0], "trials", enabled=progress):
        run_backend(backend, SearchJob(space, root, workers, address, verbose, deadline,
                                       storage))
    results = load_results(root)
    front = write_reports(root, results, space)
    if len(results) < space.trials() and (deadline is None or time.time() < deadline):
        raise SearchInterrupted(f"{len(results)} of {space.trials()} trials finished")
    return front


def search_tally(root: Path, space: SearchSpace) -> Callable[[], Tally]:
    """Where the search stands, read from its directory: finished trials, those under way
    by their trained fraction, the best first objective of the complete ones."""
    steps = space.steps_per_trial()
    metric, direction = space.metrics[0], space.directions[0]

    def tally() -> Tally:
        results = load_results(root)
        done = {r["trial"] for r in results}
        under_way = [d for d in (root / "trials").glob("*") if d.is_dir() and d.name not in done]
        values = [r["metrics"][metric] for r in results
                  if r["state"] == "complete" and metric in r["metrics"]]
        best = (max if direction == "maximize" else min)(values) if values else None
        return Tally(len(results), len(results) + sum(trained_fraction(d, steps)
                                                      for d in under_way), best)
    return tally


class SearchInterrupted(KeyboardInterrupt):
    """The backend stopped before the budget was used (Ray Tune handles Ctrl-C itself and
    returns): finished trials are kept and a rerun resumes."""


RESUMABLE = ("budget.trials", "budget.wall_minutes")  # a rerun may change these


def snapshot(space: SearchSpace) -> dict[str, Any]:
    """What identifies a search: the space's fields (but where its base spec lies, and the
    budget's trial count and wall time) and the base spec's resolved content, hashed."""
    base = space.trial_spec({}, space.name).model_dump(mode="json")
    return {"space_fields": _comparable(json.loads(space.canonical())), "base_spec": base,
            "base_spec_sha256": hashlib.sha256(
                json.dumps(base, sort_keys=True).encode()).hexdigest()}


def _comparable(space: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten_dotted(space).items()
            if k != "extends" and k not in RESUMABLE}


def _claim(root: Path, space: SearchSpace, backend: str, storage: str | None) -> str | None:
    """Record the search in ``root``, or check that a rerun is the same search; return the
    storage URL to use (None: the default journal file)."""
    path = root / SEARCH_FILE
    now = {"space": json.loads(space.canonical()), **snapshot(space)}
    if not path.exists():
        path.write_text(json.dumps({"backend": backend, "storage": storage, **now}, indent=2))
        return storage
    saved = json.loads(path.read_text())
    if saved["backend"] != backend:
        raise SpecError("--backend", f"{root} holds a {saved['backend']} search; resume it "
                        f"with --backend {saved['backend']}, or give this search another name",
                        backend)
    if storage is not None and storage != saved.get("storage"):
        raise SpecError("--storage", f"{root} holds a study in "
                        f"{saved.get('storage') or 'its study.journal'}; resume it without "
                        "--storage", storage)
    before = saved.get("space_fields") or _comparable(saved["space"])
    _refuse_changes(path, "space", before, now["space_fields"])
    if "base_spec" in saved:  # searches recorded before snapshots adopt the current one
        _refuse_changes(path, "base spec", saved["base_spec"], now["base_spec"])
    path.write_text(json.dumps({**saved, **now}, indent=2))  # the budget may have grown
    return saved.get("storage")


def _refuse_changes(path: Path, what: str, before: dict[str, Any], now: dict[str, Any]
                    ) -> None:
    """Refuse a rerun whose ``what`` (trees of fields) changed, naming the fields."""
    changes = changed_fields(before, now)
    changed = sorted(changes)
    if changed:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise SpecError(", ".join(changed[:4]), f"{path.parent} holds a search whose {what} "
                        f"differs ({shown}{more}); to start afresh, give the space another "
                        "`name:` or remove the directory", file=path)


def load_search(root: Path) -> tuple[SearchSpace, list[dict[str, Any]]]:
    """A search directory's space and trial records, for ``archkit pareto``."""
    path = root / SEARCH_FILE
    if not path.exists():
        raise SpecError("", f"not a search directory: no {SEARCH_FILE} in it", file=root)
    saved = json.loads(path.read_text())
    return SearchSpace.model_validate(saved["space"]), load_results(root)


def list_studies(runs: Path) -> list[dict[str, Any]]:
    """Every search under ``runs``: its name, backend, storage, trials by state, budget and
    the size of its front."""
    studies = []
    for path in sorted(runs.glob(f"*/{SEARCH_FILE}")):
        space, results = load_search(path.parent)
        saved = json.loads(path.read_text())
        states = [r["state"] for r in results]
        studies.append({
            "name": space.name, "backend": saved["backend"],
            "storage": saved.get("storage") or "study.journal",
            **{state: states.count(state) for state in ("complete", "failed", "stopped")},
            "budget": space.trials(),
            "on_front": len(front_of(results, space.metrics, space.directions)),
        })
    return studies

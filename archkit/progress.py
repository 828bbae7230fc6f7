"""One progress bar over many training runs (a search's trials, an experiment's runs), on
stderr so that results printed to stdout stay clean.

The bar is fed by reading what the runs leave on disk (``result.json``, ``final.json``,
``metrics.jsonl``) every few seconds, so it sees trials that other processes or other
machines run as well as this process's own, and a run that is half trained counts half.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

TAIL_BYTES = 4096  # enough for the last record of metrics.jsonl


@dataclass(frozen=True)
class Tally:
    """Where many runs stand: ``finished`` runs, ``progress`` in runs (finished ones plus
    the fractions of those under way), and the best value of the watched metric so far."""

    finished: int
    progress: float
    best: float | None


def trained_fraction(run_dir: Path, steps: int) -> float:
    """How far a training run is: its last logged step over ``steps`` (0 before any)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0.0
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        lines = f.read().decode(errors="replace").strip().splitlines()
    try:
        step = json.loads(lines[-1])["step"]
    except (IndexError, ValueError, KeyError):  # empty, or a line being written
        return 0.0
    return min(1.0, step / max(1, steps))


class OverallProgress:
    """A context manager showing ``tally()`` as ``finished/total`` ``unit`` (trials, runs),
    elapsed time, ETA and the best ``metric`` so far, refreshed every ``every_s`` seconds
    from a background thread."""

    def __init__(self, description: str, total: int, tally: Callable[[], Tally], metric: str,
                 unit: str, enabled: bool = True, every_s: float = 2.0) -> None:
        self.tally, self.metric, self.every_s = tally, metric, every_s
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn(f"{{task.fields[finished]}}/{{task.total:.0f}} {unit}"),
            TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("best {task.fields[metric]} {task.fields[best]}"),
            console=Console(stderr=True), disable=not enabled,
            speed_estimate_period=7 * 24 * 3600.0)  # average over the whole run: trials are slow
        start = tally()
        self.task = self.progress.add_task(description, total=total, completed=start.progress,
                                           finished=start.finished, metric=metric,
                                           best=_show(start.best))
        self.enabled, self.stop = enabled, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> OverallProgress:
        if self.enabled:
            self.progress.start()
            self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.refresh()
            self.progress.stop()

    def refresh(self) -> None:
        now = self.tally()
        self.progress.update(self.task, completed=now.progress, finished=now.finished,
                             best=_show(now.best))

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.refresh()
            except (OSError, ValueError):  # a file moved or half written: next time
                continue


def _show(best: float | None) -> str:
    return "-" if best is None else f"{best:.4g}"

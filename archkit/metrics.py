"""The metric vocabulary: every number archkit records, under exactly one name.

``final.json``, ``metrics.jsonl``, ``archkit eval --json``, ``archkit bench --json``,
``archkit build --json``, a search's ``result.json`` and ``pareto.csv``, search objectives
and columns, Optuna and Ray Tune reports all use these names. A name with a ``<field>``
part is a family: ``exact/<difficulty>`` stands for ``exact/1``, ``exact/4``, ...

TensorBoard tags are the same names under a section prefix that says when the number was
taken (:data:`SECTIONS`): ``train/loss``, ``eval/exact``, ``eval/exact/3``,
``final/exact``, ``bench/wake_ms_per_token``.

The table itself is ``metrics.yaml`` beside this module (data, one entry per name); this
module reads it once and imports nothing from archkit, so every layer may use it. To add
a metric, add an entry there; a search may then use it as an objective or a column as soon
as the trial records it (sources ``evaluation``, ``bench`` and ``card`` are recorded).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

import yaml

Direction = Literal["maximize", "minimize"]
Source = Literal["evaluation", "training", "bench", "card", "search"]


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "exact", or a family "exact/<difficulty>"
    unit: str
    direction: Direction | None  # None: a diagnostic, not something to optimise
    sources: tuple[Source, ...]  # where the number comes from
    meaning: str

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """The names this row covers: itself, or its family with any value in ``<...>``."""
        parts = re.split(r"<[^>]+>", self.name)
        return re.compile(r"[^/\s]+".join(re.escape(p) for p in parts))


TABLE_FILE = Path(__file__).with_name("metrics.yaml")


def read_table(path: Path = TABLE_FILE) -> tuple[Metric, ...]:
    """The rows of ``metrics.yaml``, checked: unique names, known directions and sources."""
    rows = []
    for entry in yaml.safe_load(path.read_text()):
        direction = None if entry["direction"] == "none" else entry["direction"]
        metric = Metric(entry["name"], entry["unit"], direction, tuple(entry["sources"]),
                        entry["meaning"])
        if direction not in (*get_args(Direction), None) or \
                not set(metric.sources) <= set(get_args(Source)) or not metric.sources:
            raise ValueError(f"{path}: bad row for {metric.name!r}: {entry}")
        rows.append(metric)
    names = [m.name for m in rows]
    if len(names) != len(set(names)):
        raise ValueError(f"{path}: a name is listed twice")
    return tuple(rows)


METRICS: tuple[Metric, ...] = read_table()

SECTIONS: dict[str, str] = {
    "train": "a logged training step",
    "eval": "an evaluation during training, on the held-out set",
    "final": "the run's last evaluation (TensorBoard HParams)",
    "bench": "a latency and memory measurement",
    "front": "the Pareto front of a search, as a figure",
    "trials": "a search trial's HParams session, one per trial (TensorBoard HParams)",
}

# Names used before the vocabulary, kept only to point a user at the new one.
RETIRED: dict[str, str] = {
    "accuracy": "exact", "token": "per_answer", "acc/exact": "exact",
    "wake_ms_p10": "wake_ms_per_token", "wake_ms_p90": "wake_ms_p99",
    "wake_ms_min": "wake_ms_per_token", "wake_ms_spread": "wake_repeat_spread",
    "tokens_per_s": "train_tokens_per_s", "eval_loss": "loss",
}


class UnknownMetric(ValueError):
    """A name that is not in the vocabulary; the message names the closest one."""


def find(name: str) -> Metric | None:
    """The row that covers ``name`` (``exact/3`` -> ``exact/<difficulty>``), or None."""
    return next((m for m in METRICS if m.pattern.fullmatch(name)), None)


def lookup(name: str) -> Metric:
    """The row that covers ``name``, or :class:`UnknownMetric` naming the closest name."""
    metric = find(name)
    if metric is None:
        raise UnknownMetric(unknown_message(name))
    return metric


def unknown_message(name: str) -> str:
    if name in RETIRED:
        hint = f" It was renamed: use {RETIRED[name]!r}."
    else:
        family = name.split("/")[0] + "/<" if "/" in name else name
        close = difflib.get_close_matches(family, [m.name for m in METRICS], n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown metric {name!r}; `archkit metrics` lists them.{hint}"


def difficulty_of(name: str) -> float:
    """The difficulty a per-difficulty name carries (``exact/3`` -> 3.0), to sort such
    names in numeric order; infinity for a name without a numeric one."""
    tail = name.split("/", 1)[1] if "/" in name else ""
    try:
        return float(tail)
    except ValueError:
        return float("inf")


def tag(section: str, name: str) -> str:
    """The TensorBoard tag of metric ``name`` taken at ``section`` (e.g. ``eval/exact``)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    lookup(name)
    return f"{section}/{name}"


def untag(tag_name: str) -> tuple[str, str]:
    """``eval/exact/3`` -> ``("eval", "exact/3")``."""
    section, _, name = tag_name.partition("/")
    return section, name


def recorded_by_trials(metric: Metric) -> bool:
    """Whether a search trial records the metric, so that it may be an objective."""
    return bool({"evaluation", "bench", "card"} & set(metric.sources))

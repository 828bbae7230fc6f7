"""Searches side by side, across tasks: which search axis buys accuracy on which task, at
equal wake latency (``archkit compare``).

For each task (the task of a search's base spec), the searches on it share one latency
budget: the slowest of their fastest trials, widened by the largest relative repeat
spread among those fastest trials, so that every search has at least one trial within it
and a trial is not left out by bench noise alone. Each search then reports

1. its best ``exact`` among the trials within the budget (the point compared across
   searches: equal wake latency),
2. its best ``exact`` overall and that trial's wake latency (ties: the faster trial),
3. the chance level (the trials' mean ``baseline``), so every accuracy sits beside it.

The figure has one panel per task: ``exact`` minus chance against wake latency, one
colour per search, its front joined, the budget as a dashed line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from archkit.searching.pareto import competing, front_of, short_names, varying_params
from archkit.searching.run import load_search
from archkit.searching.space import SearchSpace

COMPARED = ("exact", "wake_ms_per_token")


@dataclass(frozen=True)
class Search:
    """One finished search: its name, task and complete trials with both compared
    metrics."""

    name: str
    task: str
    space: SearchSpace
    trials: list[dict[str, Any]]

    @classmethod
    def load(cls, root: Path) -> Search:
        space, results = load_search(root)
        spec = space.trial_spec({}, space.name)
        assert spec.task is not None
        return cls(space.name, spec.task.name, space, competing(results, COMPARED))

    @property
    def chance(self) -> float | None:
        levels = [r["metrics"]["baseline"] for r in self.trials if "baseline" in r["metrics"]]
        return sum(levels) / len(levels) if levels else None

    def fastest(self) -> dict[str, Any]:
        return min(self.trials, key=lambda r: r["metrics"]["wake_ms_per_token"])


def latency_budget(searches: Sequence[Search]) -> float:
    """The wake latency all ``searches`` (of one task) are compared at: the slowest of
    their fastest trials times one plus the largest repeat spread among those."""
    fastest = [s.fastest() for s in searches]
    spread = max(r["metrics"].get("wake_repeat_spread", 0.0) for r in fastest)
    return max(r["metrics"]["wake_ms_per_token"] for r in fastest) * (1 + spread)


def load_searches(roots: Sequence[Path]) -> list[Search]:
    """The searches in ``roots`` that have complete trials, in the order given."""
    return [s for s in map(Search.load, roots) if s.trials]


def summarise(searches: Sequence[Search]) -> list[dict[str, Any]]:
    """One row per search, grouped by task in the order given."""
    tasks = list(dict.fromkeys(s.task for s in searches))
    rows = []
    for task in tasks:
        same_task = [s for s in searches if s.task == task]
        budget = latency_budget(same_task)
        for search in same_task:
            within = [r for r in search.trials
                      if r["metrics"]["wake_ms_per_token"] <= budget]
            at_budget, best = max(within, key=_rank), max(search.trials, key=_rank)
            axes = varying_params(search.trials)
            rows.append({
                "search": search.name, "task": task, "trials": len(search.trials),
                "chance": search.chance, "latency_budget_ms": budget,
                "at_budget": _point(at_budget, axes), "best": _point(best, axes),
            })
    return rows


def _rank(record: dict[str, Any]) -> tuple[float, float]:
    """Higher ``exact`` first; among equals, the faster wake step."""
    return record["metrics"]["exact"], -record["metrics"]["wake_ms_per_token"]


def _point(record: dict[str, Any], axes: list[str]) -> dict[str, Any]:
    return {"trial": record["trial"], "exact": record["metrics"]["exact"],
            "wake_ms_per_token": record["metrics"]["wake_ms_per_token"],
            "params": {key: record["params"].get(key) for key in axes}}


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| task | search | trials | chance | budget (ms) | exact at budget (trial: "
             "params) | best exact (ms; trial: params) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        chance = "n/a" if row["chance"] is None else f"{row['chance']:.3f}"
        at, best = row["at_budget"], row["best"]
        lines.append(
            f"| {row['task']} | {row['search']} | {row['trials']} | {chance} | "
            f"{row['latency_budget_ms']:.2f} | {at['exact']:.3f} ({at['trial']}: "
            f"{_params(at)}) | {best['exact']:.3f} ({best['wake_ms_per_token']:.2f} ms; "
            f"{best['trial']}: {_params(best)}) |")
    return "\n".join(lines)


def _params(point: dict[str, Any]) -> str:
    names = short_names(list(point["params"]))
    return ", ".join(f"{names[key]}={value}" for key, value in point["params"].items())


def plot_summary(searches: Sequence[Search]) -> Figure:
    """One panel per task: each search's trials as ``exact`` minus chance against wake
    latency, its front joined, the task's latency budget dashed."""
    tasks = list(dict.fromkeys(s.task for s in searches))
    figure = Figure(figsize=(5.0 * len(tasks), 4.2))
    for ax, task in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks, strict=True):
        same_task = [s for s in searches if s.task == task]
        for search in same_task:
            chance = search.chance or 0.0
            xs = [r["metrics"]["wake_ms_per_token"] for r in search.trials]
            ys = [r["metrics"]["exact"] - chance for r in search.trials]
            dots = ax.scatter(xs, ys, s=18, alpha=0.6)
            front = sorted(front_of(search.trials, list(COMPARED),
                                    ["maximize", "minimize"]),
                           key=lambda r: r["metrics"]["wake_ms_per_token"])
            ax.plot([r["metrics"]["wake_ms_per_token"] for r in front],
                    [r["metrics"]["exact"] - chance for r in front],
                    color=dots.get_facecolor()[0], label=search.name)
        ax.axvline(latency_budget(same_task), color="0.4", linestyle="--", linewidth=1,
                   label="latency budget")
        ax.axhline(0.0, color="0.7", linewidth=1)
        ax.set_title(task)
        ax.set_xlabel("wake_ms_per_token")
        ax.set_ylabel("exact - chance (baseline)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return figure

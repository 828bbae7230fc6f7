"""An experiment's report: ``summary.json``, ``report.md`` and ``report.png``, rewritten
after every finished run so that it always covers what has finished.

For every grid cell (one value of the grid field; a single cell without a grid):

1. per arm, ``exact`` overall and per difficulty as the mean over seeds with its 95%
   interval (:mod:`archkit.stats`), at the trained N and at every test-time N, and the
   step each run last evaluated at (where ``train.until`` stopped it);
2. chance (``baseline``, the best constant answers) on the same evaluation sets;
3. per arm, ``exact`` minus the reference arm's, seed by seed, with its interval and the
   paired t-test's p-value. A pair counts only when both runs answered the same questions
   (their ``eval_set.json`` are identical).

With a grid, t*(arm) is the largest grid value whose cell the arm solves: the lower end of
its ``exact`` interval (its mean, with one seed) above chance + ``margin``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from archkit.metrics import difficulty_of
from archkit.stats import Interval, mean_interval, paired_difference


@dataclass(frozen=True)
class RunResult:
    """One finished run of an arm, at one grid value and seed."""

    arm: str
    cell: str
    value: Any
    seed: int
    final: dict[str, float]
    test_time: dict[int, dict[str, float]]
    stopped_at: int | None
    eval_set: str  # a digest of the questions it was scored on


def _exact_keys(metrics: Sequence[dict[str, float]], prefix: str = "exact") -> list[str]:
    """``prefix`` and ``prefix/<d>`` that every one of ``metrics`` has, difficulties in
    numeric order."""
    keys = [k for k in metrics[0] if k == prefix or k.startswith(prefix + "/")]
    keys = [k for k in keys if all(k in m for m in metrics)]
    return sorted(keys, key=lambda k: (k != prefix, difficulty_of(k)))


def _intervals(metrics: Sequence[dict[str, float]], prefix: str = "exact"
               ) -> dict[str, dict[str, Any]]:
    return {k: mean_interval([m[k] for m in metrics]).json()
            for k in _exact_keys(metrics, prefix)}


def summarise(header: dict[str, Any], results: Sequence[RunResult]) -> dict[str, Any]:
    """The summary (see the module docstring) of the finished ``results``."""
    reference, margin = header["reference"], header["margin"]
    cells = []
    for label in header["grid"]:
        in_cell = [r for r in results if r.cell == label]
        if not in_cell:
            continue
        arms_order = list(dict.fromkeys(r.arm for r in in_cell))
        by_seed = {r.seed: r.final for r in in_cell}  # chance depends on the seed's set
        arms: dict[str, Any] = {}
        for arm in arms_order:
            runs = sorted((r for r in in_cell if r.arm == arm), key=lambda r: r.seed)
            entry: dict[str, Any] = {
                "seeds": [r.seed for r in runs],
                "trained": _intervals([r.final for r in runs]),
                **{f"eval_N{n}": _intervals([r.test_time[n] for r in runs])
                   for n in runs[0].test_time},
            }
            stops = [r.stopped_at for r in runs if r.stopped_at is not None]
            if stops:  # a step count: its range says more than an interval would
                entry["stopped_at"] = {"mean": statistics.fmean(stops), "min": min(stops),
                                       "max": max(stops), "n": len(stops)}
            ref_runs = {r.seed: r for r in in_cell if r.arm == reference}
            pairs = {r.seed: r for r in runs
                     if r.seed in ref_runs and ref_runs[r.seed].eval_set == r.eval_set}
            if arm != reference and pairs:
                entry["difference"] = paired_difference(
                    {s: r.final["exact"] for s, r in pairs.items()},
                    {s: ref_runs[s].final["exact"] for s in pairs}).json()
            arms[arm] = entry
        cells.append({"label": label, "value": in_cell[0].value, "arms": arms,
                      "baseline": _intervals(list(by_seed.values()), "baseline")})
    summary = {**header, "cells": cells}
    if header["grid_field"] is not None:
        summary["threshold"] = {arm: threshold(cells, arm, margin)
                                for arm in dict.fromkeys(r.arm for r in results)}
    return summary


def solves(cell: dict[str, Any], arm: str, margin: float) -> bool:
    """Whether ``arm``'s ``exact`` in ``cell`` lies above chance + ``margin``: the lower
    end of its interval, or its mean with one seed."""
    entry = cell["arms"].get(arm)
    if entry is None:
        return False
    exact = entry["trained"]["exact"]
    low = exact["low"] if exact["low"] is not None else exact["mean"]
    return low > cell["baseline"]["baseline"]["mean"] + margin


def threshold(cells: Sequence[dict[str, Any]], arm: str, margin: float) -> Any:
    """t*(arm): the last grid value (in the grid's order) ``arm`` solves, or None."""
    solved = [cell["value"] for cell in cells if solves(cell, arm, margin)]
    return solved[-1] if solved else None


def write_report(root: Path, runs: Path, header: dict[str, Any],
                 results: Sequence[RunResult]) -> dict[str, Any]:
    summary = summarise(header, results)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "report.md").write_text(report_markdown(summary, runs))
    figure = plot_grid(summary) if header["grid_field"] else plot_bydifficulty_of(summary)
    figure.savefig(root / "report.png", dpi=120, bbox_inches="tight")
    return summary


def _text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return Interval(entry["mean"], entry["low"], entry["high"], entry["n"]).text()


def _signed(entry: dict[str, Any]) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:+.3f} (n={entry['n']})"
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def _error_bars(entries: Sequence[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Means and matplotlib's [below, above] error lengths (0 without an interval)."""
    means = [e["mean"] for e in entries]
    below = [e["mean"] - e["low"] if e["low"] is not None else 0.0 for e in entries]
    above = [e["high"] - e["mean"] if e["high"] is not None else 0.0 for e in entries]
    return means, [below, above]


def report_markdown(summary: dict[str, Any], runs: Path) -> str:
    rates = ", ".join(f"{k} {v:g}" for k, v in summary["rates"].items()) or "from the spec"
    lines = [f"Experiment `{summary['experiment']}` (base `{summary['base']}`; rates: "
             f"{rates}). `exact` is held-out exact match: mean [95% Student-t interval, "
             "not clipped to 0..1] over seeds; "
             "differences are arm minus the reference arm "
             f"`{summary['reference']}`, seed by seed, on the same questions, with the "
             f"paired t-test's p. Runs: `{runs / summary['experiment']}/runs`.", ""]
    tuning = summary["tuning"]
    for rate in ("lr", "adamw_lr"):
        if rate in tuning:
            stopped = tuning[rate].get("stopped_at", {})
            tried = ", ".join(f"{v}: {e:.3f}" + (f" at step {stopped[v]}" if v in stopped
                                                 else "")
                              for v, e in tuning[rate]["validation_exact"].items())
            where = "on the edge of what was tried" if tuning[rate]["at_edge"] else "inside"
            lines.append(f"- `train.{rate}` tuned on the validation set (eval seed "
                         f"{tuning['validation_seed']}; exact, ties to the run that stopped "
                         f"first): {tried}; chose "
                         f"{tuning[rate]['chosen']:g} ({where}).")
    for cell in summary["cells"]:
        lines += ["", f"### {summary['grid_field']} = {cell['value']}"
                  if summary["grid_field"] else "### Results", ""]
        keys = list(next(iter(cell["arms"].values()))["trained"])
        head = ["arm", "seeds", *keys, "difference in exact", "p", "stopped at (range)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, entry in cell["arms"].items():
            for where in ["trained", *(k for k in entry if k.startswith("eval_N"))]:
                label = arm if where == "trained" else f"{arm} at test N={where[6:]}"
                values = [_text(entry[where].get(k)) for k in keys]
                diff = entry.get("difference") if where == "trained" else None
                p = "-" if diff is None or diff["p_value"] is None else f"{diff['p_value']:.3g}"
                stops = entry.get("stopped_at") if where == "trained" else None
                stop = "-" if stops is None else \
                    f"{stops['mean']:.0f} ({stops['min']}-{stops['max']})"
                diff_text = "-" if diff is None else _signed(diff)
                lines.append(f"| {label} | {len(entry['seeds'])} | {' | '.join(values)} | "
                             f"{diff_text} | {p} | {stop} |")
        chance = cell["baseline"]
        chance_cells = [_text(chance.get(k.replace("exact", "baseline", 1))) for k in keys]
        lines.append(f"| chance (`baseline`) | {chance['baseline']['n']} | "
                     f"{' | '.join(chance_cells)} | - | - | - |")
    if "threshold" in summary:
        lines += ["", f"### Threshold: the largest {summary['grid_field']} solved "
                      f"(lower end of the `exact` interval above chance + "
                      f"{summary['margin']:g})", "", "| arm | t* |", "|---|---|"]
        lines += [f"| {arm} | {'none' if t is None else t} |"
                  for arm, t in summary["threshold"].items()]
    return "\n".join(lines) + "\n"


def plot_grid(summary: dict[str, Any]) -> Figure:
    """Left: ``exact`` against the grid value per arm (95% intervals), chance dashed.
    Right: t* per arm."""
    figure = Figure(figsize=(11.0, 4.4))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    cells = summary["cells"]
    numeric = all(isinstance(c["value"], (int, float)) for c in cells)
    xs = [c["value"] if numeric else i for i, c in enumerate(cells)]
    arms = list(dict.fromkeys(a for c in cells for a in c["arms"]))
    for i, arm in enumerate(arms):
        points = [(x, c["arms"][arm]["trained"]["exact"]) for x, c in zip(xs, cells,
                                                                           strict=True)
                  if arm in c["arms"]]
        dodge = (i - (len(arms) - 1) / 2) * 0.06 * (max(xs) - min(xs) or 1)
        means, bars = _error_bars([e for _, e in points])
        left.errorbar([x + dodge for x, _ in points], means, yerr=bars, marker="o",
                      capsize=3, label=arm)
    left.plot(xs, [c["baseline"]["baseline"]["mean"] for c in cells], linestyle="--",
              color="grey", label="chance (baseline)")
    if not numeric:
        left.set_xticks(xs, [str(c["value"]) for c in cells])
    left.set_xlabel(summary["grid_field"])
    left.set_ylabel("exact (held out), 95% interval")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title(summary["experiment"])
    solved = summary["threshold"]
    positions = [xs[[c["value"] for c in cells].index(t)] if t is not None else None
                 for t in solved.values()]
    right.barh(list(solved), [p if p is not None else 0 for p in positions],
               color=["tab:blue" if p is not None else "0.8" for p in positions])
    right.set_xlabel(f"t*: largest {summary['grid_field']} solved (margin "
                     f"{summary['margin']:g})")
    right.grid(alpha=0.3, axis="x")
    return figure


def plot_bydifficulty_of(summary: dict[str, Any]) -> Figure:
    """``exact`` against difficulty, one line per arm, 95% intervals over seeds."""
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.subplots()
    cell = summary["cells"][0]
    count = len(cell["arms"])
    for i, (arm, entry) in enumerate(cell["arms"].items()):
        trained = entry["trained"]
        keys = [k for k in trained if k != "exact"]
        dodge = (i - (count - 1) / 2) * 0.08  # side by side, so intervals stay readable
        means, bars = _error_bars([trained[k] for k in keys])
        ax.errorbar([difficulty_of(k) + dodge for k in keys], means, yerr=bars,
                    marker="o", capsize=3, label=f"{arm} ({len(entry['seeds'])} seeds)")
    chance = cell["baseline"]
    keys = [k for k in chance if k != "baseline"]
    if keys:
        ax.plot([difficulty_of(k) for k in keys], [chance[k]["mean"] for k in keys],
                linestyle="--", color="grey", marker="_", label="chance (baseline)")
    ax.set_xlabel("difficulty")
    ax.set_ylabel("exact (held out), 95% interval")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(summary["experiment"])
    return figure

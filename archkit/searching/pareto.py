"""Pareto fronts of finished trials: the table, ``pareto.csv``, ``pareto.png`` and the
TensorBoard view (an HParams session per trial, the front figure under
``runs/<name>/front``).

A trial is on the front when no other complete trial is at least as good on every
objective and strictly better on one. Equal points do not dominate each other, so ties
are all kept. Only complete trials compete: a failed trial has no values, and a trial that
an early-stopping scheduler stopped has only partial ones.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from matplotlib.figure import Figure
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from archkit.metrics import difficulty_of, tag
from archkit.searching.space import SearchSpace
from archkit.tracking import HPARAMS_SUFFIX, flatten, write_session

REPORT_LOCK = ".report.lock"
BOARD_STATE = "board.json"  # what the board already shows: on_front per trial, drawn step
BOARD_METRICS = ("exact", "wake_ms_per_token", "wake_ms_p99", "sleep_ms_per_window",
                 "fast_weight_bytes")
TRIAL_STATUS = {"complete": "STATUS_SUCCESS", "failed": "STATUS_FAILURE",
                "stopped": "STATUS_UNKNOWN"}


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b, strict=True))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]


def competing(results: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """The trials that may enter the front: complete, with a value for every objective."""
    return [r for r in results
            if r["state"] == "complete" and all(m in r["metrics"] for m in metrics)]


def front_of(results: list[dict[str, Any]], metrics: Sequence[str], directions: Sequence[str]
             ) -> list[dict[str, Any]]:
    candidates = competing(results, metrics)
    points = [[r["metrics"][m] for m in metrics] for r in candidates]
    return [candidates[i] for i in pareto_front(points, directions)]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest dotted suffix that no other key shares
    (``sleep.rule`` and ``model.blocks.gated_delta.rule`` -> ``sleep.rule``,
    ``gated_delta.rule``; a key alone -> its last part)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for size in range(1, len(parts) + 1):
            name = ".".join(parts[-size:])
            if not any(other != key and (other == name or other.endswith("." + name))
                       for other in keys):
                break
        names[key] = name
    return names


def varying_params(results: list[dict[str, Any]]) -> list[str]:
    """The parameters whose values differ between the given trials."""
    keys = sorted({k for r in results for k in r["params"]})
    return [k for k in keys if len({repr(r["params"].get(k)) for r in results}) > 1] or keys


def front_table(results: list[dict[str, Any]], space: SearchSpace, title: str) -> Table:
    """The front: the parameters that vary on it, the objectives and the columns."""
    front = front_of(results, space.metrics, space.directions)
    table = Table(title=title, title_justify="left")
    params = varying_params(front) if front else []
    shown = space.shown_metrics
    for column in ["trial", *params, *shown]:
        table.add_column(column, justify="right")
    for r in sorted(front, key=lambda r: r["metrics"][space.metrics[-1]]):
        table.add_row(r["trial"], *(_fmt(r["params"].get(k)) for k in params),
                      *(_fmt(r["metrics"].get(m)) for m in shown))
    return table


def front_markdown(results: list[dict[str, Any]], space: SearchSpace) -> str:
    """Every complete trial as a Markdown table, in trial order: the parameters that vary,
    the objectives (``exact`` followed by its chance level ``baseline`` and ``exact`` per
    difficulty, wake latency with the range of its bench repeats) and whether the trial
    is on the front."""
    candidates = competing(results, space.metrics)
    on_front = {r["trial"] for r in front_of(results, space.metrics, space.directions)}
    params = varying_params(candidates) if candidates else []
    shown = list(space.metrics)
    if "exact" in shown and candidates:
        by_difficulty = sorted((k for k in candidates[0]["metrics"] if k.startswith("exact/")
                                and all(k in r["metrics"] for r in candidates)),
                               key=difficulty_of)
        at = shown.index("exact") + 1
        shown[at:at] = ["baseline", *by_difficulty]
    head = ["trial", *short_names(params).values(), *shown, "on_front"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sorted(candidates, key=lambda r: r["trial"]):
        cells = [r["trial"], *(_fmt(r["params"].get(k)) for k in params)]
        for metric in shown:
            value = _fmt(r["metrics"].get(metric, "-"))
            repeats = r.get("wake_ms_per_token_repeats") if metric == "wake_ms_per_token" \
                else None
            if repeats:
                value += f" ({min(repeats):.3g}-{max(repeats):.3g})"
            cells.append(value)
        cells.append("yes" if r["trial"] in on_front else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(root: Path, results: list[dict[str, Any]], space: SearchSpace
                  ) -> list[dict[str, Any]]:
    """Write ``pareto.csv`` (every complete trial, front first: its parameters, objectives
    and columns), ``pareto.png`` and the TensorBoard view (:func:`write_board`); return the
    front. Several processes of one study may report at once: they take turns."""
    metrics, directions = space.metrics, space.directions
    candidates = competing(results, metrics)
    front = front_of(results, metrics, directions)
    on_front = {r["trial"] for r in front}
    params = sorted({k for r in candidates for k in r["params"]})
    shown = space.shown_metrics
    with FileLock(root / REPORT_LOCK):
        with open(root / "pareto.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial", "on_front", *params, *shown])
            for r in sorted(candidates, key=lambda r: r["trial"] not in on_front):
                writer.writerow([r["trial"], r["trial"] in on_front,
                                 *(r["params"].get(k) for k in params),
                                 *(r["metrics"].get(m) for m in shown)])
        figure = None
        if len(metrics) >= 2 and candidates:
            figure = plot_front(candidates, on_front, metrics, directions, space.name)
            figure.savefig(root / "pareto.png", dpi=120, bbox_inches="tight")
        write_board(root, results, space, on_front, figure)
    return front


def write_board(root: Path, results: list[dict[str, Any]], space: SearchSpace,
                on_front: set[str], figure: Figure | None) -> None:
    """The search in TensorBoard, only ever appended to, since a TensorBoard may be reading
    it: one HParams session per trial, in the trial's run directory (its parameters, the
    search, trial and state as hyperparameters; its metrics and ``on_front`` tagged
    ``trials/<metric>``); a new ``trials/on_front`` point when a trial joins or leaves the
    front; the front figure (``front/figure``) when a trial has completed since it was last
    drawn. The step of these points is the number of complete trials at the time."""
    board = root / "front"
    board.mkdir(exist_ok=True)
    state_path = board / BOARD_STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    shown, step = state.setdefault("on_front", {}), len(competing(results, space.metrics))
    for record in results:
        trial, run_dir = record["trial"], root / "trials" / record["trial"]
        flag = float(trial in on_front)
        if not list(run_dir.glob(f"*tfevents*{HPARAMS_SUFFIX}")):
            metrics = {tag("trials", m): float(record["metrics"][m])
                       for m in session_metrics(space) if m in record["metrics"]}
            write_session(run_dir, session_hparams(record, space.name),
                          {**metrics, tag("trials", "on_front"): flag}, step,
                          TRIAL_STATUS[record["state"]])
        elif shown.get(trial, flag) != flag:
            with SummaryWriter(str(run_dir), filename_suffix=".front") as writer:
                writer.add_scalar(tag("trials", "on_front"), flag, step)
        shown[trial] = flag
    if figure is not None and state.get("drawn") != step:
        with SummaryWriter(str(board)) as writer:
            writer.add_figure("front/figure", figure, global_step=step)
        state["drawn"] = step
    partial = state_path.with_suffix(".partial")
    partial.write_text(json.dumps(state, indent=1))
    partial.replace(state_path)


def session_metrics(space: SearchSpace) -> list[str]:
    """What a trial's HParams session shows: the objectives and columns, then the metrics
    every front is judged by."""
    return list(dict.fromkeys([*space.shown_metrics, *BOARD_METRICS]))


def session_hparams(record: dict[str, Any], search: str) -> dict[str, Any]:
    return flatten({"search": search, "trial": record["trial"], "state": record["state"],
                    **record["params"]})


def plot_front(candidates: list[dict[str, Any]], on_front: set[str], metrics: Sequence[str],
               directions: Sequence[str], search: str) -> Figure:
    """The second objective (x) against the first (y), the front highlighted; each point
    labelled by its trial id (as in ``pareto.csv``) and the parameters that differ between
    trials. Wake latency carries the range of its bench repeats; ``exact`` the chance level
    (the trials' mean ``baseline``) as a dashed line."""
    y_metric, x_metric = metrics[0], metrics[1]
    figure = Figure(figsize=(6.4, 4.4))
    ax = figure.subplots()
    named_by = short_names(varying_params(candidates))
    for group, style in ((False, {"color": "0.65", "label": "dominated"}),
                         (True, {"color": "tab:red", "label": "Pareto front"})):
        members = [r for r in candidates if (r["trial"] in on_front) == group]
        if not members:
            continue
        xs = [r["metrics"][x_metric] for r in members]
        ys = [r["metrics"][y_metric] for r in members]
        if x_metric == "wake_ms_per_token":
            ranges = [r.get("wake_ms_per_token_repeats") or [x] for x, r in
                      zip(xs, members, strict=True)]
            err = [[x - min(rs) for x, rs in zip(xs, ranges, strict=True)],
                   [max(rs) - x for x, rs in zip(xs, ranges, strict=True)]]
            ax.errorbar(xs, ys, xerr=err, fmt="o", capsize=3, **style)
        else:
            ax.scatter(xs, ys, **style)
        for x, y, r in zip(xs, ys, members, strict=True):
            text = " ".join([r["trial"], *(f"{name}={r['params'].get(key)}"
                                           for key, name in named_by.items())])
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    chance = [r["metrics"]["baseline"] for r in candidates if "baseline" in r["metrics"]]
    if y_metric == "exact" and chance:
        ax.axhline(sum(chance) / len(chance), color="0.3", linestyle="--", linewidth=1,
                   label="chance (baseline)")
    front = sorted((r for r in candidates if r["trial"] in on_front),
                   key=lambda r: r["metrics"][x_metric])
    ax.plot([r["metrics"][x_metric] for r in front], [r["metrics"][y_metric] for r in front],
            color="tab:red", alpha=0.4)
    ax.set_xlabel(f"{x_metric} ({directions[1]})")
    ax.set_ylabel(f"{y_metric} ({directions[0]})")
    extra = f"; front over all {len(metrics)} objectives" if len(metrics) > 2 else ""
    ax.set_title(f"{search}: {len(candidates)} complete trials, {len(front)} on the front"
                 f"{extra}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return figure

"""What a training run shows and keeps: a live progress bar, TensorBoard scalars, text
and hparams, ``metrics.jsonl`` and ``final.json``, and a final table by difficulty.

A run has one HParams session, written when it finishes into an event file of its own
(``*.hparams``). Extending a finished run moves that file and ``final.json`` to
``superseded/step_<n>/`` (``supersede_final``), under names TensorBoard does not read, so
the extended run's session is the only one TensorBoard shows and nothing is deleted.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import (
    HParamsPluginData,
    SessionEndInfo,
    SessionStartInfo,
)
from torch.utils.tensorboard import SummaryWriter

from archkit.checkpoint import FINAL
from archkit.evaluation import Evaluation
from archkit.metrics import tag
from archkit.spec import Spec
from archkit.spec_files import flatten_dotted
from archkit.tasks import Accuracy

HPARAMS_SUFFIX = ".hparams"
SUPERSEDED = "superseded"


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for TensorBoard hparams: None left out, lists
    and other values as text."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flatten_dotted(tree).items() if value not in (None, {})}


def score_table(result: Evaluation, title: str, difficulty_name: str = "difficulty"
                ) -> Table:
    """Examples, ``exact`` beside its chance ``baseline``, and ``per_answer``, per
    difficulty and overall."""
    table = Table(title=title, title_justify="left")
    chance = result.baseline
    for column in (difficulty_name, "examples", "exact", "baseline", "per_answer"):
        table.add_column(column, justify="right")

    def row(label: str, acc: Accuracy, baseline: float | None, **style: str) -> None:
        table.add_row(label, str(acc.examples), f"{acc.exact:.3f}",
                      "-" if baseline is None else f"{baseline:.3f}",
                      f"{acc.per_answer:.3f}", **style)

    for value, acc in sorted(result.score.by_difficulty.items()):
        row(str(value), acc, chance.by_difficulty.get(value) if chance else None)
    row("all", result.score.overall, chance.overall if chance else None, style="bold")
    return table


def supersede_final(run_dir: Path, step: int) -> None:
    """Before a finished run is extended: keep its ``final.json`` and its HParams session
    in ``superseded/step_<step>/``, where TensorBoard does not read them."""
    kept = run_dir / SUPERSEDED / f"step_{step}"
    kept.mkdir(parents=True, exist_ok=True)
    (run_dir / FINAL).rename(kept / FINAL)
    for events in run_dir.glob(f"*tfevents*{HPARAMS_SUFFIX}"):
        events.rename(kept / events.name.replace("tfevents", "superseded"))


def read_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records of one ``kind`` (``train``, ``eval``), oldest
    first; none before the run has logged."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("kind") == kind]


class SilentLogger:
    """The logger of a rank that writes nothing (every rank of a run but rank 0)."""

    def spec_text(self, step: int) -> None:
        pass

    def step(self, step: int, loss: float, grad_norm: float, lrs: dict[str, float],
             tokens_per_s: float, passes: list[float], stage: int | None = None) -> None:
        pass

    def evaluation(self, step: int, result: Evaluation) -> None:
        pass

    def close(self, result: Evaluation | None, step: int) -> None:
        pass


class TrainLogger:
    """``resumed_from`` is the checkpoint's step when a run resumes (None for a new run):
    records after it, which a crash may have left, are dropped from ``metrics.jsonl``, and
    TensorBoard hides events after it; the step's own points stay in both."""

    def __init__(self, run_dir: Path, spec: Spec, total_steps: int, resumed_from: int | None,
                 progress: bool, log_every: int = 1, log_hparams: bool = True,
                 final_table: bool = True) -> None:
        self.run_dir, self.spec, self.log_every = run_dir, spec, log_every
        self.log_hparams, self.final_table = log_hparams, final_table
        self.metrics_path = run_dir / "metrics.jsonl"
        if resumed_from is not None:
            self._truncate_after(resumed_from)
        self.writer = SummaryWriter(
            str(run_dir), purge_step=None if resumed_from is None else resumed_from + 1)
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, disable=not progress,
        )
        self.bar = self.progress.add_task(spec.name, total=total_steps,
                                          completed=resumed_from or 0,
                                          loss="-", acc="-", tps="-")
        self.progress.start()

    def spec_text(self, step: int) -> None:
        """The resolved spec as TensorBoard text: at step 0, and where a run is extended."""
        text = yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)
        self.writer.add_text("spec", "```yaml\n" + text + "\n```", step)

    def _truncate_after(self, step: int) -> None:
        """Drop records a crash left beyond the checkpoint we resume from."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _record(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _scalars(self, section: str, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` as TensorBoard scalars tagged ``<section>/<name>`` and as one
        ``metrics.jsonl`` record of kind ``section``."""
        for name, value in metrics.items():
            self.writer.add_scalar(tag(section, name), value, step)
        self._record({"step": step, "kind": section, **metrics})

    def step(self, step: int, loss: float, grad_norm: float, lrs: dict[str, float],
             tokens_per_s: float, passes: list[float], stage: int | None = None) -> None:
        self.progress.update(self.bar, completed=step, loss=f"{loss:.4f}",
                             tps=f"{tokens_per_s:,.0f}")
        if step % self.log_every:
            return
        metrics = {"loss": loss, "grad_norm": grad_norm, "train_tokens_per_s": tokens_per_s,
                   "passes_per_sleep": statistics.fmean(passes) if passes else 0.0}
        metrics.update({f"lr/{name}": lr for name, lr in lrs.items()})
        if stage is not None:
            metrics["curriculum_stage"] = stage
        self._scalars("train", step, metrics)

    def evaluation(self, step: int, result: Evaluation) -> None:
        self.progress.update(self.bar, acc=f"{result.score.overall.exact:.3f}")
        self._scalars("eval", step, result.metrics())

    def close(self, result: Evaluation | None, step: int) -> None:
        """Stop; with the final ``result`` (None when interrupted), write ``final.json``
        and the run's HParams session at the last ``step``."""
        self.progress.stop()
        if result is not None:
            metrics = result.metrics()
            if self.log_hparams:
                self._hparams({tag("final", k): metrics[k] for k in ("exact", "per_answer",
                                                                     "loss")}, step)
            (self.run_dir / FINAL).write_text(json.dumps(metrics, indent=2))
            if self.final_table:
                self.console.print(score_table(result, f"{self.spec.name}: final evaluation"))
        self.writer.close()

    def _hparams(self, final: dict[str, float], step: int) -> None:
        write_session(self.run_dir, flatten(self.spec.model_dump(mode="json")), final, step)


def write_session(run_dir: Path, hparams: dict[str, Any], metrics: dict[str, float], step: int,
                  status: str = "STATUS_SUCCESS", suffix: str = HPARAMS_SUFFIX) -> None:
    """The HParams session of the run in ``run_dir``, in an event file of its own: the
    hyperparameters, the ``status`` (a ``tensorboard.hparams.Status`` name) and ``metrics``
    (TensorBoard tag -> value) as scalars at ``step``.

    No experiment summary is written. TensorBoard shows the columns of the first experiment
    summary it meets under ``--logdir`` and hides every hyperparameter it does not name;
    without one it builds the table from all sessions, training runs and search trials."""
    start = SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():  # bool before int: True is an int too
        field = "bool_value" if isinstance(value, bool) else \
            "number_value" if isinstance(value, (int, float)) else "string_value"
        setattr(start.hparams[name], field, value if field != "string_value" else str(value))
    end = SessionEndInfo(status=Status.Value(status), end_time_secs=time.time())
    with SummaryWriter(str(run_dir), filename_suffix=suffix) as writer:
        writer.file_writer.add_summary(_hparams_summary(
            hparams_metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start)),
            step)
        writer.file_writer.add_summary(_hparams_summary(
            hparams_metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end)), step)
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)


def _hparams_summary(tag_name: str, data: HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag_name, metadata=hparams_metadata.create_summary_metadata(data),
                      tensor=hparams_metadata.NULL_TENSOR)
    return summary

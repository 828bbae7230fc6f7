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
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from archkit.checkpoint import FINAL
from archkit.evaluation import Evaluation
from archkit.metrics import tag
from archkit.spec import Spec
from archkit.spec_files import flatten_dotted
from archkit.tasks import Score

HPARAMS_SUFFIX = ".hparams"
SUPERSEDED = "superseded"


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for TensorBoard hparams: None left out, lists
    and other values as text."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flatten_dotted(tree).items() if value not in (None, {})}


def score_table(score: Score, title: str, difficulty_name: str = "difficulty") -> Table:
    table = Table(title=title, title_justify="left")
    for column in (difficulty_name, "examples", "exact", "per_answer"):
        table.add_column(column, justify="right")
    for value, acc in sorted(score.by_difficulty.items()):
        table.add_row(str(value), str(acc.examples), f"{acc.exact:.3f}",
                      f"{acc.per_answer:.3f}")
    overall = score.overall
    table.add_row("all", str(overall.examples), f"{overall.exact:.3f}",
                  f"{overall.per_answer:.3f}", style="bold")
    return table


def supersede_final(run_dir: Path, step: int) -> None:
    """Before a finished run is extended: keep its ``final.json`` and its HParams session
    in ``superseded/step_<step>/``, where TensorBoard does not read them."""
    kept = run_dir / SUPERSEDED / f"step_{step}"
    kept.mkdir(parents=True, exist_ok=True)
    (run_dir / FINAL).rename(kept / FINAL)
    for events in run_dir.glob(f"*tfevents*{HPARAMS_SUFFIX}"):
        events.rename(kept / events.name.replace("tfevents", "superseded"))


class TrainLogger:
    """``resumed_from`` is the checkpoint's step when a run resumes (None for a new run):
    records after it, which a crash may have left, are dropped from ``metrics.jsonl``, and
    TensorBoard hides events after it; the step's own points stay in both."""

    def __init__(self, run_dir: Path, spec: Spec, total_steps: int, resumed_from: int | None,
                 progress: bool, log_every: int = 1, log_hparams: bool = True) -> None:
        self.run_dir, self.spec, self.log_every = run_dir, spec, log_every
        self.log_hparams = log_hparams
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
             tokens_per_s: float, passes: list[int], stage: int | None = None) -> None:
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
            self.console.print(score_table(result.score, f"{self.spec.name}: final evaluation"))
        self.writer.close()

    def _hparams(self, final: dict[str, float], step: int) -> None:
        with SummaryWriter(str(self.run_dir), filename_suffix=HPARAMS_SUFFIX) as writer:
            for summary in hparams(flatten(self.spec.model_dump(mode="json")), final):
                writer.file_writer.add_summary(summary, step)
            for name, value in final.items():
                writer.add_scalar(name, value, step)

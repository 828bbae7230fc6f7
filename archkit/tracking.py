"""What a training run shows and keeps: a live progress bar, TensorBoard scalars, text
and hparams, ``metrics.jsonl`` and ``final.json``, and a final table by difficulty."""

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

from archkit.evaluation import Evaluation
from archkit.metrics import tag
from archkit.spec import Spec
from archkit.tasks import Score


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become strings (TensorBoard hparams)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


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


class TrainLogger:
    def __init__(self, run_dir: Path, spec: Spec, total_steps: int, start_step: int,
                 progress: bool, log_every: int = 1, log_hparams: bool = True) -> None:
        self.run_dir, self.spec, self.log_every = run_dir, spec, log_every
        self.log_hparams = log_hparams
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step or None)
        if start_step == 0:
            text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
            self.writer.add_text("spec", "```yaml\n" + text + "\n```", 0)
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
            console=self.console, disable=not progress,
        )
        self.bar = self.progress.add_task(spec.name, total=total_steps, completed=start_step,
                                          loss="-", acc="-", tps="-")
        self.progress.start()

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

    def close(self, result: Evaluation | None) -> None:
        self.progress.stop()
        if result is not None:
            metrics = result.metrics()
            if self.log_hparams:
                overall = {tag("final", k): metrics[k] for k in ("exact", "per_answer", "loss")}
                self.writer.add_hparams(flatten(self.spec.model_dump(mode="json")), overall,
                                        run_name=".")
            (self.run_dir / "final.json").write_text(json.dumps(metrics, indent=2))
            self.console.print(score_table(result.score, f"{self.spec.name}: final evaluation"))
        self.writer.close()

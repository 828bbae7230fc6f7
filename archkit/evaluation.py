"""Held-out evaluation: greedy answers of a sleeping model on a task's evaluation set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from archkit.checkpoint import Run
from archkit.distributed import SINGLE, Layout
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, TrainSpec
from archkit.tasks import Score, Task, TaskBatch
from archkit.tasks.baseline import Baseline, constant_baseline


@dataclass(frozen=True)
class Evaluation:
    score: Score
    loss: float  # mean cross-entropy over the answer tokens of the evaluation set
    baseline: Baseline | None = None  # the chance level on the same evaluation set

    def metrics(self) -> dict[str, float]:
        """``exact``, ``per_answer``, their per-difficulty values, ``loss`` and the chance
        ``baseline`` overall and per difficulty: what ``final.json``, ``archkit eval
        --json`` and evaluation records hold."""
        chance = self.baseline.metrics() if self.baseline is not None else {}
        return {**self.score.metrics(), "loss": self.loss, **chance}


@torch.no_grad()
def evaluate(sleeper: SleepingModel, task: Task, batch: TaskBatch, batch_size: int,
             baseline: Baseline | None = None, layout: Layout = SINGLE) -> Evaluation:
    """Exact-match and per-answer accuracy of greedy predictions and the mean loss, beside
    ``baseline``, the chance level of ``batch``. Under several ranks (``layout``) each
    computes its chunks of ``batch_size`` examples and every rank gets the whole result
    (archkit.distributed)."""
    was_training = sleeper.training
    sleeper.eval()
    device = next(sleeper.parameters()).device
    predictions = torch.full_like(batch.tokens, -1)
    starts = range(0, len(batch), batch_size)
    chunk_losses = torch.zeros(len(starts), dtype=torch.float64)  # loss x examples
    for chunk, start in enumerate(starts):
        if not layout.mine(chunk):
            continue
        tokens = batch.tokens[start:start + batch_size].to(device)
        mask = batch.loss_mask[start:start + batch_size].to(device)
        out = sleeper(tokens, batch.context_len, mask)
        predictions[start:start + batch_size, batch.context_len + 1:] = (
            out.logits[:, :-1].argmax(-1).cpu())
        chunk_losses[chunk] = float(out.loss) * len(tokens)
    layout.max(predictions)  # -1 where another rank predicted
    layout.sum(chunk_losses)  # zero where another rank computed: the sum is exact
    sleeper.train(was_training)
    return Evaluation(task.score(predictions, batch), sum(chunk_losses.tolist()) / len(batch),
                      baseline)


def eval_seed(spec: Spec) -> int:
    """The seed of a run's evaluation set: ``train.eval_seed``, else the run's seed."""
    fixed = spec.train.eval_seed if spec.train is not None else None
    return spec.seed if fixed is None else fixed


def held_out(spec: Spec, task: Task, seed: int | None = None, size: int | None = None
             ) -> tuple[TaskBatch, Baseline]:
    """A run's evaluation set (``train.eval_size`` examples from :func:`eval_seed`, unless
    ``size`` or ``seed`` say otherwise) and its chance level."""
    train = spec.train or TrainSpec()
    batch = task.eval_batch(size or train.eval_size, eval_seed(spec) if seed is None else seed)
    return batch, constant_baseline(task, batch, spec.seed, train.baseline_examples)


def evaluate_spec(spec: Spec, seed: int | None = None, eval_size: int | None = None
                  ) -> Evaluation:
    """The spec's model as built, before any training (a pretrained model zero-shot, its
    retrofit edits at step 0), on the evaluation set a run of the spec is scored on."""
    if spec.task is None:
        raise SpecError("task", "a `task:` section to evaluate on")
    task = spec.task.build()
    batch, chance = held_out(spec, task, seed, eval_size)
    return evaluate(SleepingModel.from_spec(spec), task, batch,
                    (spec.train or TrainSpec()).batch_size, chance)


def evaluate_run(run: Run, seed: int | None = None, eval_size: int | None = None
                 ) -> Evaluation:
    """A loaded run on its own evaluation set (the one it was trained against, unless
    another ``seed`` or ``eval_size`` is given), at the sleep setting of ``run.spec``."""
    batch, chance = held_out(run.spec, run.task, seed, eval_size)
    return evaluate(run.model, run.task, batch, (run.spec.train or TrainSpec()).batch_size,
                    chance)

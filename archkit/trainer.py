"""Training and evaluation of one spec: a sleeping model on a task, logged to TensorBoard.

A run lives in ``runs/<name>/``: TensorBoard event files, ``metrics.jsonl`` (one line per
logged step and per evaluation), ``checkpoint/`` (safetensors weights, the resolved spec,
optimiser, scheduler and RNG state) and ``final.json``. Batches are a pure function of
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from archkit.model import HybridModel
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, TrainSpec, load_spec
from archkit.tasks import Score, Task, TaskBatch, get_task
from archkit.tracking import TrainLogger

CHECKPOINT = "checkpoint"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run directory records where."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: dict[int, float]  # step index (from 0) -> loss, for the steps this call ran
    final: Score | None  # None when interrupted
    interrupted: bool = False


def resolve_device(train: TrainSpec) -> torch.device:
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train.device)


def require(spec: Spec) -> tuple[TrainSpec, Task]:
    """The sections a training run needs, with a SpecError naming what is missing."""
    for section in ("sleep", "task", "train"):
        if getattr(spec, section) is None:
            raise SpecError(section, f"a `{section}:` section is needed to train")
    assert spec.train is not None and spec.task is not None
    return spec.train, get_task(spec.task.name, **spec.task.config.model_dump())


def curriculum(spec: Spec, task: Task) -> tuple[list[int], list[Task]]:
    """The step at which each ``train.curriculum`` stage ends, and the tasks to draw
    training batches from: one per stage, then ``task``. Step s trains on
    ``tasks[bisect.bisect_right(ends, s)]``."""
    assert spec.train is not None
    ends = list(itertools.accumulate(stage.steps for stage in spec.train.curriculum))
    stages = [get_task(t.name, **t.config.model_dump()) for t in spec.curriculum_tasks]
    return ends, [*stages, task]


def build(spec: Spec) -> SleepingModel:
    assert spec.sleep is not None
    torch.manual_seed(spec.seed)
    return SleepingModel(HybridModel(spec.model), spec.sleep)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW).

    Hidden matrices are the 2-D weights of linear layers inside the blocks; the embedding
    and head (tied or not), norms, gates, biases and conv filters go to AdamW.
    """
    hidden = {
        id(m.weight): m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}" and m.weight.dim() == 2
    }
    others = [p for p in model.parameters() if id(p) not in hidden]
    return list(hidden.values()), others


def make_optimizers(model: nn.Module, train: TrainSpec) -> list[torch.optim.Optimizer]:
    if train.optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=train.lr,
                                  weight_decay=train.weight_decay)]
    hidden, others = split_parameters(model)
    return [
        torch.optim.Muon(hidden, lr=train.lr, weight_decay=train.weight_decay,
                         adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(others, lr=train.adamw_lr, weight_decay=train.weight_decay),
    ]


def lr_factor(step: int, train: TrainSpec) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` (or constant)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine


@torch.no_grad()
def evaluate(sleeper: SleepingModel, task: Task, batch: TaskBatch, batch_size: int
             ) -> tuple[Score, float]:
    """Exact-match and per-answer accuracy of greedy predictions, and the mean loss."""
    was_training = sleeper.training
    sleeper.eval()
    device = next(sleeper.parameters()).device
    predictions = torch.full_like(batch.tokens, -1)
    losses = []
    for start in range(0, len(batch), batch_size):
        tokens = batch.tokens[start:start + batch_size].to(device)
        mask = batch.loss_mask[start:start + batch_size].to(device)
        out = sleeper(tokens, batch.context_len, mask)
        predictions[start:start + batch_size, batch.context_len + 1:] = (
            out.logits[:, :-1].argmax(-1).cpu())
        losses.append(float(out.loss) * len(tokens))
    sleeper.train(was_training)
    return task.score(predictions, batch), sum(losses) / len(batch)


def save_checkpoint(run_dir: Path, spec: Spec, sleeper: SleepingModel, step: int,
                    optimizers: list[torch.optim.Optimizer],
                    schedulers: list[torch.optim.lr_scheduler.LRScheduler]) -> None:
    """Write ``checkpoint/`` atomically: a complete directory replaces the previous one."""
    tmp, final, old = (run_dir / f"{CHECKPOINT}.{s}" for s in ("tmp", "new", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(sleeper.model, str(tmp / "model.safetensors"))
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    torch.save({
        "step": step,
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, tmp / "trainer.pt")
    tmp.rename(final)
    current = run_dir / CHECKPOINT
    if current.exists():
        current.rename(old)
    final.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load_run_spec(run_dir: Path, overrides: dict[str, Any] | None = None) -> Spec:
    path = run_dir / CHECKPOINT / "spec.yaml"
    if not path.exists():
        raise SpecError("", f"no checkpoint in {run_dir} (expected {path})", file=run_dir)
    return load_spec(path, overrides)


def load_weights(sleeper: SleepingModel, run_dir: Path) -> None:
    load_model(sleeper.model, str(run_dir / CHECKPOINT / "model.safetensors"))


def train(spec: Spec, run_dir: Path, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, float, SleepingModel], None] | None = None,
          on_eval: Callable[[int, Score], None] | None = None, log_hparams: bool = True
          ) -> TrainResult:
    """Train ``spec`` into ``run_dir``. Ctrl-C (KeyboardInterrupt) saves a checkpoint and
    returns with ``interrupted=True``; ``resume`` continues from the checkpoint exactly.
    ``on_step(step, loss, model)`` runs after every optimiser step, ``on_eval(step, score)``
    after every evaluation (``step`` counts finished steps). ``log_hparams=False`` leaves the
    TensorBoard hparams entry to the caller (a search writes its own, per trial)."""
    train_spec, task = require(spec)
    if train_spec.threads:
        torch.set_num_threads(train_spec.threads)
    device = resolve_device(train_spec)
    has_checkpoint = (run_dir / CHECKPOINT).exists()
    if has_checkpoint and not resume:
        raise SpecError("", f"{run_dir} already holds a run; pass --resume to continue it or "
                        "--name to start another", file=run_dir)
    if resume and not has_checkpoint:
        raise SpecError("", f"nothing to resume: no checkpoint in {run_dir}", file=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sleeper = build(spec).to(device).train()
    optimizers = make_optimizers(sleeper, train_spec)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, train_spec))
                  for o in optimizers]
    start = 0
    if resume:
        load_weights(sleeper, run_dir)
        state = torch.load(run_dir / CHECKPOINT / "trainer.pt", weights_only=False)
        for obj, saved in zip([*optimizers, *schedulers],
                              [*state["optimizers"], *state["schedulers"]], strict=True):
            obj.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = state["step"]
    stage_ends, stage_tasks = curriculum(spec, task)
    eval_batch = task.eval_batch(train_spec.eval_size, spec.seed)
    logger = TrainLogger(run_dir, spec, train_spec.steps, start, progress, train_spec.log_every,
                         log_hparams)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses: dict[int, float] = {}
    step, last_eval = start, None
    try:
        while step < train_spec.steps:
            tick = time.perf_counter()
            stage = bisect.bisect_right(stage_ends, step)
            batch = stage_tasks[stage].train_batch(step, train_spec.batch_size, spec.seed)
            with autocast:
                out = sleeper(batch.tokens.to(device), batch.context_len,
                              batch.loss_mask.to(device))
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                record = {"step": step, "loss": loss, "last_checkpoint": _saved_step(run_dir)}
                (run_dir / "diverged.json").write_text(json.dumps(record, indent=2))
                raise TrainingDiverged(
                    f"training diverged at step {step}: the loss is {loss}. The last good "
                    f"checkpoint (step {record['last_checkpoint']}) is kept in {run_dir}; "
                    "lower train.lr or set train.grad_clip.")
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = float(nn.utils.clip_grad_norm_(
                sleeper.parameters(), train_spec.grad_clip or float("inf")))
            for o, s in zip(optimizers, schedulers, strict=True):
                o.step()
                s.step()
            step += 1
            losses[step - 1] = loss
            tokens = batch.tokens.numel() / (time.perf_counter() - tick)
            logger.step(step, loss, grad_norm, [s.get_last_lr()[0] for s in schedulers],
                        tokens, out.report.passes, stage if stage_ends else None)
            if on_step is not None:
                on_step(step - 1, loss, sleeper)
            if step % train_spec.eval_every == 0 or step == train_spec.steps:
                last_eval = (step, *evaluate(sleeper, task, eval_batch, train_spec.batch_size))
                logger.evaluation(*last_eval)
                if on_eval is not None:
                    on_eval(step, last_eval[1])
                target = train_spec.target_accuracy
                if target and last_eval[1].overall.exact >= target:
                    save_checkpoint(run_dir, spec, sleeper, step, optimizers, schedulers)
                    break
            if step % train_spec.checkpoint_every == 0 or step == train_spec.steps:
                save_checkpoint(run_dir, spec, sleeper, step, optimizers, schedulers)
    except KeyboardInterrupt:
        save_checkpoint(run_dir, spec, sleeper, step, optimizers, schedulers)
        logger.close(None)
        return TrainResult(run_dir, losses, None, interrupted=True)
    if last_eval is None or last_eval[0] != step:
        last_eval = (step, *evaluate(sleeper, task, eval_batch, train_spec.batch_size))
    logger.close(last_eval[1], last_eval[2])
    return TrainResult(run_dir, losses, last_eval[1])


def _saved_step(run_dir: Path) -> int | None:
    path = run_dir / CHECKPOINT / "trainer.pt"
    return torch.load(path, weights_only=False)["step"] if path.exists() else None


def evaluate_run(run_dir: Path, overrides: dict[str, Any] | None = None, seed: int | None = None,
                 eval_size: int | None = None) -> tuple[Spec, Score, float]:
    """Re-evaluate a saved run, optionally at another sleep setting (e.g. more passes)."""
    spec = load_run_spec(run_dir, overrides)
    train_spec, task = require(spec)
    sleeper = build(spec)
    load_weights(sleeper, run_dir)
    batch = task.eval_batch(eval_size or train_spec.eval_size,
                            spec.seed if seed is None else seed)
    score, loss = evaluate(sleeper, task, batch, train_spec.batch_size)
    return spec, score, loss


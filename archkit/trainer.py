"""Training of one spec: a sleeping model on a task, logged to TensorBoard.

A run lives in ``runs/<name>/``: TensorBoard event files, ``metrics.jsonl`` (one line per
logged step and per evaluation), ``checkpoint/``, ``commands.jsonl`` and ``final.json``
(``archkit.checkpoint``). Batches are a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would. ``train`` reads top to bottom::

    check        the run directory; when resuming, the spec against the checkpoint's
    restore      model, optimisers and schedulers, from the checkpoint when resuming
    loop         one optimiser step per batch; log it
                 every eval_every steps: evaluate on the held-out set (stop at the target)
                 every checkpoint_every steps: checkpoint
                 Ctrl-C: finish the step, checkpoint, return
    finish       evaluate the last step, write final.json and the hparams

Resuming is exact or refused: the spec must resolve to the checkpoint's field for field,
except a larger ``train.steps``, which extends the run. The learning-rate schedule is laid
out once, over the ``train.steps`` the run started with (``schedule_steps``, kept in the
checkpoint), so extending a run changes no step's rate and every added step trains at
the schedule's last rate. Resuming a finished run with the same spec changes nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, TracebackType

import torch
from torch import nn

from archkit.card import require_memory
from archkit.checkpoint import (
    FINAL,
    describe_changes,
    has_checkpoint,
    load_run,
    load_run_spec,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    saved_step,
    spec_changes,
)
from archkit.distributed import SINGLE, Layout, rank_device
from archkit.evaluation import Evaluation, eval_seed, evaluate, evaluate_run, held_out
from archkit.model import HybridModel
from archkit.pretrained.weights import pretrained_parameters
from archkit.sleep import SleepingModel, SleepOutput
from archkit.spec import Spec, SpecError, TrainSpec
from archkit.tasks import Task, TaskBatch
from archkit.tracking import SilentLogger, TrainLogger, read_records, supersede_final

COMMANDS = "commands.jsonl"
EVAL_SET = "eval_set.json"
# ``archkit ... --background`` (archkit.cli.detach) names a file here for the detached
# process to create once a run has started, so that it can say so truthfully.
STARTED_FILE_ENV = "ARCHKIT_STARTED_FILE"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run directory records where."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: dict[int, float]  # step index (from 0) -> loss, for the steps this call ran
    final: Evaluation | None  # None when interrupted
    interrupted: bool = False
    # resumed a finished run: nothing trained or written; ``final`` evaluates the checkpoint
    already_finished: bool = False


def resolve_device(train: TrainSpec) -> torch.device:
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train.device == "cuda" and not torch.cuda.is_available():
        raise SpecError("train.device", "a device this machine has: CUDA is not available "
                        "here (use cpu, or auto to take CUDA where there is one)", "cuda")
    return torch.device(train.device)


def require(spec: Spec) -> tuple[TrainSpec, Task]:
    """The sections a training run needs, with a SpecError naming what is missing."""
    for section in ("sleep", "task", "train"):
        if getattr(spec, section) is None:
            raise SpecError(section, f"a `{section}:` section is needed to train")
    assert spec.train is not None and spec.task is not None
    return spec.train, spec.task.build()


def curriculum(spec: Spec, task: Task) -> tuple[list[int], list[Task]]:
    """The step at which each ``train.curriculum`` stage ends, and the tasks to draw
    training batches from: one per stage, then ``task``. Step s trains on
    ``tasks[bisect.bisect_right(ends, s)]``."""
    assert spec.train is not None
    ends = list(itertools.accumulate(stage.steps for stage in spec.train.curriculum))
    return ends, [*(stage.build() for stage in spec.curriculum_tasks), task]


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


def make_optimizers(model: nn.Module, train: TrainSpec) -> dict[str, torch.optim.Optimizer]:
    """The optimisers by name (the name is the ``lr/<optimizer>`` metric's), over the
    parameters that are not frozen; one with nothing to train is left out."""
    def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad]

    everything = trainable(model.parameters())
    if not everything:
        raise SpecError("train.freeze", "parameter groups that leave something to train",
                        train.freeze.model_dump())
    if train.optimizer == "adamw":
        return {"adamw": torch.optim.AdamW(everything, lr=train.lr,
                                           weight_decay=train.weight_decay)}
    hidden, others = (trainable(group) for group in split_parameters(model))
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if hidden:
        optimizers["muon"] = torch.optim.Muon(hidden, lr=train.lr, adjust_lr_fn="match_rms_adamw",
                                              weight_decay=train.weight_decay)
    if others:
        optimizers["adamw"] = torch.optim.AdamW(others, lr=train.adamw_lr,
                                                weight_decay=train.weight_decay)
    return optimizers


def freeze_parameters(model: HybridModel, spec: Spec) -> None:
    """No gradient for the parameter groups ``train.freeze`` names."""
    assert spec.train is not None
    freeze = spec.train.freeze
    frozen: set[str] = set()
    if freeze.embeddings:
        frozen |= {"embedding.weight", "head.weight"}
    if freeze.pretrained:
        frozen |= pretrained_parameters(model, spec.model)
    prefixes = tuple(f"layers.{i}." for i in freeze.layers)
    for name, parameter in model.named_parameters():
        if name in frozen or (prefixes and name.startswith(prefixes)):
            parameter.requires_grad_(False)


def lr_factor(step: int, train: TrainSpec, schedule_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at ``schedule_steps`` (the
    ``train.steps`` the run started with), or constant. Steps beyond ``schedule_steps``, which
    a run extended with a larger ``train.steps`` takes, keep the last factor."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = (step - train.warmup_steps) / max(1, schedule_steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine


@dataclass
class TrainState:
    """Everything a checkpoint restores: the model, its optimisers and schedules, the step."""

    sleeper: SleepingModel
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    schedule_steps: int  # the train.steps the learning-rate schedule is laid out over
    step: int = 0  # finished steps
    losses: dict[int, float] = field(default_factory=dict)

    def lrs(self) -> dict[str, float]:
        return {name: s.get_last_lr()[0]
                for name, s in zip(self.optimizers, self.schedulers, strict=True)}

    def trainer_state(self, layout: Layout = SINGLE) -> dict:
        """Optimisers (whole, in one layout however the run is sharded), schedulers, step
        and random state; under several ranks every rank must call it."""
        return {
            "step": self.step,
            "schedule_steps": self.schedule_steps,
            "optimizers": [layout.optimizer_state(self.sleeper, o)
                           for o in self.optimizers.values()],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }


# Fields that say where and how a run computes, not what: a resume may change them (a search that
# resumes a trial with another number of workers gives it another thread count). The
# losses then equal an uninterrupted run's up to floating-point reduction order.
WHERE_IT_RUNS = ("train.threads", "train.device", "train.compile", "train.parallel")


def check_run_dir(spec: Spec, run_dir: Path, resume: bool) -> Spec | None:
    """Refuse to start over a run or to resume nothing; when resuming, return the
    checkpoint's spec after refusing a ``spec`` that differs from it in anything but a
    larger ``train.steps`` (or where it runs: ``WHERE_IT_RUNS``). Reads only."""
    if has_checkpoint(run_dir) and not resume:
        raise SpecError("", "it already holds a run; pass --resume to continue it or "
                        "--name to start another", file=run_dir)
    if not resume:
        return None
    if not has_checkpoint(run_dir):
        raise SpecError("", "nothing to resume: no checkpoint in it", file=run_dir)
    trained = load_run_spec(run_dir)
    refused = {name: (old, new) for name, (old, new) in spec_changes(trained, spec).items()
               if not (name == "train.steps" and new > old) and name not in WHERE_IT_RUNS}
    if refused:
        raise SpecError("resume", f"the spec differs from the checkpoint's: "
                        f"{describe_changes(refused)}. Only a larger train.steps (it extends "
                        "the run) and how it runs (train.threads, train.device, train.compile) "
                        "may change; resume with the checkpoint's spec or train another run "
                        "under another name", file=run_dir)
    return trained


def restore(spec: Spec, run_dir: Path, trained: Spec | None, device: torch.device,
            layout: Layout = SINGLE) -> TrainState:
    """A fresh model and optimisers, or, resuming a run trained as ``trained``, the
    checkpoint's; sharded when ``layout`` says so (the weights are loaded whole on every
    rank first, then sharded)."""
    train = spec.train
    assert train is not None
    saved = None if trained is None else load_trainer_state(run_dir)
    schedule_steps = train.steps
    if saved is not None:
        assert trained is not None and trained.train is not None
        # checkpoints written before schedule_steps was kept were never extended
        schedule_steps = int(saved.get("schedule_steps", trained.train.steps))
    sleeper = SleepingModel.from_spec(spec, pretrained=saved is None).to(device).train()
    freeze_parameters(sleeper.model, spec)
    if train.compile:
        sleeper.model.compile_passes()
    if saved is not None:
        load_weights(sleeper, run_dir)
    layout.shard(sleeper, sleeper.model.layers)
    optimizers = make_optimizers(sleeper, train)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(
        o, lambda s: lr_factor(s, train, schedule_steps)) for o in optimizers.values()]
    state = TrainState(sleeper, optimizers, schedulers, schedule_steps)
    if saved is not None:
        for optimizer, optimizer_state in zip(optimizers.values(), saved["optimizers"],
                                              strict=True):
            layout.load_optimizer_state(sleeper, optimizer, optimizer_state)
        for scheduler, scheduler_state in zip(schedulers, saved["schedulers"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state.step = saved["step"]
    return state


def record_eval_set(run_dir: Path, batch: TaskBatch, seed: int) -> None:
    """``eval_set.json``: which examples the run is scored on (count, seed, fingerprint)."""
    record = {"examples": len(batch), "seed": seed, "sha256": batch.fingerprint()}
    (run_dir / EVAL_SET).write_text(json.dumps(record, indent=2) + "\n")


def record_command(run_dir: Path, step: int, ranks: int = 1) -> None:
    """Append the command line of this process, and how many ranks train with it, to the
    run's ``commands.jsonl``."""
    entry = {"argv": sys.argv, "cwd": os.getcwd(), "from_step": step, "ranks": ranks,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(run_dir / COMMANDS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def announce_start() -> None:
    """Create the file a parent waiting in ``archkit ... --background`` named in
    :data:`STARTED_FILE_ENV`; only the first run of a process announces."""
    path = os.environ.pop(STARTED_FILE_ENV, None)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):  # the parent has stopped waiting
            Path(path).touch()


class StopRequest:
    """Ctrl-C (SIGINT) while training. The first asks the run to stop at the end of the
    current step, so that the checkpoint it saves is the state between two steps and the
    step's records are complete; a second stops at once, keeping the last checkpoint.
    Installed only where Ctrl-C would raise KeyboardInterrupt: in the main thread, under
    Python's default handler."""

    def __init__(self) -> None:
        self.requested = self.forced = self.installed = False

    def __enter__(self) -> StopRequest:
        self.installed = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.installed:
            signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("archkit: stopping after this step to save a checkpoint (Ctrl-C again to stop "
              "at once)", file=sys.stderr)


def train_step(state: TrainState, batch: TaskBatch, train: TrainSpec, device: torch.device,
               run_dir: Path, layout: Layout = SINGLE, model: nn.Module | None = None
               ) -> tuple[SleepOutput, float, float]:
    """One optimiser step on ``batch`` (under several ranks, on this rank's rows of it,
    through ``model``, the DistributedDataParallel replica of ``state.sleeper``); returns
    the model output, the loss of the whole batch and the gradient norm. A non-finite loss
    stops the run with :class:`TrainingDiverged` before the step."""
    mine = layout.rows(batch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        out = (model or state.sleeper)(mine.tokens.to(device), mine.context_len,
                                       mine.loss_mask.to(device))
    weighted = out.loss * layout.loss_weight(mine, batch)
    share = weighted.detach().double().cpu().reshape(1) / layout.world
    loss = float(layout.sum(share)[0])
    if not math.isfinite(loss):
        record = {"step": state.step, "loss": loss, "last_checkpoint": saved_step(run_dir)}
        if layout.writer:
            (run_dir / "diverged.json").write_text(json.dumps(record, indent=2))
        raise TrainingDiverged(
            f"training diverged at step {state.step}: the loss is {loss}. The last good "
            f"checkpoint (step {record['last_checkpoint']}) is kept in {run_dir}; "
            "lower train.lr or set train.grad_clip.")
    for optimizer in state.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    weighted.backward()
    grad_norm = layout.scalar(nn.utils.clip_grad_norm_(state.sleeper.parameters(),
                                                       train.grad_clip or float("inf")))
    for optimizer, scheduler in zip(state.optimizers.values(), state.schedulers, strict=True):
        optimizer.step()
        scheduler.step()
    state.losses[state.step] = loss
    state.step += 1
    return out, loss, grad_norm


def due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def train(spec: Spec, run_dir: Path, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, float, SleepingModel], None] | None = None,
          on_eval: Callable[[int, Evaluation], None] | None = None, log_hparams: bool = True,
          final_table: bool = True, layout: Layout = SINGLE) -> TrainResult:
    """Train ``spec`` into ``run_dir``. Ctrl-C saves a checkpoint at the end of the step and
    returns with ``interrupted=True``; ``resume`` continues from the checkpoint exactly, or
    extends the run to a larger ``train.steps``, and refuses any other change of the spec
    (module docstring). ``on_step(step, loss, model)`` runs after every optimiser step,
    ``on_eval(step, evaluation)`` after every evaluation (``step`` counts finished steps);
    either may raise KeyboardInterrupt to stop the run as Ctrl-C does.
    ``log_hparams=False`` leaves the TensorBoard hparams entry to the caller (a search
    writes its own, per trial); ``progress`` shows the live bar, ``final_table`` the
    final evaluation by difficulty. ``layout``: this process's rank among several that
    train the run together (archkit.distributed); rank 0 alone writes."""
    train_spec, task = require(spec)
    trained = check_run_dir(spec, run_dir, resume)
    extended = trained is not None and trained.train is not None and \
        train_spec.steps > trained.train.steps
    finished = (run_dir / FINAL).exists()
    if trained is not None and finished and not extended:
        return TrainResult(run_dir, {}, evaluate_run(load_run(run_dir)), already_finished=True)
    if train_spec.threads:
        torch.set_num_threads(train_spec.threads)
    device = rank_device(resolve_device(train_spec))
    require_memory(spec.model, device, training=True)
    layout.check_batch_size(train_spec.batch_size)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(str(run_dir), f"cannot create the run directory ({err.strerror})"
                        ) from None
    state = restore(spec, run_dir, trained, device, layout)
    replica = layout.wrap(state.sleeper, device)
    layout.wait_for_all()  # every rank has read the run directory before rank 0 writes
    stage_ends, stage_tasks = curriculum(spec, task)
    eval_batch, chance = held_out(spec, task)
    logger: TrainLogger | SilentLogger = SilentLogger()
    if layout.writer:
        if extended and finished:
            supersede_final(run_dir, state.step)
        record_command(run_dir, state.step, layout.world)
        record_eval_set(run_dir, eval_batch, eval_seed(spec))
        logger = TrainLogger(run_dir, spec, train_spec.steps,
                             None if trained is None else state.step, progress,
                             train_spec.log_every, log_hparams, final_table)
    if trained is None or extended:
        logger.spec_text(state.step)
    announce_start()

    def checkpoint() -> None:
        weights = layout.model_state(state.sleeper.model)  # every rank: a collective
        trainer_state = state.trainer_state(layout)
        if layout.writer:
            save_checkpoint(run_dir, spec, weights, trainer_state)

    def evaluate_now() -> tuple[int, Evaluation]:
        result = evaluate(state.sleeper, task, eval_batch, train_spec.batch_size, chance,
                          layout.for_evaluation)
        logger.evaluation(state.step, result)
        if on_eval is not None:
            on_eval(state.step, result)
        return state.step, result

    def interrupted(stop: StopRequest) -> TrainResult:
        if not stop.forced:
            checkpoint()
        logger.close(None, state.step)
        return TrainResult(run_dir, state.losses, None, interrupted=True)

    last_eval: tuple[int, Evaluation] | None = None
    until = train_spec.until
    # rank 0's logger has dropped records past the checkpoint: a resumed run's rule sees
    # the evaluations before it, as an uninterrupted run's would
    history = [] if until is None else [r[until.metric] for r in read_records(run_dir, "eval")
                                        if until.metric in r]
    with StopRequest() as stop:
        try:
            while state.step < train_spec.steps:
                tick = time.perf_counter()
                stage = bisect.bisect_right(stage_ends, state.step)
                batch = stage_tasks[stage].train_batch(state.step, train_spec.batch_size,
                                                       spec.seed)
                out, loss, grad_norm = train_step(state, batch, train_spec, device, run_dir,
                                                  layout, replica)
                logger.step(state.step, loss, grad_norm, state.lrs(),
                            batch.tokens.numel() / (time.perf_counter() - tick),
                            out.report.passes, stage if stage_ends else None)
                if on_step is not None:
                    on_step(state.step - 1, loss, state.sleeper)
                if due(state.step, train_spec.eval_every, train_spec.steps):
                    last_eval = evaluate_now()
                    target = train_spec.target_exact
                    if until is not None:
                        history.append(last_eval[1].metrics()[until.metric])
                    reached = target and last_eval[1].score.overall.exact >= target
                    plateau = until is not None and not until.improved(history)
                    # rank 0's history is the one truncated at the checkpoint: its word goes
                    if layout.any(layout.writer and bool(reached or plateau)):
                        checkpoint()
                        break
                if due(state.step, train_spec.checkpoint_every, train_spec.steps):
                    checkpoint()
                if layout.any(stop.requested) and state.step < train_spec.steps:
                    return interrupted(stop)
        except KeyboardInterrupt:
            return interrupted(stop)
    if last_eval is None or last_eval[0] != state.step:
        last_eval = state.step, evaluate(state.sleeper, task, eval_batch,
                                         train_spec.batch_size, chance,
                                         layout.for_evaluation)
    logger.close(last_eval[1], state.step)
    layout.wait_for_all()  # final.json is written when any rank returns
    return TrainResult(run_dir, state.losses, last_eval[1])

"""The embedded backend: an Optuna study in ``runs/<name>/study.journal``, or in any Optuna
storage URL (``--storage sqlite:///study.db``, ``postgresql://...``).

Both kinds of storage are safe for several processes, so ``--workers N`` starts N local
processes on one study, and several ``archkit search`` commands on the same space (on
one machine, or on several sharing ``runs/``) are workers of one study. Each worker
loops: under a file lock it recovers abandoned trials, counts the trials that have used
the budget (complete ones and those failed for a reason of their own: an invalid spec, a
divergence) plus the running ones, asks for a new trial if there is room and takes the
trial's lock, then runs it and tells the study the objective values. A worker stops once
the budget is used; while running trials take the rest of it, it waits, so every command
on a study ends with the whole front, and a trial whose process dies meanwhile is taken
over. Trial ``n`` runs in ``trials/<n:04d>``, Optuna's trial number.

A running trial holds an exclusive lock on ``trials/<n>/.running.lock`` for as long as
its process lives (the kernel releases it when the process dies), so a trial is
abandoned exactly when its lock is free. Nothing finished is lost: an abandoned trial,
or one stopped by Ctrl-C, is marked failed and enqueued again with the same parameters;
its retry moves the directory to its own number and resumes the checkpoint.

``--workers auto`` (the default) starts one worker per free core, a core being free when
it was idle over half a second before the search starts, but no more workers than trials
left; each
trial then trains on ``threads`` threads (the space's, or 1). The workers run in their
own process group: a Ctrl-C in the terminal reaches the search command alone, which
passes it on to every worker once, so each stops after its current step with a
checkpoint (a second Ctrl-C stops them at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from archkit.searching.backends import SearchJob
from archkit.searching.pareto import write_reports
from archkit.searching.space import SearchSpace
from archkit.searching.trial import TrialInterrupted, load_results, run_trial, trial_line
from archkit.spec import SpecError
from archkit.workers import free_cores, run_in_processes

console = Console(stderr=True)  # progress; results go to stdout
RUNNING_LOCK = ".running.lock"
WAIT_S = 2.0  # how often a worker with no trial left to start looks at the running ones


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_study(space: SearchSpace, root: Path, storage: str | None = None) -> optuna.Study:
    """The search's study: in ``storage`` (an Optuna URL), or in ``root/study.journal``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = storage or JournalStorage(JournalFileBackend(str(root / "study.journal")))
    study = optuna.create_study(study_name=space.name, storage=backend, load_if_exists=True,
                                directions=space.directions, sampler=space.make_sampler())
    if study.metric_names is None:  # Optuna's tools then show "exact", not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(space.metrics)
    return study


def used_budget(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and "reason" in trial.user_attrs)


def trial_dir(root: Path, number: int) -> Path:
    return root / "trials" / f"{number:04d}"


def hold(run_dir: Path) -> TextIO:
    """Take the running trial's lock (kept until the returned handle is closed, or the
    process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / RUNNING_LOCK, "w")  # noqa: SIM115 (held while the trial runs)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def abandoned(trial: FrozenTrial) -> bool:
    """Whether no live process holds the running trial's lock."""
    lock = Path(trial.user_attrs.get("run_dir", "")) / RUNNING_LOCK
    if "run_dir" not in trial.user_attrs or not lock.exists():
        return True
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def recover(study: optuna.Study) -> int:
    """Fail the running trials whose process died, and enqueue every interrupted trial
    again (once) with its parameters. Call it under the ask lock. Returns how many were
    enqueued."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if abandoned(trial):
            study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    interrupted = [t for t in trials if t.state == TrialState.FAIL and not used_budget(t)
                   and t.number not in retried and "run_dir" in t.user_attrs]
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return len(interrupted)


def start_trial(study: optuna.Study, space: SearchSpace, root: Path
                ) -> tuple[optuna.Trial, dict[str, Any], Path, TextIO] | int | None:
    """Under the ask lock: recover, then a new trial, its directory (a retry's checkpoint
    moved there) and its lock; None once the budget is used; the number of running trials
    when they take the rest of it (this worker then waits: if one of them dies, it
    takes the trial over)."""
    with file_lock(root / ".ask.lock"):
        enqueued = recover(study)
        if enqueued:
            console.print(f"resuming: {enqueued} interrupted trial(s) enqueued again")
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        used = sum(map(used_budget, trials))
        if used >= space.trials():
            return None
        if used + running >= space.trials():
            return running
        study.sampler = space.make_sampler(draw=len(trials))
        trial = study.ask()
        params = space.suggest(trial)
        run_dir = trial_dir(root, trial.number)
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None:
            previous = Path(trials[retry_of].user_attrs["run_dir"])
            if previous.exists() and not run_dir.exists():
                previous.rename(run_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        return trial, params, run_dir, hold(run_dir)


def worker(space: SearchSpace, root: Path, threads: int, verbose: bool,
           deadline: float | None, storage: str | None) -> None:
    """Run trials until the budget is used or the deadline has passed."""
    study = open_study(space, root, storage)
    waiting = False
    while deadline is None or time.time() < deadline:
        started = start_trial(study, space, root)
        if started is None:
            return
        if isinstance(started, int):
            if not waiting:
                console.print(f"waiting for {started} running trial(s) to finish")
            waiting = True
            time.sleep(WAIT_S)
            continue
        waiting = False
        trial, params, run_dir, lock = started
        with lock:
            try:
                record = run_trial(space, params, run_dir, run_dir.name, threads, verbose,
                                   report=IntermediateValues(trial, space))
            except TrialInterrupted:
                study.tell(trial, state=TrialState.FAIL)
                raise
            if record["state"] == "complete":
                for name, value in record["metrics"].items():
                    trial.set_user_attr(name, value)
                study.tell(trial, [record["metrics"][m] for m in space.metrics])
            else:
                trial.set_user_attr("reason", record["reason"])
                study.tell(trial, state=TrialState.FAIL)
        console.print(trial_line(record, space.metrics))
        write_reports(root, load_results(root), space)


class IntermediateValues:
    """Reports a trial's first objective after each evaluation: as Optuna's intermediate
    value when the study has one objective; with several (Optuna keeps intermediate values
    for single-objective studies only) as the user attribute ``intermediate/<metric>``, a
    list of [step, value]. A step is reported once (the final report repeats the last)."""

    def __init__(self, trial: optuna.Trial, space: SearchSpace) -> None:
        self.trial, self.metric = trial, space.metrics[0]
        self.single = len(space.metrics) == 1
        self.values: dict[int, float] = {}

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if step in self.values:
            return
        self.values[step] = metrics[self.metric]
        if self.single:
            self.trial.report(self.values[step], step)
        else:
            self.trial.set_user_attr(f"intermediate/{self.metric}",
                                     [[s, v] for s, v in sorted(self.values.items())])


def _worker_process(space_json: str, root: str, threads: int, verbose: bool,
                    deadline: float | None, storage: str | None, index: int) -> None:
    space = SearchSpace.model_validate_json(space_json)
    try:
        worker(space, Path(root), threads, verbose, deadline, storage)
    except KeyboardInterrupt:
        console.print(f"worker {index}: interrupted, checkpoint saved")


def run(job: SearchJob) -> None:
    """The backend's entry point (``archkit.searching.backends``)."""
    space, root = job.space, job.root
    if space.trial_workers > 1:
        raise SpecError("trial_workers", "1 with the optuna backend; trials of several "
                        "ranks run on the ray backend (--backend ray)", space.trial_workers)
    study = open_study(space, root, job.storage)  # created before the workers race for it
    if job.workers is None:
        threads = space.threads or 1
        left = space.trials() - sum(used_budget(t) for t in study.get_trials(deepcopy=False))
        workers = max(1, min(free_cores() // threads, left))
    else:
        workers = job.workers
        threads = space.threads or max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        worker(space, root, threads, job.verbose, job.deadline, job.storage)
        return
    console.print(f"{workers} workers, {threads} thread{'s' * (threads > 1)} per trial")
    run_in_processes(_worker_process, [(space.model_dump_json(by_alias=True), str(root),
                                        threads, job.verbose, job.deadline, job.storage, i)
                                       for i in range(workers)])

"""The embedded backend: an Optuna study in ``runs/<name>/study.journal``.

Journal file storage is safe for several processes, so ``--workers N`` starts N local
processes on one study. Each worker loops: under a file lock it counts the trials that
have used the budget (complete ones and those failed for a reason of their own: an
invalid spec, a divergence) plus the running ones, asks for a new trial if there is room,
runs it, and tells the study the objective values.

Nothing finished is lost. Running the same command again loads the study. A trial left
running by a killed process, or stopped by Ctrl-C, is marked failed and enqueued again
with the same parameters and run directory, so it resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from archkit.searching.backends import SearchJob
from archkit.searching.pareto import write_reports
from archkit.searching.space import SearchSpace
from archkit.searching.trial import TrialInterrupted, load_results, run_trial, trial_line

console = Console()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_study(space: SearchSpace, root: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(root / "study.journal")))
    study = optuna.create_study(study_name=space.name, storage=storage, load_if_exists=True,
                                directions=space.directions, sampler=space.make_sampler())
    if study.metric_names is None:  # Optuna's tools then show "exact", not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(space.metrics)
    return study


def used_budget(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and "reason" in trial.user_attrs)


def recover(study: optuna.Study) -> int:
    """Fail trials a dead process left running and enqueue every interrupted trial again
    (once) with its parameters and run directory. Returns how many were enqueued."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    interrupted = [t for t in trials if t.state == TrialState.FAIL and not used_budget(t)
                   and t.number not in retried and "run_dir" in t.user_attrs]
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                      "run_dir": trial.user_attrs["run_dir"]})
    return len(interrupted)


def worker(space: SearchSpace, root: Path, threads: int, progress: bool,
           deadline: float | None) -> None:
    """Run trials until the budget is used or the deadline has passed."""
    study = open_study(space, root)
    while deadline is None or time.time() < deadline:
        with file_lock(root / ".ask.lock"):
            trials = study.get_trials(deepcopy=False)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if sum(map(used_budget, trials)) + running >= space.trials():
                return
            trial = study.ask()
            params = space.suggest(trial)
        run_dir = Path(trial.user_attrs.get("run_dir") or root / "trials" / f"{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            record = run_trial(space, params, run_dir, run_dir.name, threads, progress,
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
        with file_lock(root / ".report.lock"):
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


def _worker_process(space_json: str, root: str, threads: int, deadline: float | None,
                    index: int) -> None:
    space = SearchSpace.model_validate_json(space_json)
    try:
        worker(space, Path(root), threads, False, deadline)
    except KeyboardInterrupt:
        console.print(f"worker {index}: interrupted, checkpoint saved")


def run(job: SearchJob) -> None:
    """The backend's entry point (``archkit.searching.backends``)."""
    space, root, workers, progress, deadline = (job.space, job.root, job.workers,
                                                job.progress, job.deadline)
    study = open_study(space, root)
    enqueued = recover(study)
    if enqueued:
        console.print(f"resuming: {enqueued} interrupted trial(s) enqueued again")
    threads = space.threads or max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        worker(space, root, threads, progress, deadline)
        return
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process,
                                 args=(space.model_dump_json(by_alias=True), str(root),
                                       threads, deadline, i)) for i in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.join()
        raise

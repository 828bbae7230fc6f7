"""The distributed backend: the same space and objectives through Ray Tune.

``ray.tune.Tuner`` runs one function trial per sampled configuration, with Optuna
(``OptunaSearch``, the sampler from the YAML) proposing them and ``threads`` CPUs reserved
per trial. Tune's own experiment state lives in ``runs/<name>/ray`` and the trial runs in
``runs/<name>/trials/ray_<id>``, so ``archkit pareto`` reads both backends alike. Running
the command again restores the experiment (``Tuner.restore``): finished trials are kept and
unfinished ones resume from their own checkpoints.

``trial_workers: K`` in the space makes each trial a data-parallel run of K ranks: the
trial (a Tune function that reserves no CPU of its own) measures latency, then starts a
Ray Train ``TorchTrainer`` of K workers, ``threads`` CPUs each, whose process group
(gloo on CPU, nccl on GPU) ``archkit.trainer.train`` joins as its ``Layout``; the workers
report each evaluation to Tune through Ray Train (``TuneReportCallback``). At most
cluster CPUs / (K x threads) such trials run at once.

With a single objective, ``ray.asha`` adds ASHA early stopping on the evaluations a trial
reports while it trains. Tune hands Optuna a stopped trial's last, partial values; such a
trial is recorded here as ``stopped`` and never enters the Pareto front.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.train
import torch.distributed as dist
from ray import tune
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console

from archkit.checkpoint import load_run, saved_step
from archkit.distributed import Layout
from archkit.evaluation import Evaluation, evaluate_run
from archkit.metrics import find
from archkit.searching.backends import SearchJob
from archkit.searching.pareto import write_reports
from archkit.searching.space import SearchSpace
from archkit.searching.trial import RESULT, load_results, run_trial, trial_line
from archkit.spec import Spec, SpecError, parse_spec
from archkit.trainer import TrainResult, train

console = Console(stderr=True)  # progress; results go to stdout
MAX_RETRIES = 2  # a trial whose node died runs again, up to this many times


def _trainable(config: dict[str, Any], space_json: str, root: str, threads: int) -> None:
    """One trial. Tune runs it again after a failure (its node died, say): it then resumes
    the trial's checkpoint, or repeats the result of a trial that had finished, so a retry
    never trains twice what was trained and a trial that failed on its own (an invalid
    spec, a divergence) fails again at once."""
    space = SearchSpace.model_validate_json(space_json)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(root) / "trials" / f"ray_{trial_id}"
    params = {key: config[key] for key in space.params}

    def report(metrics: dict[str, float], step: int) -> None:
        tune.report(metrics)  # Tune counts the reports itself (training_iteration)

    finished = run_dir / RESULT
    if finished.exists():
        record = json.loads(finished.read_text())
        if record["state"] == "complete":
            report(record["metrics"], record["step"])
    else:
        train_fn = train if space.trial_workers == 1 else partial(
            train_on_workers, workers=space.trial_workers, threads=threads)
        record = run_trial(space, params, run_dir, f"ray_{trial_id}", threads, report=report,
                           node=ray.get_runtime_context().get_node_id(), train_fn=train_fn)
    if record["state"] != "complete":
        raise RuntimeError(record["reason"])


def train_on_workers(spec: Spec, run_dir: Path, resume: bool, progress: bool,
                     on_eval: Callable[[int, Evaluation], None], log_hparams: bool,
                     final_table: bool, workers: int, threads: int) -> TrainResult:
    """A trial's training as a Ray Train run of ``workers`` ranks (a ``TrainFunction``);
    the final evaluation is read back from the checkpoint rank 0 wrote."""
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir),
                           "resume": resume},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=ray.cluster_resources().get("GPU", 0) > 0,
            resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=run_dir.name,
                                       storage_path=str(run_dir.parent.parent / "ray_train"),
                                       callbacks=[TuneReportCallback()]))
    trainer.fit()
    final = evaluate_run(load_run(run_dir))
    on_eval(saved_step(run_dir) or 0, final)
    return TrainResult(run_dir, {}, final)


def _train_worker(config: dict[str, Any]) -> None:
    """One rank of a multi-worker trial, in a Ray Train worker whose process group Ray
    Train has set up; every rank reports each evaluation (rank 0's reaches Tune)."""
    run_dir = Path(config["run_dir"])
    spec = parse_spec(config["spec"], run_dir)
    assert spec.train is not None
    layout = Layout(dist.get_rank(), dist.get_world_size(),
                    sharded=spec.train.parallel == "fsdp")

    def on_eval(step: int, evaluation: Evaluation) -> None:
        ray.train.report({**evaluation.metrics(), "step": step})

    train(spec, run_dir, resume=config["resume"], progress=False, on_eval=on_eval,
          log_hparams=False, final_table=False, layout=layout)


def run(job: SearchJob) -> None:
    """The backend's entry point (``archkit.searching.backends``)."""
    if job.storage is not None:
        raise SpecError("--storage", "Ray Tune keeps its experiment in runs/<name>/ray; "
                        "--storage is for the optuna backend", job.storage)
    if job.workers is not None and job.workers > 1:
        raise SpecError("--workers", "Ray Tune runs as many trials at once as the cluster's "
                        "CPUs allow; --workers is for the optuna backend", job.workers)
    space, root, address = job.space, job.root, job.address
    deadline_s = job.deadline - time.time() if job.deadline is not None else None
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0
    # Tune's own TensorBoard logger would show every trial a second time, as a
    # ray/_trainable_* run beside archkit's trials/ray_<id>; its CSV and JSON are kept.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = space.threads or 1
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else os.cpu_count())
    try:
        _fit(space, root, threads, deadline_s)
    finally:
        if started_here:
            ray.shutdown()


def _fit(space: SearchSpace, root: Path, threads: int, deadline_s: float | None) -> None:
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, space_json=space.model_dump_json(by_alias=True),
                             root=str(root.resolve()), threads=threads),
        # a multi-worker trial's workers reserve its CPUs; Tune refuses an empty request,
        # so the trial itself asks for a token of memory only
        {"cpu": threads} if space.trial_workers == 1 else {"cpu": 0, "memory": 2**20})
    experiment = root.resolve() / "ray"
    if tune.Tuner.can_restore(str(experiment)):
        console.print(f"resuming the Ray Tune experiment in {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
    else:
        run_config = tune.RunConfig(name="ray", storage_path=str(root.resolve()), verbose=0,
                                    failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
                                    callbacks=[Reporter(space, root), CSVLoggerCallback(),
                                               JsonLoggerCallback()])
        tuner = tune.Tuner(trainable, tune_config=_tune_config(space, deadline_s, threads),
                           run_config=run_config)
    tuner.fit()


def _tune_config(space: SearchSpace, deadline_s: float | None, threads: int
                 ) -> tune.TuneConfig:
    modes = ["max" if d == "maximize" else "min" for d in space.directions]
    single = len(space.metrics) == 1
    search = OptunaSearch(space=space.suggest, metric=space.metrics[0] if single else space.metrics,
                          mode=modes[0] if single else modes, sampler=space.make_sampler())
    scheduler = None
    if space.ray.asha is not None:
        scheduler = ASHAScheduler(metric=space.metrics[0], mode=modes[0],
                                  grace_period=space.ray.asha.grace_period,
                                  reduction_factor=space.ray.asha.reduction_factor,
                                  max_t=_evaluations(space))
    at_once = None  # multi-worker trials reserve nothing themselves: Tune must be told
    if space.trial_workers > 1:
        cpus = ray.cluster_resources().get("CPU", 1)
        at_once = max(1, int(cpus // (space.trial_workers * threads)))
    # reused actors keep torch imported between trials: seconds per trial on a small CPU
    return tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=space.trials(),
                           time_budget_s=deadline_s, reuse_actors=True,
                           max_concurrent_trials=at_once)


def _evaluations(space: SearchSpace) -> int:
    """How many results a full trial reports, ASHA's ``max_t``: one per evaluation, and
    the final one."""
    train = space.trial_spec({}, space.name).train
    assert train is not None
    return -(-train.steps // train.eval_every) + 1


class Reporter(tune.Callback):
    """Record trials that did not complete (stopped early, or failed before writing their
    result), print a line per trial and redraw the front as each one ends."""

    def __init__(self, space: SearchSpace, root: Path) -> None:
        self.space, self.root = space, root

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        self._show(trial, "stopped", "stopped early by the scheduler")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._show(trial, "failed", f"the trial raised an error; see {trial.local_path}")

    def _show(self, trial: Trial, state: str, reason: str) -> None:
        record = record_unfinished(self.space, self.root, trial.trial_id, trial.config,
                                   trial.last_result or {}, state, reason)
        console.print(trial_line(record, self.space.metrics))
        write_reports(self.root, load_results(self.root), self.space)


def record_unfinished(space: SearchSpace, root: Path, trial_id: str, config: dict[str, Any],
                      last: dict[str, Any], state: str, reason: str) -> dict[str, Any]:
    """The trial's record; written here, from its last result, when the trial itself did
    not get to write one (stopped early, or crashed). Partial values stay out of fronts."""
    run_dir = root / "trials" / f"ray_{trial_id}"
    path = run_dir / RESULT
    if path.exists():
        return json.loads(path.read_text())
    metrics = {k: v for k, v in last.items() if find(k) is not None}  # not Ray's own keys
    record = {"trial": f"ray_{trial_id}", "state": state, "reason": reason,
              "params": {k: config.get(k) for k in space.params}, "metrics": metrics}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record

"""One trial, whatever the backend: validate its spec, measure its latency, train it.

A trial pins itself to its own CPU cores (a "slot": one of cores // threads, claimed by a
file lock in the temp directory, so concurrent trials on a machine never share cores) and
measures wake latency there before training, ``bench.repeats`` times; the median is the
objective and the relative spread between repeats is recorded beside it. Wake cost does
not depend on the weights, so the untrained model gives the trained one's latency; only an
adaptive controller's sleep cost does, and that figure is then the untrained model's.

Every finished trial leaves ``result.json`` in its run directory: its state (complete or
failed, with the reason), parameters, metrics (``archkit.metrics`` names: the final
evaluation, the bench figures and the model card's), the latency of each bench repeat and
the node it ran on (a host name, or a Ray node id).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from archkit.bench import bench_inputs, measure
from archkit.card import model_card
from archkit.checkpoint import has_checkpoint, load_run_spec
from archkit.evaluation import Evaluation
from archkit.metrics import find
from archkit.searching.space import SearchSpace
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError
from archkit.trainer import TrainingDiverged, TrainResult, train

RESULT = "result.json"


class TrialInterrupted(KeyboardInterrupt):
    """Ctrl-C during a trial: its checkpoint is saved and a rerun resumes it."""


@contextlib.contextmanager
def cpu_slot(key: str, threads: int) -> Iterator[list[int]]:
    """Hold a slot of ``threads`` cores of this machine, pinned, for the duration."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    slots = max(1, len(allowed) // threads)
    folder = Path(tempfile.gettempdir()) / f"archkit-slots-{key}"
    folder.mkdir(exist_ok=True)
    for attempt in range(slots + 1):
        index = attempt % slots
        handle = open(folder / f"{index}.lock", "w")  # noqa: SIM115 (held across the yield)
        blocking = attempt == slots  # every slot busy: wait for one
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            continue
        cores = allowed[index * threads:(index + 1) * threads] or allowed
        try:
            if cores:
                os.sched_setaffinity(0, cores)
            yield cores
        finally:
            if allowed:
                os.sched_setaffinity(0, allowed)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return


def slot_key(root: Path) -> str:
    return hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


def measure_latency(spec: Spec, threads: int, repeats: int, decode: int | None
                    ) -> tuple[dict[str, float], list[float]]:
    """The ``archkit.bench`` figures of the spec's model, each the median over ``repeats``
    measurements on ``threads`` threads (``wake_ms_max``: the slowest step of all), with
    ``wake_repeat_spread``; and the ``wake_ms_per_token`` of every repeat."""
    torch.set_num_threads(threads)
    sleeper = SleepingModel.from_spec(spec)
    inputs = bench_inputs(spec)
    runs = [measure(sleeper, *inputs, decode_tokens=decode, warmup=i == 0)
            for i in range(repeats)]
    per_repeat = [r["wake_ms_per_token"] for r in runs]
    median = statistics.median(per_repeat)
    figures = {key: statistics.median(r[key] for r in runs)
               for key in ("wake_ms_per_token", "wake_ms_p99", "wake_stall_ms", "answer_ms",
                           "sleep_ms_per_window")}
    spread = (max(per_repeat) - min(per_repeat)) / median if median else 0.0
    same_every_repeat = {key: runs[0][key] for key in (
        "sleeps", "decode_sleeps", "passes_per_sleep", "kv_peak_tokens", "kv_peak_bytes",
        "fast_weight_bytes", "params")}
    return ({**figures, "wake_ms_max": max(r["wake_ms_max"] for r in runs),
             "wake_repeat_spread": spread, **same_every_repeat, **card_metrics(sleeper, spec)},
            per_repeat)


def card_metrics(sleeper: SleepingModel, spec: Spec) -> dict[str, float]:
    """The model card's top-level numbers (``archkit build --json``) at the sleep window."""
    assert spec.sleep is not None
    card = model_card(sleeper.model, spec.sleep.window, spec.sleep)
    numbers = {k: v for k, v in card.items() if find(k) is not None}  # not the settings
    return {**numbers, "sleep_flops_per_pass": card["sleep"]["sleep_flops_per_pass"]}


class TrainFunction(Protocol):
    """How a trial trains: :func:`archkit.trainer.train` in this process, or several
    ranks elsewhere (the Ray backend's ``trial_workers``)."""

    def __call__(self, spec: Spec, run_dir: Path, resume: bool, progress: bool,
                 on_eval: Callable[[int, Evaluation], None], log_hparams: bool,
                 final_table: bool) -> TrainResult: ...


def run_trial(space: SearchSpace, params: dict[str, Any], run_dir: Path, trial_id: str,
              threads: int, verbose: bool = False,
              report: Callable[[dict[str, float], int], None] | None = None,
              node: str | None = None, train_fn: TrainFunction = train) -> dict[str, Any]:
    """Run one trial into ``run_dir`` (resuming its checkpoint if there is one) and return
    its record; ``verbose`` prints its final evaluation by difficulty. ``report(metrics,
    step)`` sees the metrics after each evaluation, and once more when the trial is
    complete and recorded. ``node`` names where it runs (default: this host's name);
    ``train_fn`` trains (default: in this process)."""
    record: dict[str, Any] = {"trial": trial_id, "params": params, "metrics": {},
                              "node": node or socket.gethostname()}
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = has_checkpoint(run_dir)
    # a resumed trial keeps the name it started with (a retry runs under a new id)
    name = load_run_spec(run_dir).name if resuming else f"{space.name}/{trial_id}"
    try:
        spec = space.trial_spec(params, name, threads)
    except SpecError as err:
        return _finish(run_dir, {**record, "state": "failed", "reason": str(err)})
    with cpu_slot(slot_key(run_dir.parent.parent), threads):
        latency, per_repeat = measure_latency(spec, threads, space.bench.repeats,
                                              space.bench.decode)
        record.update(metrics=dict(latency), wake_ms_per_token_repeats=per_repeat)

        def on_eval(step: int, evaluation: Evaluation) -> None:
            record.update(metrics={**latency, **evaluation.metrics()}, step=step)
            if report is not None:
                report(record["metrics"], step)

        try:
            result = train_fn(spec, run_dir, resume=resuming, progress=False,
                              on_eval=on_eval, log_hparams=False, final_table=verbose)
        except TrainingDiverged as err:
            return _finish(run_dir, {**record, "state": "failed", "reason": str(err)})
    if result.interrupted:
        raise TrialInterrupted(f"trial {trial_id} interrupted; its checkpoint is in {run_dir}")
    assert result.final is not None
    record["metrics"] = {**latency, **result.final.metrics()}
    record = _finish(run_dir, {**record, "state": "complete"})
    if report is not None:  # last: a scheduler may end the trial at this report
        report(record["metrics"], record["step"])
    return record


def _finish(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    partial = run_dir / f"{RESULT}.partial"  # readers (progress, reports) never see half
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(run_dir / RESULT)
    return record


def trial_line(record: dict[str, Any], metrics: list[str]) -> str:
    """One line for the console: the trial, its parameters and its objectives (or why it
    did not complete)."""
    params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    if record["state"] != "complete":
        return f"trial {record['trial']} ({params}) {record['state']}: {record['reason']}"
    values = ", ".join(f"{m} {record['metrics'][m]:.4g}" for m in metrics)
    return f"trial {record['trial']} ({params}): {values}"


def load_results(root: Path) -> list[dict[str, Any]]:
    """Every finished trial's record under ``root/trials``, in trial order."""
    return [json.loads(path.read_text()) for path in sorted(root.glob(f"trials/*/{RESULT}"))]

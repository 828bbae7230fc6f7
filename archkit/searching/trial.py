"""One trial, whatever the backend: validate its spec, measure its latency, train it.

A trial pins itself to its own CPU cores (a "slot": one of cores // threads, claimed by a
file lock in the temp directory, so concurrent trials on a machine never share cores) and
measures wake latency there before training, ``bench.repeats`` times; the median is the
objective and the relative spread between repeats is recorded beside it. Wake cost does
not depend on the weights, so the untrained model gives the trained one's latency; only an
adaptive controller's sleep cost does, and that figure is then the untrained model's.

Every finished trial leaves ``result.json`` in its run directory: its state (complete or
failed, with the reason), parameters, metrics and a label for plots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from archkit.bench import bench_inputs, measure
from archkit.search.space import SearchSpace
from archkit.spec import Spec, SpecError
from archkit.tasks import Score
from archkit.tracking import flatten
from archkit.train import TrainingDiverged, build, train

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


def measure_latency(spec: Spec, threads: int, repeats: int, decode: int) -> dict[str, float]:
    """``archkit.bench`` figures of the spec's model, ``repeats`` times on ``threads``."""
    torch.set_num_threads(threads)
    sleeper = build(spec)
    inputs = bench_inputs(spec)
    runs = [measure(sleeper, *inputs, decode_tokens=decode, warmup=i == 0)
            for i in range(repeats)]
    wake = [r["wake_ms_per_token"] for r in runs]
    median = statistics.median(wake)
    figures = {key: statistics.median(r[key] for r in runs)
               for key in ("wake_ms_per_token", "answer_ms", "sleep_ms_per_window")}
    return {
        **figures,
        "wake_ms_min": min(wake),
        "wake_ms_max": max(wake),
        "wake_ms_spread": (max(wake) - min(wake)) / median if median else 0.0,
        "kv_peak_bytes": runs[0]["kv_peak_bytes"],
        "fast_weight_bytes": runs[0]["fast_weight_bytes"],
        "params": runs[0]["params"],
        "bench_threads": threads,
    }


def accuracy_metrics(score: Score) -> dict[str, float]:
    return {"accuracy": score.overall.exact, "per_answer": score.overall.token,
            **{f"accuracy/difficulty_{v}": a.exact for v, a in score.by_difficulty.items()}}


def label(spec: Spec) -> dict[str, Any]:
    """What a plot names a trial by: its sleep passes and its layer pattern."""
    assert spec.sleep is not None
    letters = {name: name[0].upper() for name in {layer.block for layer in
                                                  spec.model.resolved_layers}}
    pattern = spec.model.pattern or "".join(letters[layer.block]
                                            for layer in spec.model.resolved_layers)
    return {"passes": spec.sleep.passes, "pattern": pattern}


def run_trial(space: SearchSpace, params: dict[str, Any], run_dir: Path, trial_id: str,
              threads: int, progress: bool = False,
              report: Callable[[dict[str, float], bool], None] | None = None) -> dict[str, Any]:
    """Run one trial into ``run_dir`` (resuming its checkpoint if there is one) and return
    its record. ``report(metrics, final)`` sees the metrics after each evaluation."""
    record: dict[str, Any] = {"trial": trial_id, "params": params, "metrics": {}}
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        spec = space.trial_spec(params, f"{space.name}/{trial_id}", threads)
    except SpecError as err:
        return _finish(run_dir, {**record, "state": "failed", "reason": str(err)})
    record["label"] = label(spec)
    with cpu_slot(slot_key(run_dir.parent.parent), threads):
        latency = measure_latency(spec, threads, space.bench.repeats, space.bench.decode)
        record["metrics"] = dict(latency)

        def on_eval(step: int, score: Score) -> None:
            record["metrics"] = {**latency, **accuracy_metrics(score), "step": step}
            if report is not None:
                report(record["metrics"], False)

        try:
            result = train(spec, run_dir, resume=(run_dir / "checkpoint").exists(),
                           progress=progress, on_eval=on_eval, log_hparams=False)
        except TrainingDiverged as err:
            return _finish(run_dir, {**record, "state": "failed", "reason": str(err)})
    if result.interrupted:
        raise TrialInterrupted(f"trial {trial_id} interrupted; its checkpoint is in {run_dir}")
    assert result.final is not None
    record["metrics"] = {**latency, **accuracy_metrics(result.final)}
    _write_hparams(run_dir, params, record["metrics"])
    record = _finish(run_dir, {**record, "state": "complete"})
    if report is not None:  # last: a scheduler may end the trial at this report
        report(record["metrics"], True)
    return record


def _finish(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    (run_dir / RESULT).write_text(json.dumps(record, indent=2))
    return record


def _write_hparams(run_dir: Path, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """One HParams session per trial: the searched parameters against every metric."""
    with SummaryWriter(str(run_dir / "hparams")) as writer:
        writer.add_hparams(flatten({"trial": run_dir.name, **params}),
                           {f"search/{k}": float(v) for k, v in metrics.items()}, run_name=".")


def load_results(root: Path) -> list[dict[str, Any]]:
    """Every finished trial's record under ``root/trials``, in trial order."""
    return [json.loads(path.read_text()) for path in sorted(root.glob(f"trials/*/{RESULT}"))]

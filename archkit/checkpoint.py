"""A run directory on disk: its checkpoint, written atomically, and loading a run back.

    runs/<name>/checkpoint/model.safetensors   the weights
                           spec.yaml           the resolved spec
                           trainer.pt          step, optimiser, scheduler and RNG state
    runs/<name>/final.json                     the last evaluation (archkit.metrics names)

A checkpoint is written to a temporary directory and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, load_spec
from archkit.tasks import Task

CHECKPOINT = "checkpoint"
FINAL = "final.json"


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).exists()


def save_checkpoint(run_dir: Path, spec: Spec, sleeper: SleepingModel,
                    trainer_state: dict[str, Any]) -> None:
    """Write ``checkpoint/`` atomically: a complete directory replaces the previous one."""
    tmp, final, old = (run_dir / f"{CHECKPOINT}.{s}" for s in ("tmp", "new", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(sleeper.model, str(tmp / "model.safetensors"))
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    torch.save(trainer_state, tmp / "trainer.pt")
    tmp.rename(final)
    current = run_dir / CHECKPOINT
    if current.exists():
        current.rename(old)
    final.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / CHECKPOINT / "trainer.pt", weights_only=False)


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint, or None without one."""
    if not (run_dir / CHECKPOINT / "trainer.pt").exists():
        return None
    return int(load_trainer_state(run_dir)["step"])


def load_run_spec(run_dir: Path, overrides: Mapping[str, Any] | None = None) -> Spec:
    """The resolved spec a run was trained with, with ``overrides`` (dotted keys) applied."""
    path = run_dir / CHECKPOINT / "spec.yaml"
    if not path.exists():
        raise SpecError("", f"no checkpoint in {run_dir} (expected {path})", file=run_dir)
    return load_spec(path, overrides)


def load_weights(sleeper: SleepingModel, run_dir: Path) -> None:
    path = run_dir / CHECKPOINT / "model.safetensors"
    try:
        load_model(sleeper.model, str(path))
    except FileNotFoundError:
        raise SpecError("", f"the checkpoint has no weights: {path} is missing",
                        file=run_dir) from None
    except (SafetensorError, RuntimeError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError("", f"cannot load the weights in {path} ({first_line})",
                        file=run_dir) from None


@dataclass
class Run:
    """A trained run, loaded: its spec, its model (weights loaded, eval mode), its task
    and its final metrics (None while the run has not finished)."""

    run_dir: Path
    spec: Spec
    model: SleepingModel
    task: Task
    final: dict[str, float] | None


def load_run(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> Run:
    """Load ``run_dir`` (e.g. ``runs/rule110_cpu``); ``overrides`` change the spec before
    the model is built, e.g. ``{"sleep.passes": 8}`` to sleep longer than trained."""
    run_dir = Path(run_dir)
    spec = load_run_spec(run_dir, overrides)
    if spec.task is None:
        raise SpecError("task", "a run's spec has a `task:` section", file=run_dir)
    model = SleepingModel.from_spec(spec)
    load_weights(model, run_dir)
    final_path = run_dir / FINAL
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    return Run(run_dir, spec, model.eval(), spec.task.build(), final)

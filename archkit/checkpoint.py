"""A run directory on disk: its checkpoint, written atomically, and loading a run back.

    runs/<name>/checkpoint/model.safetensors   the weights
                           spec.yaml           the resolved spec
                           trainer.pt          step, schedule length, optimiser, scheduler and
                                               RNG state: tensors and plain values only, read
                                               with ``torch.load(weights_only=True)``
    runs/<name>/commands.jsonl                 every command that trained the run: argv,
                                               working directory, the step it began at
    runs/<name>/final.json                     the last evaluation (archkit.metrics names)
    runs/<name>/superseded/step_<n>/           final.json and HParams session of the run as
                                               it had finished at step n, before it was
                                               extended (archkit.tracking.supersede_final)

A checkpoint is written to a temporary directory and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from archkit.card import parameter_shapes, require_memory
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, parse_spec, with_overrides
from archkit.spec_files import apply_dotted, changed_fields, load_yaml_tree
from archkit.tasks import Task

CHECKPOINT = "checkpoint"
FINAL = "final.json"


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).exists()


def save_checkpoint(run_dir: Path, spec: Spec, weights: Mapping[str, torch.Tensor],
                    trainer_state: dict[str, Any]) -> None:
    """Write ``checkpoint/`` atomically: a complete directory replaces the previous one.
    ``weights`` is the whole model's state dict (gathered, when the run is sharded)."""
    tmp, final, old = (run_dir / f"{CHECKPOINT}.{s}" for s in ("tmp", "new", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / "model.safetensors")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    torch.save(trainer_state, tmp / "trainer.pt")
    tmp.rename(final)
    current = run_dir / CHECKPOINT
    if current.exists():
        current.rename(old)
    final.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT / "trainer.pt"
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise SpecError("", f"cannot read the trainer state in {path} ({_first_line(err)})",
                        file=run_dir) from None


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's checkpoint, or None without one."""
    if not (run_dir / CHECKPOINT / "trainer.pt").exists():
        return None
    return int(load_trainer_state(run_dir)["step"])


def load_run_spec(run_dir: Path, overrides: Mapping[str, Any] | None = None) -> Spec:
    """The resolved spec a run was trained with, with ``overrides`` (dotted keys) applied."""
    path = run_dir / CHECKPOINT / "spec.yaml"
    if not path.exists():
        raise SpecError("", f"no checkpoint in it (expected {path})", file=run_dir)
    return parse_spec(apply_dotted(as_trained(load_yaml_tree(path)), overrides or {}), path)


def as_trained(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved spec with the fields added since it was written set as the run trained.

    A checkpoint's spec names every field, so a missing one predates it and its new
    default must not change the run: ``sleep.split`` was ``context`` (every context token
    slept on) and a Depo task's queries shared one k (``hops_per: example``)."""
    if isinstance(sleep := saved.get("sleep"), dict):
        sleep.setdefault("split", "context")
    if isinstance(task := saved.get("task"), dict) and task.get("name") == "depo":
        task.setdefault("hops_per", "example")
    return saved


def spec_changes(old: Spec, new: Spec) -> dict[str, tuple[Any, Any]]:
    """Every dotted field whose value differs: ``{"sleep.passes": (1, 2)}``. A list is one
    value; a field one spec lacks (a controller's option) is None there."""
    return changed_fields(old.model_dump(mode="json"), new.model_dump(mode="json"))


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``sleep.passes 1 -> 2, model.d_model 32 -> 64``."""
    return ", ".join(f"{field} {_value(old)} -> {_value(new)}"
                     for field, (old, new) in changes.items())


def _value(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def require_same_shapes(run_dir: Path, trained: Spec, spec: Spec) -> None:
    """Refuse a changed ``spec`` under which a saved tensor would change shape, before any
    model is built, naming the fields that change shapes."""
    changes = {field: change for field, change in spec_changes(trained, spec).items()
               if field.startswith("model.")}
    if not changes:
        return
    saved, wanted = parameter_shapes(trained.model), parameter_shapes(spec.model)
    if saved == wanted:
        return
    culprits = {field: change for field, change in changes.items()
                if _changes_shapes(trained, field, change[1], saved)} or changes
    differing = sorted(n for n in saved.keys() | wanted.keys() if saved.get(n) != wanted.get(n))
    example = differing[0]
    raise SpecError(", ".join(culprits), "the checkpoint's weights do not fit the changed "
                    f"model ({describe_changes(culprits)}): {len(differing)} saved tensor(s) "
                    f"would change, e.g. {example} {_shape(saved.get(example))} -> "
                    f"{_shape(wanted.get(example))}; keep the model's fields as trained",
                    file=run_dir)


def _changes_shapes(trained: Spec, field: str, value: Any,
                    saved: dict[str, tuple[int, ...]]) -> bool:
    """Whether changing ``field`` alone to ``value`` changes a tensor's shape (a change
    that is invalid on its own counts as one that does)."""
    try:
        alone = with_overrides(trained, {field: value})
    except SpecError:
        return True
    return parameter_shapes(alone.model) != saved


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))


def save_weights(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors with one copy of tensors that share memory (tied weights keep their
    first name): ``load_model`` fills the others, as it does after ``save_model``."""
    kept: dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in weights.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if where not in seen:
            seen.add(where)
            kept[name] = tensor.detach().contiguous()
    save_file(kept, str(path), metadata={"format": "pt"})


def load_weights(sleeper: SleepingModel, run_dir: Path) -> None:
    path = run_dir / CHECKPOINT / "model.safetensors"
    try:
        load_model(sleeper.model, str(path))
    except FileNotFoundError:
        raise SpecError("", f"the checkpoint has no weights: {path} is missing",
                        file=run_dir) from None
    except (SafetensorError, RuntimeError, OSError) as err:
        raise SpecError("", f"cannot load the weights in {path} ({_first_line(err)})",
                        file=run_dir) from None


def _first_line(err: Exception) -> str:
    """The first line of an error that says something (not load_state_dict's heading),
    shortened."""
    lines = [line.strip() for line in str(err).splitlines()
             if line.strip() and not line.startswith("Error(s) in loading state_dict")]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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
    the model is built, e.g. ``{"sleep.passes": 8}`` to sleep longer than trained. An
    override that changes a weight's shape, or a model too big for this machine, is a
    SpecError before anything is allocated."""
    run_dir = Path(run_dir)
    trained = load_run_spec(run_dir)
    spec = load_run_spec(run_dir, overrides) if overrides else trained
    if spec.task is None:
        raise SpecError("task", "a run's spec has a `task:` section", file=run_dir)
    require_memory(spec.model, torch.device("cpu"), training=False)
    require_same_shapes(run_dir, trained, spec)
    model = SleepingModel.from_spec(spec, pretrained=False)
    load_weights(model, run_dir)
    final_path = run_dir / FINAL
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    return Run(run_dir, spec, model.eval(), spec.task.build(), final)

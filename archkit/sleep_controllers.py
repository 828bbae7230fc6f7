"""Sleep controllers decide how many consolidation passes each window gets.

- ``fixed``: N = ``sleep.passes`` for every window (the paper).
- ``schedule``: a list of N, by window index from the first context window
  (``order: first``) or from the last one, nearest the question (``order: last``).
  Sleeps during decoding, after the context, count as the nearest (depth 0).
- ``adaptive``: at inference, each sequence repeats passes until every one of its
  fast-weight states changes by less than ``tol`` (relative Frobenius norm) or
  ``max_passes`` is reached (default: the most passes it trains at, as sleeping longer
  than trained hurts); a sequence that stopped keeps its state while the rest of the
  batch sleeps on, so its answer does not depend on its batch-mates. Training runs
  N = ``sleep.passes``, or one N drawn per window from ``train_passes``. Beyond the
  paper: a model trained at N may behave differently at the N it stops at, so compare
  against fixed N.

A controller sees only pass counts and fast-weight tensors, never the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from archkit.registry import SLEEP_CONTROLLERS, register_sleep
from archkit.spec import SleepSpec

Passes = Annotated[int, Field(gt=0)]


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SleepController:
    """``passes`` caps the passes of a sleep; a controller whose ``watches_weights`` is true
    is shown the fast weights around every pass and may stop a sequence early
    (``converged``). The runtime takes those snapshots only for such a controller."""

    def __init__(self, sleep: SleepSpec) -> None:
        self.config = sleep.controller_config
        self.n = sleep.passes

    def passes(self, index: int, n_windows: int, training: bool) -> int:
        """Most passes for context window ``index`` of ``n_windows`` (index >= n_windows:
        a sleep while decoding)."""
        raise NotImplementedError

    def watches_weights(self, training: bool) -> bool:
        """Whether ``converged`` is to be asked after every pass."""
        return False

    def converged(self, before: list[Tensor], after: list[Tensor], passes: int) -> Tensor:
        """Which sequences stop after ``passes`` passes: a bool tensor [B] (or one that
        broadcasts to it). ``before`` and ``after``: the fast weights [B, ...] of the
        looping layers around the last pass."""
        raise NotImplementedError


@register_sleep("fixed", config=ControllerConfig, description="N passes for every window")
class Fixed(SleepController):
    def passes(self, index: int, n_windows: int, training: bool) -> int:
        return self.n


class ScheduleConfig(ControllerConfig):
    schedule: list[Passes] = Field(min_length=1, description="N per window; the last repeats")
    order: Literal["first", "last"] = Field(
        "first", description="count windows from the first, or from the newest (depth)")


@register_sleep("schedule", config=ScheduleConfig, description="N per window index or depth")
class Schedule(SleepController):
    config: ScheduleConfig

    def passes(self, index: int, n_windows: int, training: bool) -> int:
        if self.config.order == "last":
            index = max(0, n_windows - 1 - index)
        return self.config.schedule[min(index, len(self.config.schedule) - 1)]


class AdaptiveConfig(ControllerConfig):
    tol: Annotated[float, Field(gt=0)] = Field(1e-3, description="relative change to stop at")
    min_passes: Passes = 1
    max_passes: Passes | None = Field(
        None, description="most passes at inference (default: the most it trains at)")
    train_passes: list[Passes] | None = Field(
        None, description="N while training, drawn per window (default: sleep.passes)")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveConfig:
        if self.max_passes is not None and self.min_passes > self.max_passes:
            raise ValueError("min_passes must not exceed max_passes")
        return self


@register_sleep("adaptive", config=AdaptiveConfig,
                description="passes until fast weights converge (inference), fixed N training")
class Adaptive(SleepController):
    config: AdaptiveConfig

    def passes(self, index: int, n_windows: int, training: bool) -> int:
        choices = self.config.train_passes
        if not training:
            return self.config.max_passes or max(choices or [self.n])
        if choices is None:
            return self.n
        return choices[int(torch.randint(len(choices), ()).item())]

    def watches_weights(self, training: bool) -> bool:
        return not training  # training runs a fixed or drawn N

    def converged(self, before: list[Tensor], after: list[Tensor], passes: int) -> Tensor:
        if passes < self.config.min_passes or not after:
            return torch.tensor(False)
        changes = [relative_change(b, a) for b, a in zip(before, after, strict=True)]
        return torch.stack(changes).amax(0) < self.config.tol


def relative_change(before: Tensor, after: Tensor) -> Tensor:
    """Per sequence, ``|after - before| / |before|`` (Frobenius, over all heads): [B]."""
    before, after = before.detach(), after.detach()
    diff = (after - before).flatten(1).norm(dim=1)
    base = before.flatten(1).norm(dim=1)
    return diff / base.clamp_min(torch.finfo(base.dtype).tiny)


def make_controller(sleep: SleepSpec) -> SleepController:
    return SLEEP_CONTROLLERS.get(sleep.controller).obj(sleep)

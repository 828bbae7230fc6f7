"""Rule 110: one cell of each of S random binary states after t steps of the automaton.

Rule 110 maps a cell and its neighbours (left l, centre c, right r) to bit 4l + 2c + r of
the number 110 = 0b01101110, on a ring of W cells (periodic boundary)::

    l c r   111 110 101 100 011 010 001 000
    new      0   1   1   0   1   1   1   0

One example (width W, states S, t steps, answer cell c)::

    s_1 s_2 ... s_S    S*W tokens "0"/"1"; state i at [i*W, (i+1)*W)      context
    q                  "?" (or "t<t>" where steps is a range, see below)   prediction
    a_1 ... a_S        a_i = cell c of state i after t steps              answers

context_len = S*W, T = S*W + 1 + S, difficulty = t. The answer depends on t, so where
steps is a range the query token names it ("t4" ... "t16") instead of "?". Which states
are held out for evaluation is decided state by state, so no evaluation state is ever
seen in training, not even beside other states.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from archkit.registry import register_task
from archkit.spec import SpecError
from archkit.tasks.base import IntRange, Split, Task, TaskConfig, draw_in_split

RULE_110 = np.array([(110 >> index) & 1 for index in range(8)], dtype=np.int8)


def step(cells: np.ndarray) -> np.ndarray:
    """One Rule 110 step along the last axis, periodic boundary."""
    left, right = np.roll(cells, 1, axis=-1), np.roll(cells, -1, axis=-1)
    return RULE_110[4 * left + 2 * cells + right]


def random_states(rng: np.random.Generator, width: int) -> Iterator[np.ndarray]:
    """Endless random 0/1 states, drawn a block at a time (a call per state is slow)."""
    while True:
        yield from rng.integers(0, 2, (1024, width), dtype=np.int8)


class Rule110Config(TaskConfig):
    width: Annotated[int, Field(gt=0, description="cells per state (W)")] = 16
    states: Annotated[int, Field(gt=0, description="states per example (S)")] = 2
    steps: IntRange = Field((1, 3), description="automaton steps t, or a range [low, high]")
    cell: Annotated[int, Field(ge=0, description="which cell of each state is asked for")] = 0

    paper_preset: ClassVar[dict[str, Any]] = {"width": 24, "states": 4, "steps": 32}

    @model_validator(mode="after")
    def _cell_on_the_ring(self) -> Rule110Config:
        if self.cell >= self.width:
            raise SpecError("task.cell", f"a cell index below width={self.width}", self.cell)
        return self


@dataclass(frozen=True)
class Rule110Example:
    states: tuple[str, ...]  # the initial states, W characters "0"/"1" each
    steps: int
    answers: tuple[int, ...]  # cell c of each state after `steps` steps


@register_task("rule110", config=Rule110Config, description="Rule 110 cells after t steps")
class Rule110(Task):
    difficulty_name = "steps"
    separator = ""

    def __init__(self, config: Rule110Config) -> None:
        low, high = config.steps
        self.steps = range(low, high + 1)
        queries = ["?"] if low == high else [f"t{t}" for t in self.steps]
        context_len = config.states * config.width
        super().__init__(
            config,
            vocab=["0", "1", *queries],  # so a cell's value is its token id
            context_len=context_len,
            seq_len=context_len + 1 + config.states,
            difficulties=self.steps,
        )
        self.config: Rule110Config = config

    def generate(
        self, rng: np.random.Generator, difficulty: np.ndarray, split: Split
    ) -> tuple[np.ndarray, np.ndarray, list[Rule110Example]]:
        width, count, cell = self.config.width, self.config.states, self.config.cell
        n = len(difficulty)
        rows = draw_in_split(split, n * count, partial(next, random_states(rng, width)))
        states = np.stack(rows).reshape(n, count, width)

        answers = np.empty((n, count), dtype=np.int8)
        cells = states
        for t in range(1, self.steps[-1] + 1):
            cells = step(cells)
            answers[difficulty == t] = cells[difficulty == t][:, :, cell]

        query = 2 + difficulty - self.steps[0]  # "?" or "t<t>", right after "0" and "1"
        tokens = np.concatenate([states.reshape(n, -1), query[:, None], answers], axis=1)
        loss_mask = np.zeros(tokens.shape, dtype=bool)
        loss_mask[:, self.context_len + 1 :] = True

        text = (states + ord("0")).astype(np.uint8)
        examples = [
            Rule110Example(
                states=tuple(bytes(state).decode() for state in text[i]),
                steps=int(difficulty[i]),
                answers=tuple(answers[i].tolist()),
            )
            for i in range(n)
        ]
        return tokens, loss_mask, examples

    def format_context(self, ids: list[int]) -> str:
        width = self.config.width
        return "\n".join(self.decode(ids[i : i + width]) for i in range(0, len(ids), width))

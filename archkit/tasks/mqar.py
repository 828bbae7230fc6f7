"""MQAR: multi-query associative recall (Arora et al., "Zoology", 2023).

The context holds p key-value pairs with distinct keys and distinct values, left-padded to
2P tokens (P = the largest p); the prediction segment asks for every key once, in random
order, right-padded to 2P tokens::

    <pad> ... <pad>  k v k v ... k v        context (2P tokens)
    k v k v ... k v  <pad> ... <pad>        prediction; each v is an answer

Keys ("k0", "k1", ...) and values ("v0", ...) are separate tokens. Difficulty = p.
T = 4P. MQAR is not in the sleep paper; its ``paper`` preset is Zoology's standard
setting: 8,192 token ids split between keys and values, up to 64 pairs, T = 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from archkit.registry import register_task
from archkit.spec import SpecError
from archkit.tasks.base import IntRange, Split, Task, TaskConfig, draw_in_split

PositiveInt = Annotated[int, Field(gt=0)]


class MqarConfig(TaskConfig):
    pairs: IntRange = Field((4, 8), description="key-value pairs p, drawn uniformly")
    keys: PositiveInt = Field(64, description="size of the key pool")
    values: PositiveInt = Field(64, description="size of the value pool")

    paper_preset: ClassVar[dict[str, Any]] = {"pairs": (4, 64), "keys": 4095, "values": 4096}

    @model_validator(mode="after")
    def _pools_hold_the_pairs(self) -> MqarConfig:
        most = self.pairs[1]
        for field in ("keys", "values"):
            if getattr(self, field) < most:
                raise SpecError(
                    f"task.{field}", f"at least {most}, one per pair", getattr(self, field)
                )
        return self


@dataclass(frozen=True)
class MqarExample:
    pairs: tuple[tuple[str, str], ...]  # (key, value) in context order
    queries: tuple[str, ...]  # keys in the order they are asked


@register_task("mqar", config=MqarConfig, description="multi-query associative recall")
class Mqar(Task):
    difficulty_name = "pairs"

    def __init__(self, config: MqarConfig) -> None:
        half = 2 * config.pairs[1]
        super().__init__(
            config,
            vocab=[
                "<pad>",
                *(f"k{i}" for i in range(config.keys)),
                *(f"v{i}" for i in range(config.values)),
            ],
            context_len=half,
            seq_len=2 * half,
            difficulties=range(config.pairs[0], config.pairs[1] + 1),
            pad="<pad>",
        )
        self.config: MqarConfig = config

    def _pairs(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``[count, 2]`` token ids of distinct keys and distinct values, keys ascending so
        that one set of pairs has one content in whatever order it is listed."""
        keys = np.sort(rng.choice(self.config.keys, count, replace=False))
        values = rng.choice(self.config.values, count, replace=False)
        return np.stack([1 + keys, 1 + self.config.keys + values], axis=1)

    def generate(
        self, rng: np.random.Generator, difficulty: np.ndarray, split: Split
    ) -> tuple[np.ndarray, np.ndarray, list[MqarExample]]:
        n, start = len(difficulty), self.context_len
        tokens = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(tokens.shape, dtype=bool)
        examples = []
        for i, count in enumerate(difficulty.tolist()):
            (pairs,) = draw_in_split(split, 1, partial(self._pairs, rng, count))
            listed = pairs[rng.permutation(count)]
            asked = pairs[rng.permutation(count)]
            tokens[i, start - 2 * count : start] = listed.ravel()
            tokens[i, start : start + 2 * count] = asked.ravel()
            loss_mask[i, start + 1 : start + 2 * count : 2] = True
            examples.append(
                MqarExample(
                    pairs=tuple((self.vocab[k], self.vocab[v]) for k, v in listed.tolist()),
                    queries=tuple(self.vocab[k] for k in asked[:, 0].tolist()),
                )
            )
        return tokens, loss_mask, examples

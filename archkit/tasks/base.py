"""The task contract: seeded generators of token sequences with a context to consolidate.

A task turns a seed into a :class:`TaskBatch`::

    tokens      [n, T] int64   the context, then the prediction segment
    loss_mask   [n, T] bool    True where tokens[:, p] is an answer token
    context_len int            tokens[:, :context_len] is the context to consolidate
    difficulty  [n]    int64   steps, hops, ops or pairs, for scoring by difficulty
    answer_difficulty [n, T] int64   each answer token's difficulty (-1 elsewhere): its
                               example's, unless a task scores answers apart (Depo's
                               queries each have their own k)
    examples    list           one structured record per example

The answer at position p is predicted by the logits at position p - 1. Every prediction
segment opens with a token that is not an answer, so ``loss_mask[:, :context_len + 1]`` is
all False: every answer is predicted from inside the prediction segment.

Train and evaluation data are kept apart twice. They come from different seed streams
(:meth:`Task.train_batch`, :meth:`Task.eval_batch`), and the content that identifies an
example (a Rule 110 state, a Depo cycle, a GSM computation graph, an MQAR key-value set)
is split by a fixed hash: one content in ``HELDOUT_EVERY`` belongs to evaluation and never
occurs in training, even where the space of contents is small enough to memorise.
"""

from __future__ import annotations

import hashlib
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from archkit.spec import TaskSpec

Split = Literal["train", "eval"]
Item = TypeVar("Item")

HELDOUT_EVERY = 16
MAX_DRAW_ROUNDS = 100


def _widen(value: Any) -> Any:
    return (value, value) if isinstance(value, int) else value


def _ordered(value: tuple[int, int]) -> tuple[int, int]:
    if value[0] > value[1]:
        raise ValueError("a range is [low, high] with low <= high")
    return value


IntRange = Annotated[
    tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]],
    BeforeValidator(_widen),
    AfterValidator(_ordered),
]
"""An inclusive range ``[low, high]``; a single number ``t`` means ``[t, t]``."""

CountRange = Annotated[
    tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]],
    BeforeValidator(_widen),
    AfterValidator(_ordered),
]
"""An :data:`IntRange` of counts that may be 0."""


class TaskConfig(BaseModel):
    """Base of every task config. Field defaults are the ``cpu`` preset; ``paper_preset``
    holds the paper's values, which fill every field the user did not give."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    paper_preset: ClassVar[dict[str, Any]] = {}

    preset: Literal["paper", "cpu"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "paper":
            return {**cls.paper_preset, **data}
        return data


@dataclass
class TaskBatch:
    tokens: torch.Tensor
    loss_mask: torch.Tensor
    context_len: int
    difficulty: torch.Tensor
    examples: list[Any]
    answer_difficulty: torch.Tensor

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """SHA-256 of the tokens and loss mask: equal for the same examples, whatever the
        machine, so a run records which test set it was scored on."""
        digest = hashlib.sha256(self.tokens.numpy().astype("<i8").tobytes())
        digest.update(self.loss_mask.numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Accuracy:
    examples: int
    exact: float  # share of examples (or, per difficulty, of an example's answers of that
    # difficulty) whose answer tokens are all right
    per_answer: float  # share of answer tokens that are right


@dataclass(frozen=True)
class Score:
    overall: Accuracy
    by_difficulty: dict[int, Accuracy]

    def metrics(self) -> dict[str, float]:
        """In the metric vocabulary: ``exact``, ``per_answer``, ``exact/<difficulty>``,
        ``per_answer/<difficulty>``."""
        flat = {"exact": self.overall.exact, "per_answer": self.overall.per_answer}
        for value, accuracy in sorted(self.by_difficulty.items()):
            flat[f"exact/{value}"] = accuracy.exact
            flat[f"per_answer/{value}"] = accuracy.per_answer
        return flat


def predictions_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Greedy guesses aligned with the tokens: ``[n, T, V]`` logits, where ``logits[:, p]``
    predicts token p + 1, become ``[n, T]`` predictions with ``predictions[:, p]`` the guess
    for ``tokens[:, p]`` (position 0 has no guess and holds -1)."""
    predictions = torch.full(logits.shape[:2], -1, dtype=torch.long, device=logits.device)
    predictions[:, 1:] = logits[:, :-1].argmax(-1)
    return predictions


def belongs(content: np.ndarray, split: Split) -> bool:
    """Whether an example identified by ``content`` may occur in ``split``."""
    data = np.ascontiguousarray(content, dtype="<i8").tobytes()
    heldout = hashlib.blake2b(data, digest_size=1).digest()[0] % HELDOUT_EVERY == 0
    return heldout == (split == "eval")


def draw_in_split(
    split: Split,
    n: int,
    draw: Callable[[], Item],
    content: Callable[[Item], np.ndarray] = np.asarray,
) -> list[Item]:
    """``n`` items from ``draw()`` whose content belongs to ``split``, in draw order."""
    kept: list[Item] = []
    for _ in range(MAX_DRAW_ROUNDS):
        missing = n - len(kept)
        # One content in HELDOUT_EVERY is eval's: draw enough to finish in about one round.
        count = missing * HELDOUT_EVERY if split == "eval" else missing + missing // 8
        drawn = [draw() for _ in range(count)]
        kept += [item for item in drawn if belongs(content(item), split)]
        if len(kept) >= n:
            return kept[:n]
    raise RuntimeError(
        f"could not draw {n} {split} examples: this task has too few distinct examples "
        f"to hold one in {HELDOUT_EVERY} out for evaluation; make it larger"
    )


class Task(ABC):
    """A configured task. Subclasses build the vocabulary and implement :meth:`generate`."""

    difficulty_name: ClassVar[str]
    separator: ClassVar[str] = " "  # between decoded tokens

    def __init__(
        self,
        config: TaskConfig,
        *,
        vocab: list[str],
        context_len: int,
        seq_len: int,
        difficulties: Sequence[int],
        eval_difficulties: Sequence[int] | None = None,
        pad: str | None = None,
    ) -> None:
        self.config = config
        self.vocab = vocab
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.context_len = context_len
        self.seq_len = seq_len
        self.difficulties: dict[Split, list[int]] = {
            "train": list(difficulties),
            "eval": list(difficulties if eval_difficulties is None else eval_difficulties),
        }
        self.pad_id = self.ids[pad] if pad is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def vocabulary_clash(self, other: Task) -> str | None:
        """Why ``other`` (this task under other settings) cannot share this task's token
        embedding, or None. A model learns one embedding per id, so an id must mean one
        token under both settings: one vocabulary has to extend the other."""
        pairs = enumerate(zip(other.vocab, self.vocab, strict=False))
        clash = next((i for i, (a, b) in pairs if a != b), None)
        if clash is None:
            return None
        return f"id {clash} would be {other.vocab[clash]!r}, not {self.vocab[clash]!r}"

    @abstractmethod
    def generate(
        self, rng: np.random.Generator, difficulty: np.ndarray, split: Split
    ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """Tokens ``[n, T]`` int64, loss mask ``[n, T]`` bool and records of n examples, the
        i-th of difficulty ``difficulty[i]``, all with contents that belong to ``split``."""

    def answer_difficulty(self, loss_mask: np.ndarray, difficulty: np.ndarray,
                          examples: list[Any]) -> np.ndarray:
        """The difficulty of each answer token, -1 elsewhere: by default its example's."""
        return np.where(loss_mask, difficulty[:, None], -1)

    def sample(
        self, n: int, seed: int | np.random.SeedSequence, split: Split = "train"
    ) -> TaskBatch:
        """n examples, the same for the same seed on every machine. Training draws each
        difficulty uniformly; evaluation cycles through its difficulties in equal numbers."""
        rng = np.random.Generator(np.random.PCG64(seed))
        values = np.array(self.difficulties[split], dtype=np.int64)
        if split == "eval":
            difficulty = values[np.arange(n) % len(values)]
        else:
            difficulty = rng.choice(values, n)
        tokens, loss_mask, examples = self.generate(rng, difficulty, split)
        return TaskBatch(
            tokens=torch.from_numpy(tokens),
            loss_mask=torch.from_numpy(loss_mask),
            context_len=self.context_len,
            difficulty=torch.from_numpy(difficulty),
            examples=examples,
            answer_difficulty=torch.from_numpy(
                self.answer_difficulty(loss_mask, difficulty, examples)),
        )

    def train_batch(self, step: int, n: int, seed: int = 0) -> TaskBatch:
        """Training batch number ``step`` of a run seeded ``seed``."""
        return self.sample(n, np.random.SeedSequence(seed, spawn_key=(0, step)), "train")

    def eval_batch(self, n: int, seed: int = 0) -> TaskBatch:
        """The evaluation set of a run seeded ``seed``; it shares no content with training."""
        return self.sample(n, np.random.SeedSequence(seed, spawn_key=(1,)), "eval")

    def token_strings(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        return [self.vocab[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.separator.join(self.token_strings(ids))

    def score(self, predictions: torch.Tensor, batch: TaskBatch) -> Score:
        """Exact match per example (every answer token right) and per answer token, overall
        and per difficulty. Per difficulty d, the unit is an example's answers of difficulty
        d (the whole example where difficulty is per example, one query in Depo).
        ``predictions[:, p]`` is the guess for ``tokens[:, p]`` (see
        :func:`predictions_from_logits`); only loss-mask positions are scored."""
        if predictions.shape != batch.tokens.shape:
            raise ValueError(
                f"predictions have shape {tuple(predictions.shape)}, "
                f"the batch's tokens {tuple(batch.tokens.shape)}"
            )
        right = self.accepts(predictions.to(batch.tokens.device), batch) & batch.loss_mask

        def accuracy(scored: torch.Tensor) -> Accuracy:
            rows = scored.any(1)
            hits, answers = (right & scored).sum(1)[rows], scored.sum(1)[rows]
            return Accuracy(
                examples=int(rows.sum()),
                exact=(hits == answers).float().mean().item(),
                per_answer=(hits.sum() / answers.sum()).item(),
            )

        by_answer = batch.answer_difficulty
        by_difficulty = {value: accuracy(by_answer == value)
                         for value in by_answer[by_answer >= 0].unique().tolist()}
        return Score(accuracy(batch.loss_mask), by_difficulty)

    def accepts(self, predictions: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """Which guesses count as right ([n, T] bool; only loss-mask positions are read):
        by default, the answer token itself."""
        return predictions == batch.tokens

    def format_context(self, ids: list[int]) -> str:
        """The context for people: padding counted, the rest decoded and wrapped."""
        kept = [i for i in ids if i != self.pad_id]
        text = textwrap.fill(self.decode(kept), 96)
        if len(kept) == len(ids):
            return text
        assert self.pad_id is not None
        return f"({len(ids) - len(kept)} x {self.vocab[self.pad_id]})\n{text}"

    def as_records(self, batch: TaskBatch) -> list[dict[str, Any]]:
        """The examples as plain data: difficulty, decoded context and prediction tokens
        (padding left out) and the answer tokens."""
        records = []
        for i, row in enumerate(batch.tokens.tolist()):
            answers = batch.loss_mask[i].tolist()
            kept = [p for p, t in enumerate(row) if t != self.pad_id]
            records.append({
                "difficulty": int(batch.difficulty[i]),
                "context": [self.vocab[row[p]] for p in kept if p < self.context_len],
                "prediction": [self.vocab[row[p]] for p in kept if p >= self.context_len],
                "answers": [self.vocab[t] for t, a in zip(row, answers, strict=True) if a],
            })
        return records

    def describe(self, batch: TaskBatch) -> str:
        """Decoded examples with their difficulty; answer tokens are shown as ``[x]``."""
        settings = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        lines = [
            settings,
            f"T={self.seq_len}, context_len={self.context_len}, vocab_size={self.vocab_size}; "
            "[x] marks an answer token",
        ]
        for i, row in enumerate(batch.tokens.tolist()):
            answers = batch.loss_mask[i].tolist()
            start = self.context_len
            prediction = [
                f"[{self.vocab[t]}]" if answer else self.vocab[t]
                for t, answer in zip(row[start:], answers[start:], strict=True)
                if t != self.pad_id
            ]
            lines += [
                f"\nexample {i} ({self.difficulty_name} = {int(batch.difficulty[i])})",
                "  context:",
                textwrap.indent(self.format_context(row[: self.context_len]), "    "),
                "  prediction:",
                textwrap.indent(textwrap.fill(" ".join(prediction), 96), "    "),
            ]
        return "\n".join(lines)


def get_task(name: str, **config: Any) -> Task:
    """A configured task, e.g. ``get_task("rule110", preset="cpu", steps=8)``. An unknown
    name or a bad field raises :class:`SpecError` naming ``task.name`` or ``task.<field>``."""
    return TaskSpec(name=name, **config).build()  # validated exactly like a spec's `task:`


def show(name: str, n: int = 3, seed: int = 0, **config: Any) -> str:
    """``n`` decoded training examples of a task, as ``archkit tasks show`` prints them."""
    task = get_task(name, **config)
    return f"{name}: {task.describe(task.sample(n, seed))}"

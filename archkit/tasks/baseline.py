"""The chance level of a task, measured: the best constant answer.

A model that ignores the context can still learn the most frequent answer, and where the
answers are skewed (Rule 110 cells are 1 more often than 0; small GSM values are common)
that scores well above one over the number of answers. The baseline of a run is that
model, measured:

1. Read ``train_examples`` examples from the run's own training stream (its first
   batches) and count, per difficulty, how often each answer occurs. An answer is the
   tuple of an example's answer tokens of that difficulty (its whole answer, or in Depo
   one query's).
2. The constant guess for difficulty d is its most frequent answer (for a difficulty
   training never drew, the most frequent answer of any difficulty).
3. Score the guesses on the evaluation set as ``exact`` is scored: ``baseline/<d>`` is
   the share of evaluation answers of difficulty d equal to the guess, ``baseline`` the
   share of examples whose every answer is.

Guessing per difficulty makes the level a little optimistic where the input does not
name the difficulty, so a model above it is above chance.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from archkit.tasks.base import Task, TaskBatch

Answer = tuple[int, ...]
TRAIN_EXAMPLES = 4096
BATCH = 512


@dataclass(frozen=True)
class Baseline:
    overall: float  # exact of the constant guesses
    by_difficulty: dict[int, float]

    def metrics(self) -> dict[str, float]:
        """``baseline`` and ``baseline/<difficulty>``, in the metric vocabulary."""
        return {"baseline": self.overall,
                **{f"baseline/{d}": v for d, v in sorted(self.by_difficulty.items())}}


def answers(batch: TaskBatch) -> Iterator[list[tuple[int, Answer]]]:
    """Per example, its (difficulty, answer tokens) pairs."""
    for tokens, by_answer in zip(batch.tokens.tolist(), batch.answer_difficulty.tolist(),
                                 strict=True):
        grouped: dict[int, list[int]] = defaultdict(list)
        for token, difficulty in zip(tokens, by_answer, strict=True):
            if difficulty >= 0:
                grouped[difficulty].append(token)
        yield [(d, tuple(a)) for d, a in grouped.items()]


def constant_baseline(task: Task, eval_batch: TaskBatch, seed: int,
                      train_examples: int = TRAIN_EXAMPLES) -> Baseline:
    """The best constant answers of ``task``, learned from the first ``train_examples``
    training examples of a run seeded ``seed``, scored on ``eval_batch``."""
    counts: dict[int, Counter[Answer]] = defaultdict(Counter)
    batch = min(BATCH, train_examples)
    for step in range(-(-train_examples // batch)):
        for example in answers(task.train_batch(step, batch, seed)):
            for difficulty, answer in example:
                counts[difficulty][answer] += 1
    anywhere = sum(counts.values(), Counter()).most_common(1)[0][0]
    guess = defaultdict(lambda: anywhere,
                        {d: c.most_common(1)[0][0] for d, c in counts.items()})
    right: dict[int, list[bool]] = defaultdict(list)
    whole = []
    for example in answers(eval_batch):
        hits = [answer == guess[d] for d, answer in example]
        for (d, _), hit in zip(example, hits, strict=True):
            right[d].append(hit)
        whole.append(all(hits))
    return Baseline(sum(whole) / len(whole),
                    {d: sum(hits) / len(hits) for d, hits in sorted(right.items())})

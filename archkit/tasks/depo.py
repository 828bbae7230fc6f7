"""Depo: k-hop successor queries on one directed cycle (Physics of Language Models, 4.1).

An example draws n nodes, gives them distinct names from a pool larger than the biggest
cycle, and joins them into one directed cycle. The context lists every edge in shuffled
order, left-padded to a fixed length; the prediction segment asks Q queries for the k-th
successor y of a start node x::

    <pad> ... <pad>  x -> y , x -> y , ... x -> y ,     context (context_len tokens)
    h<k> x : y   h<k> x : y   ...                        prediction (4 tokens per query)

Only each query's y is an answer, and its difficulty is its query's k (``hops_per:
query``, the paper's form: "1 hop after a: c", "4 hops after e: d"); the Q queries start
at distinct nodes. Training draws each k uniformly from [1, K]; evaluation cycles through
k = 1, 2, 4, ... (powers of two up to K), so every k is asked equally often. With
``hops_per: example`` the queries of an example share one k instead. An example's own
difficulty is the k of its first query. Every cycle has more than K nodes, so the k-th
successor is never the start node itself. T = context_len + 4Q.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from archkit.registry import register_task
from archkit.spec import SpecError
from archkit.tasks.base import IntRange, Split, Task, TaskConfig, draw_in_split

PositiveInt = Annotated[int, Field(gt=0)]
EDGE_TOKENS = 4  # x -> y ,
QUERY_TOKENS = 4  # h<k> x : y


class DepoConfig(TaskConfig):
    nodes: IntRange = Field((9, 16), description="cycle size n, drawn uniformly")
    max_hops: PositiveInt = Field(8, description="largest k (K)")
    queries: PositiveInt = Field(4, description="queries per example (Q)")
    context_len: PositiveInt = Field(64, description="context tokens, edges left-padded")
    names: PositiveInt = Field(32, description="size of the node-name pool")
    hops_per: Literal["query", "example"] = Field(
        "query", description="query: each query draws its own k (the paper); example: "
                             "the queries of an example share one k")

    paper_preset: ClassVar[dict[str, Any]] = {
        "nodes": (17, 75),
        "max_hops": 16,
        "queries": 10,
        "context_len": 300,
        "names": 100,
    }

    @model_validator(mode="after")
    def _consistent(self) -> DepoConfig:
        smallest, largest = self.nodes
        if smallest <= self.max_hops:
            raise SpecError(
                "task.nodes",
                f"every cycle longer than max_hops={self.max_hops}, so no "
                "query's answer is its own start node",
                list(self.nodes),
            )
        if self.queries > smallest:
            raise SpecError(
                "task.queries",
                f"at most {smallest} (the smallest cycle), as every query "
                "starts at a different node",
                self.queries,
            )
        if self.names <= largest:
            raise SpecError("task.names", f"a pool of more than {largest} names", self.names)
        if self.context_len < EDGE_TOKENS * largest:
            raise SpecError(
                "task.context_len",
                f"at least {EDGE_TOKENS * largest} tokens to list {largest} edges",
                self.context_len,
            )
        return self


@dataclass(frozen=True)
class DepoExample:
    cycle: tuple[str, ...]  # node names in cycle order, starting from the lowest name id
    hops: tuple[int, ...]  # k of each query
    queries: tuple[tuple[str, str], ...]  # (start node, its k-th successor)


@register_task("depo", config=DepoConfig, description="k-hop successors on a shuffled cycle")
class Depo(Task):
    difficulty_name = "hops"

    def __init__(self, config: DepoConfig) -> None:
        hops = range(1, config.max_hops + 1)
        self.first_name = 4 + len(hops)
        super().__init__(
            config,
            vocab=[
                "<pad>",
                "->",
                ",",
                ":",
                *(f"h{k}" for k in hops),
                *(f"n{i}" for i in range(config.names)),
            ],
            context_len=config.context_len,
            seq_len=config.context_len + QUERY_TOKENS * config.queries,
            difficulties=hops,
            eval_difficulties=[k for k in hops if k & (k - 1) == 0],
            pad="<pad>",
        )
        self.config: DepoConfig = config
        self.hop_ids = np.array([-1, *(self.ids[f"h{k}"] for k in hops)])

    def _cycle(self, rng: np.random.Generator) -> np.ndarray:
        """A random cycle as name indices, rotated to start at its lowest index so that one
        cycle has one content however its edges are listed."""
        low, high = self.config.nodes
        cycle = rng.choice(self.config.names, rng.integers(low, high + 1), replace=False)
        return np.roll(cycle, -int(cycle.argmin()))

    def _query_hops(self, rng: np.random.Generator, first: int, split: Split) -> np.ndarray:
        """k of each query, the first being the example's drawn difficulty: the same k
        (``hops_per: example``), or one each, drawn (training) or the next values in
        evaluation's cycle (so every k is asked equally often)."""
        count = self.config.queries
        if self.config.hops_per == "example":
            return np.full(count, first)
        values = self.difficulties[split]
        if split == "eval":
            return np.array(values)[(values.index(first) + np.arange(count)) % len(values)]
        return np.concatenate([[first], rng.choice(values, count - 1)])

    def generate(
        self, rng: np.random.Generator, difficulty: np.ndarray, split: Split
    ) -> tuple[np.ndarray, np.ndarray, list[DepoExample]]:
        n, start = len(difficulty), self.context_len
        tokens = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        examples = []
        cycles = draw_in_split(split, n, partial(self._cycle, rng))
        for row, first, names in zip(tokens, difficulty.tolist(), cycles, strict=True):
            node = names + self.first_name
            size = len(node)
            order = rng.permutation(size)
            edges = [node[order], self.ids["->"], node[(order + 1) % size], self.ids[","]]
            row[start - EDGE_TOKENS * size : start] = np.column_stack(
                np.broadcast_arrays(*edges)
            ).ravel()
            sources = rng.choice(size, self.config.queries, replace=False)
            hops = self._query_hops(rng, first, split)
            targets = (sources + hops) % size
            query = [self.hop_ids[hops], node[sources], self.ids[":"], node[targets]]
            row[start:] = np.column_stack(np.broadcast_arrays(*query)).ravel()
            examples.append(
                DepoExample(
                    cycle=tuple(self.vocab[i] for i in node),
                    hops=tuple(hops.tolist()),
                    queries=tuple(
                        (self.vocab[a], self.vocab[b])
                        for a, b in zip(node[sources], node[targets], strict=True)
                    ),
                )
            )
        loss_mask = np.zeros(tokens.shape, dtype=bool)
        loss_mask[:, start + QUERY_TOKENS - 1 :: QUERY_TOKENS] = True
        return tokens, loss_mask, examples

    def answer_difficulty(self, loss_mask: np.ndarray, difficulty: np.ndarray,
                          examples: list[DepoExample]) -> np.ndarray:
        """Each answer's difficulty is its query's k."""
        by_answer = np.full(loss_mask.shape, -1, dtype=np.int64)
        by_answer[:, self.context_len + QUERY_TOKENS - 1 :: QUERY_TOKENS] = [
            example.hops for example in examples]
        return by_answer

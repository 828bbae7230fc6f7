"""GSM-Infinite-style arithmetic over a random computation graph (archkit's own generator,
written from the public description of GSM-Infinite, not from its code).

A problem is a tree of statements rooted at the quantity asked for. Its difficulty,
``ops``, is the number of statements that compute from other quantities (every form but
``const``). Values are chosen from the root down, so every quantity is an integer in
[0, max_value]. The forms and their two renderings::

    const      assign X = 5 .        Ann has 5 apples.
    copy       assign X = Y .        Ann has as many apples as Bob has pears.
    add_const  assign X = Y + 3 .    Ann has 3 more apples than Bob has pears.
    sub_const  assign X = Y - 3 .    Ann has 3 fewer apples than Bob has pears.
    add        assign X = Y + Z .    Ann has as many apples as Bob's pears and Cid's plums together.
    sub        assign X = Y - Z .    Ann has as many apples as Bob's pears minus Cid's plums.
    question   what is X ?           How many apples does Ann have?

Distractor trees over other quantities, disconnected from the question, are added until
the problem reaches a target length drawn from ``context_tokens`` (single constants fill
the last gap), and all statements are shuffled. The question comes first::

    <pad> ... <pad>  question  statements        context (context_tokens[1] tokens)
    answer : d ... d <eos> <pad> ...              prediction; the digits and <eos> are answers

Tokens are words, with each digit a token of its own and "'s" split off. Each example
also keeps its raw text (question, context, answer) for other tokenizers.

With ``tokenizer:`` (a pretrained checkpoint's, ``model`` for the spec's own
``model.pretrained``) the same problems are tokenised by that tokenizer instead: every
statement encoded with a leading space, lengths counted in its tokens, and the prediction
segment `` Answer: <digits><eos>`` with the digits and end-of-sequence as the answers
(the loss). Scoring accepts any token that ends the number in place of end-of-sequence
(``accepts``), so an example is exact when greedy decoding writes exactly the answer's
digits and then anything but a digit: an exact integer match of the decoded answer.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, model_validator

from archkit.pretrained.source import CheckpointSource, PretrainedError
from archkit.pretrained.tokenizer import load_tokenizer
from archkit.registry import register_task
from archkit.spec import SpecError
from archkit.tasks.base import (
    CountRange,
    IntRange,
    Split,
    Task,
    TaskBatch,
    TaskConfig,
    draw_in_split,
)

PositiveInt = Annotated[int, Field(gt=0)]
Rendering = Literal["symbolic", "story"]
Form = Literal["const", "copy", "add_const", "sub_const", "add", "sub"]

FORMS: tuple[Form, ...] = ("const", "copy", "add_const", "sub_const", "add", "sub")
ROLES = {  # what Statement.args hold, per form: "a" a constant, "y" and "z" quantities
    "const": "a",
    "copy": "y",
    "add_const": "ya",
    "sub_const": "ya",
    "add": "yz",
    "sub": "yz",
}
TEMPLATES: dict[Rendering, dict[str, str]] = {
    "symbolic": {
        "const": "assign {x} = {a} .",
        "copy": "assign {x} = {y} .",
        "add_const": "assign {x} = {y} + {a} .",
        "sub_const": "assign {x} = {y} - {a} .",
        "add": "assign {x} = {y} + {z} .",
        "sub": "assign {x} = {y} - {z} .",
        "question": "what is {x} ?",
    },
    "story": {
        "const": "{x.who} has {a} {x.what}.",
        "copy": "{x.who} has as many {x.what} as {y.who} has {y.what}.",
        "add_const": "{x.who} has {a} more {x.what} than {y.who} has {y.what}.",
        "sub_const": "{x.who} has {a} fewer {x.what} than {y.who} has {y.what}.",
        "add": "{x.who} has as many {x.what} as {y.who}'s {y.what} and {z.who}'s {z.what} "
        "together.",
        "sub": "{x.who} has as many {x.what} as {y.who}'s {y.what} minus {z.who}'s {z.what}.",
        "question": "How many {x.what} does {x.who} have?",
    },
}
PEOPLE = [
    "Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon",
    "Kim", "Lea", "Max", "Ned", "Oli", "Pam", "Quin", "Ray", "Sue", "Tom",
    "Una", "Vic", "Wes", "Xia", "Yan", "Zoe", "Abe", "Bea", "Cal", "Dee",
    "Eli", "Flo", "Gil", "Hana", "Ivo", "Jade", "Kai", "Lou", "Mia", "Noa",
]  # fmt: skip
ITEMS = [
    "apples", "pears", "plums", "figs", "limes", "lemons", "melons", "grapes", "cherries",
    "peaches", "nuts", "eggs", "beads", "coins", "stamps", "marbles", "pencils", "books",
    "cards", "shells", "stones", "buttons", "ribbons", "candles", "kites",
]  # fmt: skip
SPECIALS = ["<pad>", "<eos>", "answer", ":"]
SHORTEST_STATEMENT = 5  # tokens of a one-digit constant, in either rendering
WORDS = re.compile(r"\d|'s|\w+|[^\w\s]")  # one digit, 's, a word, or one punctuation mark


class Quantity(NamedTuple):
    who: str
    what: str


@dataclass(frozen=True)
class Statement:
    form: Form
    target: int  # the quantity assigned, as an index into the name pool
    args: tuple[int, ...]  # constants and quantities in the order ROLES[form] names them


def quantity_name(index: int, rendering: Rendering) -> str | Quantity:
    if rendering == "symbolic":
        return f"v{index}"
    return Quantity(PEOPLE[index % len(PEOPLE)], ITEMS[index // len(PEOPLE)])


def render(statement: Statement, rendering: Rendering) -> str:
    fields = {"x": quantity_name(statement.target, rendering)}
    for role, arg in zip(ROLES[statement.form], statement.args, strict=True):
        fields[role] = arg if role == "a" else quantity_name(arg, rendering)
    return TEMPLATES[rendering][statement.form].format(**fields)


def render_question(target: int, rendering: Rendering) -> str:
    return TEMPLATES[rendering]["question"].format(x=quantity_name(target, rendering))


def longest_statement(rendering: Rendering, max_value: int) -> int:
    """Tokens of the longest statement any form can render to."""
    widest = {"a": max_value, "y": 1, "z": 2}
    statements = [Statement(f, 0, tuple(widest[r] for r in ROLES[f])) for f in FORMS]
    return max(len(WORDS.findall(render(s, rendering))) for s in statements)


class GsmInfiniteConfig(TaskConfig):
    ops: CountRange = Field(
        (1, 4), description="operations the question needs, drawn uniformly (0: a lookup)"
    )
    context_tokens: IntRange = Field(
        (128, 160), description="problem length in tokens (question + statements)"
    )
    rendering: Rendering = Field("symbolic", description="symbolic statements or a story")
    max_value: PositiveInt = Field(9, description="every quantity lies in [0, max_value]")
    names: PositiveInt = Field(100, description="size of the quantity-name pool")
    tokenizer: CheckpointSource | None = Field(
        None, description="tokenise with this checkpoint's tokenizer (`model`: the one "
                          "model.pretrained loads) instead of the task's own words")

    paper_preset: ClassVar[dict[str, Any]] = {
        "ops": (1, 8),
        "context_tokens": (2000, 3300),
        "max_value": 99,
        "names": 1000,
    }

    @model_validator(mode="after")
    def _fits(self) -> GsmInfiniteConfig:
        most_ops, longest = self.ops[1], self.context_tokens[1]
        # A tree with k ops has at most 2k + 1 statements: each op adds one or two operands.
        question = len(WORDS.findall(render_question(0, self.rendering)))
        needed = question + (2 * most_ops + 1) * longest_statement(self.rendering, self.max_value)
        # a model's tokenizer counts in its own tokens: checked when the task is built
        if self.tokenizer is None and longest < needed:
            raise SpecError(
                "task.context_tokens",
                f"room for the largest problem of {most_ops} ops: "
                f"at least {needed} tokens in the {self.rendering} rendering",
                list(self.context_tokens),
            )
        # Every statement names a new quantity; a distractor tree that does not fit wastes
        # at most 2k + 1 names.
        names = longest // SHORTEST_STATEMENT + 2 * most_ops + 1
        if self.names < names:
            raise SpecError(
                "task.names",
                f"at least {names} names for {longest} tokens of statements",
                self.names,
            )
        if self.rendering == "story" and self.names > len(PEOPLE) * len(ITEMS):
            raise SpecError(
                "task.names",
                f"at most {len(PEOPLE) * len(ITEMS)} in the story rendering "
                f"({len(PEOPLE)} people x {len(ITEMS)} items)",
                self.names,
            )
        return self


@dataclass(frozen=True)
class GsmExample:
    question: str  # raw text
    context: str  # raw text: the shuffled statements, distractors included
    answer: int
    ops: int
    graph: tuple[Statement, ...]  # the statements the question needs, its target first


@register_task(
    "gsm_infinite", config=GsmInfiniteConfig, description="GSM-Infinite-style arithmetic"
)
class GsmInfinite(Task):
    difficulty_name = "ops"

    def __init__(self, config: GsmInfiniteConfig) -> None:
        self.config: GsmInfiniteConfig = config
        self.tokenizer = None
        if config.tokenizer is not None:
            try:
                self.tokenizer = load_tokenizer(config.tokenizer)
            except PretrainedError as err:
                raise SpecError("task.tokenizer", f"a tokenizer archkit can load ({err})",
                                config.tokenizer.model_dump(exclude_none=True)) from None
        if self.tokenizer is not None:
            self._init_tokenized(config)
            return
        templates = TEMPLATES[config.rendering].values()
        words = {w for t in templates for w in WORDS.findall(re.sub(r"\{[^}]*\}", " ", t))}
        if config.rendering == "symbolic":
            names = [f"v{i}" for i in range(config.names)]
        else:
            people = PEOPLE[: min(config.names, len(PEOPLE))]
            names = [*people, *ITEMS[: math.ceil(config.names / len(PEOPLE))]]
        super().__init__(
            config,
            vocab=[*SPECIALS, *sorted(words), *"0123456789", *names],
            context_len=config.context_tokens[1],
            seq_len=config.context_tokens[1] + 3 + len(str(config.max_value)),  # answer : d <eos>
            difficulties=range(config.ops[0], config.ops[1] + 1),
            pad="<pad>",
        )

    def _init_tokenized(self, config: GsmInfiniteConfig) -> None:
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise SpecError("task.tokenizer", "a tokenizer with an end-of-sequence token",
                            config.tokenizer.model_dump(exclude_none=True))
        vocab, self.extends_number = _token_table(tokenizer)
        self.prediction_segments = {value: self._split_prediction(value)
                                    for value in range(config.max_value + 1)}
        super().__init__(
            config,
            vocab=vocab,
            context_len=config.context_tokens[1],
            seq_len=config.context_tokens[1] + max(
                len(prefix) + len(answer) for prefix, answer in self.prediction_segments.values()),
            difficulties=range(config.ops[0], config.ops[1] + 1),
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def accepts(self, predictions: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """With a model's tokenizer, the end-of-sequence answer is right when the guess
        ends the number with any token that does not extend it: every answer position
        right is then an exact integer match of the greedily decoded answer, for a
        pretrained model (which ends a number with '.' or a newline) as for a tuned one."""
        right = super().accepts(predictions, batch)
        if self.tokenizer is None:
            return right
        ends = batch.tokens == self.tokenizer.eos_token_id
        # an id beyond the tokenizer's (a model's vocabulary may be larger) is no digit
        table = torch.cat([self.extends_number, torch.zeros(1, dtype=torch.bool)])
        ids = predictions.cpu().clamp(0, len(self.extends_number))
        extends = table[ids].to(predictions.device)
        return right | (ends & ~extends & (predictions >= 0))

    def _split_prediction(self, answer: int) -> tuple[list[int], list[int]]:
        """`` Answer: <answer>`` tokenised whole, cut before the first token with a digit:
        (the opening, the answer's tokens and the end-of-sequence token)."""
        ids = self.tokenizer.encode(f" Answer: {answer}", add_special_tokens=False)
        cut = next(i for i in range(len(ids))
                   if any(c.isdigit() for c in self.tokenizer.decode(ids[: i + 1])))
        if self.tokenizer.decode(ids[cut:]).strip() != str(answer):
            raise SpecError("task.tokenizer", "a tokenizer that spells numbers back as written",
                            self.config.tokenizer.model_dump(exclude_none=True))
        return ids[:cut], [*ids[cut:], self.tokenizer.eos_token_id]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(" " + text, add_special_tokens=False)
        return [self.ids[word] for word in WORDS.findall(text)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)
        words: list[str] = []
        for word in self.token_strings(ids):
            if words and word.isdigit() and words[-1].isdigit():
                words[-1] += word  # numbers are spelled digit by digit
            else:
                words.append(word)
        return " ".join(words)

    def _operation(self, rand: random.Random, value: int) -> tuple[Form, list[int], list[int]]:
        """A random non-constant form that can produce ``value``, its operands' values and
        its constants; subtraction draws its operands upwards so nothing goes negative."""
        top = self.config.max_value
        forms: list[Form] = ["copy", "add", "sub"]
        forms += ["add_const"] * (value > 0) + ["sub_const"] * (value < top)
        form = rand.choice(forms)
        if form == "copy":
            return form, [value], []
        if form == "add":
            part = rand.randint(0, value)
            return form, [part, value - part], []
        if form == "sub":
            part = rand.randint(0, top - value)
            return form, [value + part, part], []
        if form == "add_const":
            constant = rand.randint(1, value)
            return form, [value - constant], [constant]
        constant = rand.randint(1, top - value)
        return form, [value + constant], [constant]

    def _tree(
        self, rand: random.Random, ops: int, names: Iterator[int]
    ) -> tuple[int, tuple[Statement, ...]]:
        """A tree of statements with exactly ``ops`` non-constant ones: its root's value
        and its statements, root first."""
        answer = rand.randint(0, self.config.max_value)
        pending = [(next(names), answer)]
        statements = []
        while pending:
            target, value = pending.pop(rand.randrange(len(pending)))
            # Spend an op here by a coin flip, or because no other quantity is left to.
            if ops and (not pending or rand.random() < 0.5):
                ops -= 1
                form, operands, constants = self._operation(rand, value)
                children = [(next(names), operand) for operand in operands]
                pending += children
                args = (*(name for name, _ in children), *constants)
            else:
                form, args = "const", (value,)
            statements.append(Statement(form, target, args))
        return answer, tuple(statements)

    def _question(
        self, rand: random.Random, ops: int, split: Split
    ) -> tuple[int, tuple[Statement, ...]]:
        """The answer and the statements of a question of ``split`` that needs ``ops`` ops."""

        def draw() -> tuple[int, tuple[Statement, ...]]:
            return self._tree(rand, ops, iter(rand.sample(range(self.config.names), ops * 2 + 1)))

        return draw_in_split(split, 1, draw, content=graph_content)[0]

    def _problem(
        self, rand: random.Random, answer: int, graph: tuple[Statement, ...]
    ) -> tuple[GsmExample, list[int]]:
        """The question's example, distractors added, and its context tokens (question,
        then statements; unpadded)."""
        cfg = self.config
        question = render_question(graph[0].target, cfg.rendering)
        pieces = [(text, self.encode(text)) for text in (render(s, cfg.rendering) for s in graph)]
        context = self.encode(question)
        room = rand.randint(*cfg.context_tokens) - len(context) - sum(len(p[1]) for p in pieces)
        needed = len(context) + sum(len(ids) for _, ids in pieces)
        if needed > self.context_len:  # only a model's tokenizer can make statements this long
            raise SpecError("task.context_tokens", f"room for a problem of {len(graph)} "
                            f"statements: at least {needed} tokens under this tokenizer",
                            list(cfg.context_tokens))

        used = {s.target for s in graph}
        free = [name for name in range(cfg.names) if name not in used]
        names = iter(rand.sample(free, len(free)))
        while True:  # distractor trees, as long as the next one fits
            _, tree = self._tree(rand, rand.randint(*cfg.ops), names)
            encoded = [
                (text, self.encode(text)) for text in (render(s, cfg.rendering) for s in tree)
            ]
            size = sum(len(ids) for _, ids in encoded)
            if size > room:
                break
            pieces += encoded
            room -= size
        while room >= SHORTEST_STATEMENT:  # then one-digit constants into the last gap
            digit = rand.randint(0, min(cfg.max_value, 9))
            text = render(Statement("const", next(names), (digit,)), cfg.rendering)
            ids = self.encode(text)
            if len(ids) > room:  # a tokenizer's names may take more than one token
                break
            pieces.append((text, ids))
            room -= len(ids)

        rand.shuffle(pieces)
        context += [token for _, ids in pieces for token in ids]
        text = " ".join(text for text, _ in pieces)
        ops = sum(s.form != "const" for s in graph)
        return GsmExample(question, text, answer, ops, graph), context

    def generate(
        self, rng: np.random.Generator, difficulty: np.ndarray, split: Split
    ) -> tuple[np.ndarray, np.ndarray, list[GsmExample]]:
        # Python's generator draws single numbers several times faster than numpy's.
        rand = random.Random(int(rng.integers(2**63)))
        n, start = len(difficulty), self.context_len
        tokens = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(tokens.shape, dtype=bool)
        examples = []
        # All questions first: the rendering changes how many distractors fit, and so how
        # much randomness they use, but must not change the questions.
        questions = [self._question(rand, ops, split) for ops in difficulty.tolist()]
        for i, (answer, graph) in enumerate(questions):
            example, context = self._problem(rand, answer, graph)
            prefix, answer_ids = self._prediction(answer)
            tokens[i, start - len(context) : start] = context
            end = start + len(prefix) + len(answer_ids)
            tokens[i, start:end] = prefix + answer_ids
            loss_mask[i, start + len(prefix) : end] = True
            examples.append(example)
        return tokens, loss_mask, examples

    def _prediction(self, answer: int) -> tuple[list[int], list[int]]:
        """The prediction segment's opening and its answer tokens (digits, end)."""
        if self.tokenizer is None:
            return [self.ids["answer"], self.ids[":"]], [
                *(self.ids[d] for d in str(answer)), self.ids["<eos>"]]
        return self.prediction_segments[answer]


@functools.lru_cache(maxsize=4)
def _token_table(tokenizer: Any) -> tuple[list[str], torch.Tensor]:
    """A tokenizer's token strings and which tokens start with a digit (would extend a
    number), once per tokenizer: the spec, trainer and evaluation each build the task."""
    ids = list(range(len(tokenizer)))
    digits = torch.tensor([tokenizer.decode([i])[:1].isdigit() for i in ids])
    return tokenizer.convert_ids_to_tokens(ids), digits


def graph_content(question: tuple[int, tuple[Statement, ...]]) -> np.ndarray:
    """What identifies a problem for the train/eval split: its needed statements, so the
    same problem is held out whatever its rendering and distractors."""
    _, graph = question
    return np.array(
        [[FORMS.index(s.form), s.target, *s.args, *[-1] * (2 - len(s.args))] for s in graph]
    )

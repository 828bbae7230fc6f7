"""Sleep: consolidate each evicted window into fast weights with N offline passes.

The paper's Algorithm 1, batched. Fast weights start at zero. The sequence is cut into
windows of L tokens; each window that lies wholly inside the context is slept on
(``sleep.split: sequence``, the paper's rule; ``split: context`` sleeps on every context
token instead)::

    h = embed(window);  h = pre(h)                    layers before sleep.layers, once
    repeat N times:     h, S = loop(h, S)             hidden states and fast weights carry;
                                                      attention re-reads the window each pass
    h = post(h);        evict (hard: clear KV / sliding: keep the newest L-1)

Only the state survives a window. The window holding the first prediction token, with
the context tokens it shares, is then read in one ordinary pass ("wake"); when a wake
window fills, the model
sleeps on it the same way before reading on, so memory stays bounded by L. Wake cost
does not depend on N: the passes happen before the question is read.

The residual stream is fed back un-normalised unless ``sleep.pass_norm: rms``, which
rescales h before passes 2..N to the per-token RMS it had entering pass 1 (so N = 1 is
unchanged and every pass starts at the same scale, however much a pass grew h).

Within a pass, each looping block starts from its state *before* the window with its
persistent memory replaced by the latest (``Block.rewind``): attention rebuilds its KV
from the current h, fast weights keep accumulating.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from archkit.blocks.common import (
    FastWeightState,
    KVCache,
    map_state,
    select_state,
    state_bytes,
)
from archkit.blocks.fast_weight import FastWeightBlock
from archkit.card import require_memory
from archkit.model import HybridModel, ModelState
from archkit.pretrained.weights import load_pretrained
from archkit.sleep_controllers import SleepController, make_controller
from archkit.spec import SleepSpec, Spec, SpecError


def _rms(h: Tensor) -> Tensor:
    return h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()


@dataclass
class SleepReport:
    """What a run cost: sleeps, passes per sleep, peak KV tokens, fast-weight bytes.

    Sleeps are numbered in order, context windows first: the next sleep is window
    ``sleeps``, and those from ``context_windows`` on are sleeps while reading awake.
    ``passes`` holds the batch's mean passes per sleep, ``passes_per_sequence`` each
    sequence's (they differ only where a controller stops sequences early).
    """

    passes: list[float] = field(default_factory=list)  # one entry per sleep
    passes_per_sequence: list[Tensor] = field(default_factory=list)  # [B] per sleep
    context_windows: int = 0
    kv_peak_tokens: int = 0
    fast_weight_bytes: int = 0

    @property
    def sleeps(self) -> int:
        return len(self.passes)

    def track_kv(self, state: ModelState) -> None:
        self.kv_peak_tokens = max(self.kv_peak_tokens, kv_tokens(state))


@dataclass
class SleepOutput:
    logits: Tensor  # [B, T - context_len, vocab]: the prediction segment
    loss: Tensor | None  # masked cross-entropy over the answer positions
    state: ModelState
    report: SleepReport


@dataclass
class WakeState:
    """Decode state: the model's state, the state before the current wake window, the
    window's tokens (re-read when the model sleeps on it) and the report so far."""

    layers: ModelState
    window_start: ModelState
    window_tokens: Tensor  # [B, tokens read in the current wake window]
    report: SleepReport


class SleepingModel(nn.Module):
    def __init__(self, model: HybridModel, sleep: SleepSpec) -> None:
        super().__init__()
        self.model, self.sleep = model, sleep
        self.controller: SleepController = make_controller(sleep)
        self.loop = sleep.loop_range(len(model.layers))
        self.pre = range(self.loop.start)
        self.post = range(self.loop.stop, len(model.layers))

    @classmethod
    def from_spec(cls, spec: Spec, pretrained: bool = True) -> SleepingModel:
        """The spec's model, initialised from ``spec.seed`` (and, with ``pretrained``, from
        the checkpoint ``model.pretrained`` names, retrofit edits applied), sleeping as
        ``spec.sleep`` says; a model whose weights could not fit in memory is refused
        before allocating. Pass ``pretrained=False`` when a run's own weights follow."""
        if spec.sleep is None:
            raise SpecError("sleep", "a `sleep:` section is needed to build a sleeping model")
        require_memory(spec.model, torch.device("cpu"), training=False)
        torch.manual_seed(spec.seed)
        model = HybridModel(spec.model)
        if pretrained and spec.model.pretrained is not None:
            load_pretrained(model, spec.model)
        return cls(model, spec.sleep)

    @property
    def window(self) -> int:
        return self.sleep.window

    def forward(self, tokens: Tensor, context_len: int, loss_mask: Tensor | None = None
                ) -> SleepOutput:
        """Consolidate ``tokens[:, :context_len]``, then read the rest awake.

        ``loss_mask[:, p]`` marks answer tokens, each predicted by the logits at p - 1;
        answers must lie in the prediction segment (p > context_len).
        """
        total = tokens.shape[1]
        if not 0 <= context_len < total:
            raise ValueError(f"context_len must be in [0, {total}), got {context_len}")
        awake_from = self.sleep.awake_from(context_len)
        wake, pieces = self.init_wake(tokens[:, :awake_from]), []
        for start in range(awake_from, total, self.window):
            window = tokens[:, start:start + self.window]
            logits, wake = self._read_awake(window, wake, partial(self.model, window))
            pieces.append(logits)
        logits = torch.cat(pieces, dim=1)[:, context_len - awake_from:]
        loss = None
        if loss_mask is not None:
            if loss_mask[:, : context_len + 1].any():
                raise ValueError("loss_mask marks a position inside the context")
            answers = loss_mask[:, context_len + 1:]
            scores = logits[:, :-1][answers]  # half precision is scored in float32
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            loss = F.cross_entropy(scores, tokens[:, context_len + 1:][answers])
        return SleepOutput(logits, loss, wake.layers, wake.report)

    def consolidate(self, window: Tensor, state: ModelState, report: SleepReport
                    ) -> ModelState:
        """Sleep on one window (Algorithm 1), recorded in ``report`` as its next sleep.

        1. N = the controller's passes for window ``report.sleeps`` (of
           ``report.context_windows`` context windows).
        2. h = the layers before ``sleep.layers`` over embed(window), once.
        3. N times (fewer for a sequence whose fast weights the controller sees converge):
           a. from the second pass on, rewind the looping layers (local context from
              before the first pass, persistent memory from now) and, under
              ``pass_norm: rms``, rescale h to its RMS entering the first pass;
           b. under ``backprop: last_k``, cut the graph before the last k passes;
           c. h, state = the looping layers over h, kept only for the sequences still
              sleeping; the others keep what they had when they stopped.
        4. The layers after, once; record the sleep; evict the window.
        """
        sleep, model, controller = self.sleep, self.model, self.controller
        max_passes = controller.passes(report.sleeps, report.context_windows, self.training)
        watch = controller.watches_weights(self.training)
        grad = sleep.backprop != "none" and torch.is_grad_enabled()
        sleeping = torch.ones(window.shape[0], dtype=torch.bool, device=window.device)
        passes = torch.zeros(window.shape[0], dtype=torch.long, device=window.device)
        with torch.set_grad_enabled(grad), self.asleep():
            h, state = model.run_layers(model.embed(window), state, self.pre)
            before = state
            entry_rms = _rms(h) if sleep.pass_norm == "rms" else None
            for done in range(max_passes):
                start_h, start_state = h, state
                if done > 0:
                    start_state = model.rewind(before, state, self.loop)
                    if entry_rms is not None:
                        start_h = h * (entry_rms / _rms(h))
                if sleep.backprop == "last_k" and done == max_passes - sleep.last_k > 0:
                    start_h = start_h.detach()
                    start_state = [map_state(s, Tensor.detach) for s in start_state]
                new_h, new_state = self._pass(start_h, start_state)
                if not watch:  # every sequence runs every pass: no per-sequence bookkeeping
                    h, state = new_h, new_state
                    continue
                passes += sleeping
                if sleeping.all():
                    h, state = new_h, new_state
                else:  # after a pass, so a stopped sequence's state has the new one's shapes
                    h = torch.where(sleeping[:, None, None], new_h, h)
                    state = [select_state(sleeping, new, old) if i in self.loop else new
                             for i, (new, old) in enumerate(zip(new_state, state, strict=True))]
                stop = controller.converged(self._fast_weights(start_state),
                                            self._fast_weights(new_state), done + 1)
                sleeping = sleeping & ~stop
                if not sleeping.any():
                    break
            h, state = model.run_layers(h, state, self.post)
        if not watch:  # counted on the CPU: no device sync
            passes = torch.full((window.shape[0],), done + 1)
        report.passes.append(passes.double().mean().item())
        report.passes_per_sequence.append(passes.cpu())
        report.track_kv(state)
        report.fast_weight_bytes = fast_weight_bytes(state)
        keep = self.window - 1 if sleep.eviction == "sliding" else 0
        return model.evict(state, sleep.eviction, keep)

    def _pass(self, h: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        if self.sleep.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._pass_asleep, h, state, use_reentrant=False)
        return self.model.run_layers(h, state, self.loop)

    def _pass_asleep(self, h: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """One pass under the sleep rule, whoever calls it: the backward pass recomputes a
        checkpointed pass after ``consolidate`` has left ``asleep()``."""
        with self.asleep():
            return self.model.run_layers(h, state, self.loop)

    def _fast_weights(self, state: ModelState) -> list[Tensor]:
        return [state[i].weights for i in self.loop if isinstance(state[i], FastWeightState)]

    @contextlib.contextmanager
    def asleep(self) -> Iterator[None]:
        """Fast-weight blocks apply the sleep rule (if one is set) while asleep."""
        if self.sleep.rule == "same":
            yield
            return
        blocks = [m for m in self.model.modules() if isinstance(m, FastWeightBlock)]
        wake_rules = [b.rule for b in blocks]
        for block in blocks:
            block.rule = self.sleep.rule
        try:
            yield
        finally:
            for block, rule in zip(blocks, wake_rules, strict=True):
                block.rule = rule

    def sleep_on_context(self, context: Tensor) -> tuple[ModelState, SleepReport]:
        """Fresh fast weights, then every window of ``context`` [B, C] slept on in turn."""
        state, report = self.model.init_state(context.shape[0]), SleepReport()
        starts = range(0, context.shape[1], self.window)
        report.context_windows = len(starts)
        for start in starts:
            state = self.consolidate(context[:, start:start + self.window], state, report)
        return state, report

    def init_wake(self, context: Tensor) -> WakeState:
        """Consolidate a whole context, window by window, ready to read awake."""
        state, report = self.sleep_on_context(context)
        return WakeState(state, state, context[:, :0], report)

    def wake_step(self, token: Tensor, wake: WakeState) -> tuple[Tensor, WakeState]:
        """Read one token per sequence awake (one pass): ``token`` [B] -> logits [B, V].

        A full wake window is first slept on and evicted, so memory stays bounded."""
        return self._read_awake(token[:, None], wake, partial(self.model.step, token))

    def _read_awake(self, tokens: Tensor, wake: WakeState,
                    read: Callable[[ModelState], tuple[Tensor, ModelState]]
                    ) -> tuple[Tensor, WakeState]:
        """Read ``tokens`` [B, n] into the wake window; ``read(state) -> (logits, state)``
        runs the model over them (``forward`` for a window, ``step`` for one token).

        A full wake window is first slept on, from the state before it, and evicted; the
        next window starts from the result, so memory stays bounded by L."""
        if wake.window_tokens.shape[1] == self.window:
            state = self.consolidate(wake.window_tokens, wake.window_start, wake.report)
            wake = WakeState(state, state, wake.window_tokens[:, :0], wake.report)
        logits, layers = read(wake.layers)
        wake.report.track_kv(layers)
        window_tokens = torch.cat([wake.window_tokens, tokens], dim=1)
        return logits, dataclasses.replace(wake, layers=layers, window_tokens=window_tokens)

    @torch.no_grad()
    def generate(self, prompt: Tensor, context_len: int, max_new_tokens: int
                 ) -> tuple[Tensor, Tensor, SleepReport]:
        """Sleep on the context as ``forward`` does, read the rest awake, then decode
        greedily.

        Returns the new tokens [B, max_new_tokens], the logits that chose them, and the
        report."""
        if not 0 <= context_len < prompt.shape[1]:
            raise ValueError("the prompt needs at least one token after the context")
        awake_from = self.sleep.awake_from(context_len)
        wake = self.init_wake(prompt[:, :awake_from])
        for t in range(awake_from, prompt.shape[1]):
            logits, wake = self.wake_step(prompt[:, t], wake)
        new_tokens, new_logits = [], []
        for _ in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            new_tokens.append(token)
            new_logits.append(logits)
            logits, wake = self.wake_step(token, wake)
        return torch.stack(new_tokens, 1), torch.stack(new_logits, 1), wake.report


def kv_tokens(state: ModelState) -> int:
    return max((s.tokens for s in state if isinstance(s, KVCache)), default=0)


def fast_weight_bytes(state: ModelState) -> int:
    return sum(state_bytes(s) for s in state if isinstance(s, FastWeightState))

"""Sleep: consolidate each evicted window into fast weights with N offline passes.

The paper's Algorithm 1, batched. Fast weights start at zero. The context (tokens
``[0, context_len)``) is cut into windows of L tokens; for each window::

    h = embed(window);  h = pre(h)                    layers before sleep.layers, once
    repeat N times:     h, S = loop(h, S)             hidden states and fast weights carry;
                                                      attention re-reads the window each pass
    h = post(h);        evict (hard: clear KV / sliding: keep the newest L-1)

Only the state survives a window. The prediction segment then starts a fresh window and
is read in one ordinary pass per token ("wake"); when a wake window fills, the model
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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from archkit.blocks.common import FastWeightBlock, FastWeightState, KVCache, map_state, state_bytes
from archkit.model import HybridModel, ModelState
from archkit.sleep_controllers import SleepController, make_controller
from archkit.spec import SleepSpec, Spec, SpecError


def _rms(h: Tensor) -> Tensor:
    return h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()


@dataclass
class SleepReport:
    """What a run cost: sleeps, passes per sleep, peak KV tokens, fast-weight bytes."""

    passes: list[int] = field(default_factory=list)  # one entry per sleep
    peak_kv_tokens: int = 0
    fast_weight_bytes: int = 0

    @property
    def sleeps(self) -> int:
        return len(self.passes)


@dataclass
class SleepOutput:
    logits: Tensor  # [B, T - context_len, vocab]: the prediction segment
    loss: Tensor | None  # masked cross-entropy over the answer positions
    state: ModelState
    report: SleepReport


@dataclass
class WakeState:
    """Decode state: the model's state, the state before the current wake window, and
    the window's tokens (re-read when the model sleeps on it)."""

    layers: ModelState
    window_start: ModelState
    window_tokens: Tensor  # [B, tokens read in the current wake window]
    context_windows: int
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
    def from_spec(cls, spec: Spec) -> SleepingModel:
        """The spec's model, initialised from ``spec.seed``, sleeping as ``spec.sleep`` says."""
        if spec.sleep is None:
            raise SpecError("sleep", "a `sleep:` section is needed to build a sleeping model")
        torch.manual_seed(spec.seed)
        return cls(HybridModel(spec.model), spec.sleep)

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
        report = SleepReport()
        state = self.sleep_on_context(tokens[:, :context_len], report)
        pieces, window_start, context_windows = [], state, report.sleeps
        for start in range(context_len, total, self.window):
            if start > context_len:  # the previous wake window is full: sleep on it
                full = tokens[:, start - self.window:start]
                state = self.consolidate(full, window_start, report.sleeps, context_windows,
                                         report)
            window_start = state
            logits, state = self.model(tokens[:, start:start + self.window], state)
            report.peak_kv_tokens = max(report.peak_kv_tokens, kv_tokens(state))
            pieces.append(logits)
        logits = torch.cat(pieces, dim=1)
        loss = None
        if loss_mask is not None:
            if loss_mask[:, : context_len + 1].any():
                raise ValueError("loss_mask marks a position inside the context")
            answers = loss_mask[:, context_len + 1:]
            scores = logits[:, :-1][answers]  # half precision is scored in float32
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            loss = F.cross_entropy(scores, tokens[:, context_len + 1:][answers])
        return SleepOutput(logits, loss, state, report)

    def consolidate(self, window: Tensor, state: ModelState, index: int, n_windows: int,
                    report: SleepReport) -> ModelState:
        """Sleep on one window: pre once, loop ``passes`` times, post once, then evict."""
        sleep, model = self.sleep, self.model
        max_passes = self.controller.passes(index, n_windows, self.training)
        grad = sleep.backprop != "none" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), self.asleep():
            h, state = model.run_layers(model.embed(window), state, self.pre)
            before, passes = state, 0
            entry_rms = _rms(h) if sleep.pass_norm == "rms" else None
            while passes < max_passes:
                if passes > 0:
                    state = [model.layers[i].mixer.rewind(before[i], state[i])
                             if i in self.loop else state[i] for i in range(len(state))]
                    if entry_rms is not None:
                        h = h * (entry_rms / _rms(h))
                if sleep.backprop == "last_k" and passes == max_passes - sleep.last_k > 0:
                    h, state = h.detach(), [map_state(s, Tensor.detach) for s in state]
                previous = [s.weights for s in self._fast(state)]
                h, state = self._pass(h, state)
                passes += 1
                now = [s.weights for s in self._fast(state)]
                if self.controller.converged(previous, now, passes, self.training):
                    break
            h, state = model.run_layers(h, state, self.post)
        report.passes.append(passes)
        report.peak_kv_tokens = max(report.peak_kv_tokens, kv_tokens(state))
        report.fast_weight_bytes = fast_weight_bytes(state)
        keep = self.window - 1 if sleep.eviction == "sliding" else 0
        return model.evict(state, sleep.eviction, keep)

    def _pass(self, h: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        if self.sleep.checkpoint and torch.is_grad_enabled():
            return checkpoint(self.model.run_layers, h, state, self.loop, use_reentrant=False)
        return self.model.run_layers(h, state, self.loop)

    def _fast(self, state: ModelState) -> list[FastWeightState]:
        return [state[i] for i in self.loop if isinstance(state[i], FastWeightState)]

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

    def sleep_on_context(self, context: Tensor, report: SleepReport) -> ModelState:
        """Fresh fast weights, then every window of ``context`` [B, C] slept on in turn."""
        state = self.model.init_state(context.shape[0])
        starts = range(0, context.shape[1], self.window)
        for index, start in enumerate(starts):
            state = self.consolidate(context[:, start:start + self.window], state, index,
                                     len(starts), report)
        return state

    def init_wake(self, context: Tensor) -> WakeState:
        """Consolidate a whole context, window by window, ready to read awake."""
        report = SleepReport()
        state = self.sleep_on_context(context, report)
        return WakeState(state, state, context[:, :0], report.sleeps, report)

    def wake_step(self, token: Tensor, wake: WakeState) -> tuple[Tensor, WakeState]:
        """Read one token per sequence awake (one pass): ``token`` [B] -> logits [B, V].

        A full wake window is first slept on and evicted, so memory stays bounded."""
        layers, start, tokens = wake.layers, wake.window_start, wake.window_tokens
        if tokens.shape[1] == self.window:
            layers = start = self.consolidate(tokens, start, wake.report.sleeps,
                                              wake.context_windows, wake.report)
            tokens = tokens[:, :0]
        logits, layers = self.model.step(token, layers)
        wake.report.peak_kv_tokens = max(wake.report.peak_kv_tokens, kv_tokens(layers))
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        return logits, dataclasses.replace(wake, layers=layers, window_start=start,
                                           window_tokens=tokens)

    @torch.no_grad()
    def generate(self, prompt: Tensor, context_len: int, max_new_tokens: int
                 ) -> tuple[Tensor, Tensor, SleepReport]:
        """Sleep on ``prompt[:, :context_len]``, read the rest awake, then decode greedily.

        Returns the new tokens [B, max_new_tokens], the logits that chose them, and the
        report."""
        if not 0 <= context_len < prompt.shape[1]:
            raise ValueError("the prompt needs at least one token after the context")
        wake = self.init_wake(prompt[:, :context_len])
        for t in range(context_len, prompt.shape[1]):
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

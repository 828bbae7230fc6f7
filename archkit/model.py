"""HybridModel: embedding -> layers (pre-norm mixer + residual, pre-norm MLP + residual)
-> final norm -> head.

The model is stateful over windows: ``forward(tokens, state)`` continues from ``state``
(one entry per layer: a KV cache, fast weights, or None), so a sequence may be fed in
one call, window by window, or token by token with ``step``, with the same result.
``embed``, ``run_layers``, ``rewind``, ``logits`` and ``evict`` are the pieces the sleep
runtime composes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from archkit.blocks.common import Block, EvictionPolicy, RMSNorm
from archkit.blocks.mlp import SwiGLU
from archkit.compiled import CompiledOrEager
from archkit.registry import BLOCKS
from archkit.spec import LayerSpec, ModelSpec

ModelState = list[Any]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class HybridLayer(nn.Module):
    def __init__(self, layer: LayerSpec, spec: ModelSpec) -> None:
        super().__init__()
        self.block_name = layer.block
        self.mixer_norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.mixer: Block = BLOCKS.get(layer.block).obj(spec.d_model, layer.config, spec.norm_eps)
        self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps) if layer.mlp else None
        self.mlp = SwiGLU(spec.d_model, spec.hidden_width) if layer.mlp else None

    def forward(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self._residual(self.mixer, x, state)

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One token, ``x_t`` [B, D], through the mixer's single-step path."""
        return self._residual(self.mixer.step, x_t, state)

    def _residual(self, mix: Callable[[Tensor, Any], tuple[Tensor, Any]], x: Tensor,
                  state: Any) -> tuple[Tensor, Any]:
        mixed, state = mix(self.mixer_norm(x), state)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


class HybridModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embedding = nn.Embedding(spec.vocab_size, spec.d_model)
        self.layers = nn.ModuleList(HybridLayer(layer, spec) for layer in spec.resolved_layers)
        self.norm = RMSNorm(spec.d_model, spec.norm_eps)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self.apply(_init_weights)
        self._tie()
        self.to(DTYPES[spec.dtype])
        self._compiled_layers: CompiledOrEager | None = None
        self._compiled_step: CompiledOrEager | None = None

    @classmethod
    def uninitialised(cls, spec: ModelSpec) -> HybridModel:
        """The spec's model on the CPU with its weights' memory left as it was: for reading
        shapes and probing costs (``archkit build``), where initialising billions of
        weights would take most of a minute."""
        with torch.device("meta"):
            model = cls(spec)
        model = model.to_empty(device="cpu")
        model._tie()  # to_empty gives each module a parameter of its own
        return model

    def _tie(self) -> None:
        if self.spec.tie_embeddings:
            self.head.weight = self.embedding.weight

    def init_state(self, batch_size: int) -> ModelState:
        return [layer.mixer.init_state(batch_size) for layer in self.layers]

    def embed(self, tokens: Tensor) -> Tensor:
        return self.embedding(tokens)

    def compile_passes(self) -> None:
        """From now on run windows (``run_layers``) and one-token steps (``step``) through
        ``torch.compile``, or eagerly where compiling fails (``archkit.compiled``)."""
        self._compiled_layers = CompiledOrEager(HybridModel._run_layers, "the window passes")
        self._compiled_step = CompiledOrEager(HybridModel._step, "the wake step")

    def run_layers(self, h: Tensor, state: ModelState, layers: range | None = None
                   ) -> tuple[Tensor, ModelState]:
        """Run ``layers`` (default: all) over hidden states ``h`` [B, T, D]."""
        run = self._compiled_layers or HybridModel._run_layers
        return run(self, h, state, layers if layers is not None else range(len(self.layers)))

    def _run_layers(self, h: Tensor, state: ModelState, layers: range
                    ) -> tuple[Tensor, ModelState]:
        state = list(state)
        for i in layers:
            h, state[i] = self.layers[i](h, state[i])
        return h, state

    def logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    def forward(self, tokens: Tensor, state: ModelState | None = None
                ) -> tuple[Tensor, ModelState]:
        """Logits [B, T, vocab] for ``tokens`` [B, T], continuing from ``state``."""
        if state is None:
            state = self.init_state(tokens.shape[0])
        h, state = self.run_layers(self.embed(tokens), state)
        return self.logits(h), state

    def step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Decode one token per sequence: ``token`` [B] -> logits [B, vocab]."""
        return (self._compiled_step or HybridModel._step)(self, token, state)

    def _step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        h = self.embed(token)
        state = list(state)
        for i, layer in enumerate(self.layers):
            h, state[i] = layer.step(h, state[i])
        return self.logits(h), state

    def evict(self, state: ModelState, policy: EvictionPolicy, keep: int = 0) -> ModelState:
        pairs = zip(self.layers, state, strict=True)
        return [layer.mixer.evict(s, policy, keep) for layer, s in pairs]

    def rewind(self, before: ModelState, state: ModelState, layers: range) -> ModelState:
        """``state`` with ``layers`` ready to read a window again (``Block.rewind``): their
        local context as in ``before``, their persistent memory as in ``state``."""
        return [self.layers[i].mixer.rewind(before[i], s) if i in layers else s
                for i, s in enumerate(state)]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)

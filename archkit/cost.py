"""Cost plans: what training and waking a spec's model cost, before launching it.

Counted for one sequence of the spec's task (T tokens, the first ``awake_from`` slept on
in windows of L, the rest read awake; a wake window that fills is slept on too), with
N = ``sleep.passes`` and f_i the forward FLOPs per token of layer i (2 per multiply-add of
its matrices, plus its mixing work at window L)::

    slept token   sum f_i (layers before the loop) + N sum f_i (loop) + sum f_i (after)
    awake token   sum f_i (all layers) + the head
    backward      awake token: 2 x its forward. Slept token: walking the layers it went
                  through backwards (after, the graded passes' loop, before), a layer
                  costs 2 f_i when gradient reaches its output h, and when it reaches only
                  the state it keeps after eviction, 2 x (2 per multiply-add of the
                  matrices that write that state + its mixing work); a layer with neither
                  costs nothing (a slept window's final h is discarded). Graded passes: all
                  (backprop full), the last k (last_k: nothing before them, and since
                  each window's state enters them detached, only the last window slept
                  on gets gradient), none (none)
    recompute     the passes with gradient once more, under sleep.checkpoint

Which matrices write the kept state, and whether a layer keeps any (attention under hard
eviction keeps none), is found by probing the layer on a short window. A layer whose state
feeds the next pass is taken to keep it (fast weights do; rewound attention does not, which
makes the plan high by the attention backward of those passes under sliding eviction).

Activation memory per example is measured, not modelled: each layer reads one window
(at most 64 tokens) alone on the CPU, in the model's dtype, and the bytes it saves for
backward (``saved_tensors_hooks``, parameters and repeats left out) are scaled by the
tokens it reads in a sequence, once per pass. With checkpointing a pass keeps only its
input (h and the looping layers' state) and one pass is recomputed at a time. Attention
score matrices of long windows are not counted (flash attention keeps none); bf16
autocast on CUDA keeps roughly half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from archkit.blocks.common import EvictionPolicy, state_bytes, state_tensors
from archkit.card import layer_flops_per_token
from archkit.model import DTYPES, HybridModel
from archkit.spec import Spec, SpecError

PROBE_TOKENS = 64


@torch.enable_grad()
def activation_bytes_per_token(model: HybridModel, window: int) -> list[float]:
    """Bytes each layer saves for backward per token read, measured on one window of at
    most :data:`PROBE_TOKENS` tokens from a fresh state."""
    tokens = min(window, PROBE_TOKENS)
    dtype = DTYPES[model.spec.dtype]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = []
    for layer in model.layers:
        saved: dict[int, int] = {}

        def keep(t: Tensor, saved: dict[int, int] = saved) -> Tensor:
            pointer = t.untyped_storage().data_ptr()
            if pointer not in weights:
                saved[pointer] = t.untyped_storage().nbytes()
            return t

        h = torch.randn(1, tokens, model.spec.d_model, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(h, layer.mixer.init_state(1))
        sizes.append(sum(saved.values()) / tokens)
    return sizes


@dataclass(frozen=True)
class StateGradient:
    """What backward costs a layer, per token, when gradient reaches only the state it
    keeps after eviction: ``flops`` (0 when it keeps nothing that depends on the window)."""

    flops: float

    @property
    def kept(self) -> bool:
        return self.flops > 0


@torch.enable_grad()
def state_gradient(model: HybridModel, layer_index: int, window: int, policy: EvictionPolicy,
                   keep: int) -> StateGradient:
    """Probe one layer on a short window from a fresh state: which of its matrices the kept
    state depends on (autograd reach), so the backward from that state alone is 2 x (2 per
    multiply-add of those matrices + the mixing work)."""
    layer = model.layers[layer_index]
    tokens = min(window, PROBE_TOKENS)
    h = torch.randn(1, tokens, model.spec.d_model, dtype=DTYPES[model.spec.dtype],
                    requires_grad=True)
    _, state = layer(h, layer.mixer.init_state(1))
    kept = state_tensors(layer.mixer.evict(state, policy, keep))
    kept = [t for t in kept if t.requires_grad]
    if not kept:
        return StateGradient(0.0)
    matrices = [m.weight for m in layer.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    reached = torch.autograd.grad(sum(t.sum() for t in kept), matrices, allow_unused=True)
    writing = sum(w.numel() for w, g in zip(matrices, reached, strict=True) if g is not None)
    return StateGradient(2.0 * (2 * writing + layer.mixer.mixing_flops_per_token(window)))


def slept_backward_flops(flops: list[int], kept: list[StateGradient], loop: range,
                         passes: int, graded_passes: int) -> float:
    """Backward FLOPs of one slept token (see the module docstring): the layers in reverse
    order of execution, each costing by what its gradient reaches."""
    if graded_passes == 0:
        return 0.0
    order = list(range(loop.stop, len(flops)))[::-1] + list(loop)[::-1] * graded_passes
    if graded_passes == passes:
        order += list(range(loop.start))[::-1]
    total, output_needed = 0.0, False
    for i in order:
        if output_needed:
            total += 2 * flops[i]
        else:
            total += kept[i].flops
        output_needed = output_needed or kept[i].kept
    return total


@dataclass(frozen=True)
class Reading:
    """How one sequence of the task is read: tokens slept on and read awake."""

    tokens: int
    slept: int
    awake: int

    @classmethod
    def of(cls, spec: Spec) -> Reading:
        assert spec.task is not None and spec.sleep is not None
        task, sleep = spec.task.build(), spec.sleep
        awake_from = sleep.awake_from(task.context_len)
        awake = task.seq_len - awake_from
        wake_sleeps = max(0, math.ceil(awake / sleep.window) - 1)
        return cls(task.seq_len, awake_from + wake_sleeps * sleep.window, awake)


def cost_plan(model: HybridModel, spec: Spec) -> dict[str, Any]:
    """``train_flops_per_token`` and the activation memory per example with full backprop
    through the passes and with checkpointing, for the spec's task (see the module
    docstring). A wake token costs the card's ``flops_per_token``."""
    if spec.task is None or spec.sleep is None:
        raise SpecError("task", "a `task:` and a `sleep:` section to plan training")
    sleep, reading = spec.sleep, Reading.of(spec)
    n, loop = sleep.passes, sleep.loop_range(len(model.layers))
    flops = layer_flops_per_token(model, sleep.window)
    saved = activation_bytes_per_token(model, sleep.window)
    head = 2 * model.head.weight.numel()

    def split(per_layer: list[float]) -> tuple[float, float]:
        looping = sum(per_layer[i] for i in loop)
        return sum(per_layer) - looping, looping

    once, looping = split(flops)
    slept_token, awake_token = once + n * looping, once + looping + head
    forward = reading.slept * slept_token + reading.awake * awake_token
    graded_passes = {"full": n, "last_k": min(n, sleep.last_k), "none": 0}[sleep.backprop]
    keep = sleep.window - 1 if sleep.eviction == "sliding" else 0
    kept = [state_gradient(model, i, sleep.window, sleep.eviction, keep)
            for i in range(len(model.layers))]
    # last_k detaches each window's state before its last k passes, so gradient stops at
    # the last window slept on
    graded_slept = min(sleep.window, reading.slept) if 0 < graded_passes < n else reading.slept
    backward = (graded_slept * slept_backward_flops(flops, kept, loop, n, graded_passes)
                + 2 * reading.awake * awake_token)
    recompute = graded_slept * graded_passes * looping if sleep.checkpoint else 0

    saved_once, saved_loop = split(saved)
    logits = reading.awake * model.head.weight.shape[0] * DTYPES[model.spec.dtype].itemsize
    awake_bytes = reading.awake * (saved_once + saved_loop) + logits
    full = reading.slept * (saved_once + graded_passes * saved_loop) + awake_bytes
    pass_input = (model.spec.d_model * DTYPES[model.spec.dtype].itemsize
                  + sum(state_bytes(model.layers[i].mixer.init_state(1)) / sleep.window
                        for i in loop))
    checkpointed = (reading.slept * (saved_once + graded_passes * pass_input)
                    + min(sleep.window, reading.slept) * saved_loop + awake_bytes)
    return {
        "tokens_per_sequence": reading.tokens,
        "slept_tokens": reading.slept,
        "awake_tokens": reading.awake,
        "train_flops_per_token": (forward + backward + recompute) / reading.tokens,
        "activation_bytes_full": full,
        "activation_bytes_checkpointed": checkpointed if graded_passes else full,
    }


def wall_clock_hours(train_flops_per_token: float, tokens: float, device_tflops: float,
                     mfu: float) -> float:
    """Hours to train on ``tokens`` tokens on one device of ``device_tflops`` peak TFLOP/s
    used at model FLOP utilisation ``mfu``."""
    return train_flops_per_token * tokens / (device_tflops * 1e12 * mfu) / 3600

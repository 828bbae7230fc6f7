"""The model card: parameters, state sizes and cost of a built HybridModel; and what a
model would take before it is built (on the meta device: shapes, no memory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archkit.blocks.common import state_bytes
from archkit.errors import SpecError
from archkit.model import DTYPES, HybridModel
from archkit.spec import ModelSpec, SleepSpec

# Training holds the weights, their gradients and the optimiser's state: two moments for
# AdamW (Muon keeps one), so four copies of the parameters before any activation.
TRAINING_COPIES = 4


def layer_flops_per_token(model: HybridModel, window: int) -> list[int]:
    """Forward FLOPs per token of each layer at window L: 2 per multiply-add of its
    matrices plus its mixer's own work."""
    return [2 * sum(m.weight.numel() for m in layer.modules()
                    if isinstance(m, (nn.Linear, nn.Conv1d)))
            + layer.mixer.mixing_flops_per_token(window) for layer in model.layers]


def model_card(model: HybridModel, window: int, sleep: SleepSpec | None = None
               ) -> dict[str, Any]:
    """Everything ``archkit build`` reports, as plain JSON-ready values; numbers under
    their ``archkit.metrics`` names.

    ``window`` is the attention window L: the KV bound and the attention FLOPs assume a
    query sees at most L tokens. FLOPs per token count 2 per multiply-add of every
    parameter matmul (embedding lookup excluded) plus each mixer's own work.
    """
    layers = []
    for index, layer in enumerate(model.layers):
        mixer = layer.mixer
        fixed = state_bytes(mixer.init_state(1))
        layers.append({
            "index": index,
            "block": layer.block_name,
            "mlp": layer.mlp is not None,
            "params": sum(p.numel() for p in layer.parameters()),
            "fast_weight_bytes": fixed,
            "kv_bytes_per_token": mixer.kv_bytes_per_token(),
            "state_bytes_per_sequence": fixed + mixer.kv_bytes_per_token() * window,
            "mixing_flops_per_token": mixer.mixing_flops_per_token(window),
        })
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embedding = model.embedding.weight.numel()
    matmul_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))
    )
    kv_per_token = sum(layer["kv_bytes_per_token"] for layer in layers)
    fast_weight_bytes = sum(layer["fast_weight_bytes"] for layer in layers)
    sleep_card = None
    if sleep is not None:
        loop = sleep.loop_range(len(layers))
        per_layer = layer_flops_per_token(model, sleep.window)
        per_token = [per_layer[i] for i in loop]
        sleep_card = {
            "controller": sleep.controller,
            "options": sleep.controller_config.model_dump(),
            "window": sleep.window,
            "eviction": sleep.eviction,
            "loop_layers": list(loop),
            "sleep_flops_per_pass": sum(per_token) * sleep.window,
        }
    return {
        "params": params,
        "embedding_params": embedding,
        "layers": layers,
        "dtype": model.spec.dtype,
        "window": window,
        "fast_weight_bytes": fast_weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_window": kv_per_token * window,
        "state_bytes_per_sequence": fast_weight_bytes + kv_per_token * window,
        "flops_per_token": 2 * matmul_params
        + sum(layer["mixing_flops_per_token"] for layer in layers),
        "sleep": sleep_card,
    }


def meta_model(spec: ModelSpec) -> HybridModel:
    """``spec``'s model on the meta device: every shape and count, no memory."""
    with torch.device("meta"):
        return HybridModel(spec)


def parameter_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of the model holds, by name (a tied tensor
    once, under its first name, as safetensors saves it), without building the model."""
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, tensor in meta_model(spec).state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation may take: free CUDA memory, or the kernel's MemAvailable
    (the physical memory where /proc/meminfo is missing)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parameter_floor(spec: ModelSpec) -> tuple[int, int]:
    """A lower bound on the model's parameter count from the spec alone, without building
    anything: (embedding and head, the rest). The rest counts every layer's norms and
    SwiGLU MLP and the final norm, not the mixers, whose size only their block knows."""
    d = spec.d_model
    vocabulary = spec.vocab_size * d * (1 if spec.tie_embeddings else 2)
    hidden = spec.hidden_width
    mlp = d + 3 * d * hidden  # its norm, gate_up [2 * hidden, d] and down [d, hidden]
    layers = sum(d + (mlp if layer.mlp else 0) for layer in spec.resolved_layers)
    return vocabulary, layers + d


def require_memory(spec: ModelSpec, device: torch.device, training: bool) -> None:
    """Refuse a model whose parameters certainly do not fit in the memory available on
    ``device`` (:func:`parameter_floor`, times :data:`TRAINING_COPIES` to train it), before
    anything is allocated, naming the field that makes it big: ``model.vocab_size`` when
    the embedding and head dominate, else ``model.d_model``."""
    vocabulary, rest = parameter_floor(spec)
    params = vocabulary + rest
    copies = TRAINING_COPIES if training else 1
    needed = params * DTYPES[spec.dtype].itemsize * copies
    available = available_memory(device)
    if needed <= available:
        return
    field, value = (("model.vocab_size", spec.vocab_size) if vocabulary > rest
                    else ("model.d_model", spec.d_model))
    use = "to train (weights, gradients, optimiser state)" if training else "for the weights"
    raise SpecError(field, f"a model that fits in memory: its {params:,} parameters or more "
                    f"need at least {_gigabytes(needed)} {use}, and {device.type} has "
                    f"{_gigabytes(available)} available", value)


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"

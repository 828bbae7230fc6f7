"""The model card: parameters, state sizes and cost of a built HybridModel."""

from __future__ import annotations

from typing import Any

from torch import nn

from archkit.blocks.common import state_bytes
from archkit.model import HybridModel
from archkit.spec import SleepSpec


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
        per_token = [
            2 * sum(m.weight.numel() for m in model.layers[i].modules()
                    if isinstance(m, (nn.Linear, nn.Conv1d)))
            + layers[i]["mixing_flops_per_token"] for i in loop
        ]
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


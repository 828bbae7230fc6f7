"""The block library: one file per block, registered by name on import."""

from archkit.blocks import attention, gated_delta, hebbian, mamba2, mlp
from archkit.blocks.common import Block, FastWeightState, KVCache, map_state, state_bytes

__all__ = [
    "Block",
    "FastWeightState",
    "KVCache",
    "attention",
    "gated_delta",
    "hebbian",
    "mamba2",
    "map_state",
    "mlp",
    "state_bytes",
]

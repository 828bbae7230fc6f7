"""The block library: one file per block, registered by name on import.

``common`` holds the block contract and state types; ``fast_weight`` the body shared by
the fast-weight blocks (``gated_delta``, ``hebbian``, ``jet``, ``mamba2``).
"""

from archkit.blocks import attention, fast_weight, gated_delta, hebbian, jet, mamba2, mlp
from archkit.blocks.common import Block, FastWeightState, KVCache, map_state, state_bytes
from archkit.blocks.fast_weight import FastWeightBlock

__all__ = [
    "Block",
    "FastWeightBlock",
    "FastWeightState",
    "KVCache",
    "attention",
    "fast_weight",
    "gated_delta",
    "hebbian",
    "jet",
    "mamba2",
    "map_state",
    "mlp",
    "state_bytes",
]

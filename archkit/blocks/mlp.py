"""SwiGLU feed-forward: ``y = W_down (silu(W_gate x) * W_up x)``, hidden = ratio * d_model.

Used as the MLP half of every layer (unless the layer sets ``mlp: false``) and
registered as a block so a pattern may also hold MLP-only layers.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from archkit.blocks.common import Block, BlockConfig
from archkit.registry import register_block


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MLPConfig(BlockConfig):
    ratio: Annotated[float, Field(gt=0)] = Field(4.0, description="hidden = ratio * d_model")


@register_block("mlp", config=MLPConfig, description="SwiGLU feed-forward (stateless)")
class MLP(Block):
    def __init__(self, d_model: int, config: MLPConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.ffn = SwiGLU(d_model, max(1, round(config.ratio * d_model)))

    def forward(self, x: Tensor, state: Any) -> tuple[Tensor, None]:
        return self.ffn(x), None

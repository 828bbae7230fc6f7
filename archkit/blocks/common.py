"""The block contract and its state types, shared by every block and by the model.

A block maps a window of hidden states and a state to outputs and the next state
(``Block``); its state is a ``KVCache`` (attention), a ``FastWeightState`` (fast-weight
blocks, see ``fast_weight.py``) or ``None``. ``map_state``, ``select_state`` and
``state_bytes`` work on any of them; ``RMSNorm`` is the plain norm of the model and of attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

EvictionPolicy = Literal["hard", "sliding"]


class BlockConfig(BaseModel):
    """Base of every block config: unknown keys are errors.

    ``check(d_model)`` returns ``(field, expected)`` when the config cannot be built at
    that model width, else ``None``; the spec loader turns it into a SpecError.
    """

    model_config = ConfigDict(extra="forbid")

    def check(self, d_model: int) -> tuple[str, str] | None:
        return None


@dataclass
class KVCache:
    """Keys and values (after RoPE) of the tokens attention can still see."""

    k: Tensor  # [B, H_kv, T_cached, D]
    v: Tensor
    pos: int  # absolute position of the next token
    span: int | None = None  # most tokens a query may see, itself included (None: all)

    @property
    def tokens(self) -> int:
        return self.k.shape[2]


@dataclass
class FastWeightState:
    """State of a fast-weight block: the weights persist, the conv tail is local context."""

    weights: Tensor  # [B, H, K, V]
    conv_tail: Tensor  # [B, conv_size - 1, channels]: the last inputs seen


def map_state(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a block state (e.g. ``Tensor.detach``)."""
    if state is None:
        return None
    changes = {
        f.name: fn(value)
        for f in dataclasses.fields(state)
        if isinstance(value := getattr(state, f.name), Tensor)
    }
    return dataclasses.replace(state, **changes)


def select_state(take_new: Tensor, new: Any, old: Any) -> Any:
    """Per sequence, the tensors of block state ``new`` where ``take_new`` [B] is true and
    those of ``old`` (the same block, same shapes) elsewhere."""
    if new is None:
        return None

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(take_new.view(-1, *[1] * (a.dim() - 1)), a, b)

    changes = {
        f.name: pick(value, getattr(old, f.name))
        for f in dataclasses.fields(new)
        if isinstance(value := getattr(new, f.name), Tensor)
    }
    return dataclasses.replace(new, **changes)


def state_tensors(state: Any) -> list[Tensor]:
    """The tensors of a block state (none for ``None``)."""
    if state is None:
        return []
    return [v for f in dataclasses.fields(state)
            if isinstance(v := getattr(state, f.name), Tensor)]


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a block state."""
    return sum(v.numel() * v.element_size() for v in state_tensors(state))


class Block(nn.Module):
    """A sequence mixer: ``forward(x, state) -> (y, state)`` over a window of tokens.

    ``step`` decodes one token; by default it is ``forward`` on a length-1 window, which
    the ops dispatch to their single-step recurrence. ``evict`` drops local context and
    keeps whatever must persist; blocks know nothing about sleep.
    """

    def init_state(self, batch_size: int) -> Any:
        return None

    def step(self, x_t: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self(x_t[:, None], state)
        return y[:, 0], state

    def evict(self, state: Any, policy: EvictionPolicy, keep: int = 0) -> Any:
        return state

    def rewind(self, before: Any, after: Any) -> Any:
        """Local context as in ``before``, persistent memory as in ``after``.

        Running a window again from this state re-reads the window with what was
        learnt from it, as if the window had not been seen by the local context.
        """
        return after

    def output_projection(self) -> nn.Linear | None:
        """The linear map that writes the block's output (None: it has none). Zeroing it
        makes the block add nothing to the residual stream, which is how a new layer is
        inserted into a pretrained model without changing its function."""
        projection = getattr(self, "o_proj", None)
        return projection if isinstance(projection, nn.Linear) else None

    def kv_bytes_per_token(self) -> int:
        """Bytes of cache each token seen adds to the state (0 for fixed-size states)."""
        return 0

    def mixing_flops_per_token(self, context: int) -> int:
        """FLOPs per token beyond the parameter matmuls, for ``context`` visible tokens."""
        return 0

    def _param(self) -> Tensor:
        """A parameter to take dtype and device from for new state tensors: its local
        shard when the block is sharded (FSDP), since a state is per rank, not sharded."""
        param = next(self.parameters())
        return param.to_local() if isinstance(param, DTensor) else param


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

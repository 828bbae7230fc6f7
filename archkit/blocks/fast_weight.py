"""The fast-weight body shared by ``gated_delta``, ``hebbian``, ``mamba2`` and ``jet``.

Per head, fast weights S (K x V) persist across windows. A block projects x, passes the
projection through a short causal convolution, and forms q_t, k_t (K), v_t (V), a log
decay g_t <= 0 and a write strength beta_t; a registered local rule (``archkit.kernels``)
then reads and writes S. The rules share one signature, so another can be swapped in with
the same projections (e.g. while asleep)::

    u_t      = SiLU(ShortConv(W_in x)_t)                depthwise over the last W inputs
    g_t      = -exp(A_log) softplus(logit_t + dt_bias)  scalar decay per head (Mamba's dt)
    S_t, o_t = rule(S_{t-1}; q_t, k_t, v_t, g_t, beta_t)
               e.g. hebbian: S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T,  o_t = scale S_t^T q_t
    y_t      = W_out GatedRMSNorm(o_t, z_t),   GatedRMSNorm(o, z) = rmsnorm(o) * silu(z)

``QKVFastWeightBlock`` is the GDN-style body (q, k, v all from u, q and k unit-norm, scale
1/sqrt(K), z = W_g x); a subclass only picks g and beta.

State is ``FastWeightState(weights=S, conv_tail)``: S is persistent memory, kept by
eviction and taken from the latest pass by ``rewind``; the conv tail (the last W-1 inputs)
is local context, zeroed by hard eviction and restored from before the window by
``rewind``. Carrying the tail makes windowed reading equal one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from archkit.blocks.common import Block, BlockConfig, EvictionPolicy, FastWeightState, RMSNorm
from archkit.kernels import RULE_NEEDS
from archkit.registry import RULES


class FastWeightConfig(BlockConfig):
    """Fields shared by the blocks built on a fast-weight rule."""

    n_heads: Annotated[int, Field(gt=0, description="default: model.n_heads")]
    head_dim: Annotated[int, Field(gt=0)] | None = Field(
        None, description="key dim K per head (default: d_model // n_heads)"
    )
    conv_size: Annotated[int, Field(ge=1)] = Field(4, description="short conv width")
    rule: str = Field(description="registered local update rule")
    impl: Literal["auto", "reference", "chunk", "triton"] = "auto"

    def check(self, d_model: int) -> tuple[str, str] | None:
        if self.head_dim is None and d_model < self.n_heads:
            return "n_heads", f"at most d_model={d_model} (or set head_dim)"
        if self.rule not in RULES:
            return "rule", RULES.unknown_message(self.rule)
        problem = self.rule_problem(self.rule)
        return ("rule", problem) if problem else None

    def gives(self) -> frozenset[str]:
        """What this block feeds its rule (``archkit.kernels.RULE_NEEDS`` names)."""
        return frozenset()

    def rule_problem(self, rule: str) -> str | None:
        """Why ``rule`` cannot run on this block (None when it can)."""
        missing = RULE_NEEDS.get(rule, frozenset()) - self.gives()
        if not missing:
            return None
        return (f"a rule this block can feed: {rule!r} needs {', '.join(sorted(missing))}, "
                f"which it does not give")


class QKVConfig(FastWeightConfig):
    expand_v: Annotated[float, Field(gt=0)] = Field(1.0, description="V = K * expand_v")

    def gives(self) -> frozenset[str]:
        # q, k L2-normalised, beta = sigmoid (QKVFastWeightBlock), one decay per head
        return frozenset({"unit_keys", "write_at_most_one", "scalar_decay"})


class FastWeightBlock(Block):
    """State handling of fast-weight blocks: the weights persist, the conv tail is local.

    ``rule`` names the registered local update rule; it is a plain attribute so another
    rule can be swapped in with the same projections (e.g. while asleep).
    ``conv`` is the block's short convolution (a ``ShortConv``, or ``jet``'s dynamic one):
    its ``initial_tail(batch_size, like)`` is the local context of a fresh state.
    """

    def __init__(self, n_heads: int, key_dim: int, value_dim: int, conv: nn.Module,
                 config: FastWeightConfig, scalar_decay: bool = True) -> None:
        super().__init__()
        self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
        self.rule, self.impl = config.rule, config.impl
        self.conv = conv
        if not scalar_decay:
            return
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1, 16)))
        dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def init_state(self, batch_size: int) -> FastWeightState:
        p = self._param()
        weights = p.new_zeros(batch_size, self.n_heads, self.key_dim, self.value_dim)
        return FastWeightState(weights, self.conv.initial_tail(batch_size, p))

    def evict(self, state: FastWeightState, policy: EvictionPolicy, keep: int = 0
              ) -> FastWeightState:
        if policy == "sliding":
            return state
        return FastWeightState(state.weights, torch.zeros_like(state.conv_tail))

    def rewind(self, before: FastWeightState, after: FastWeightState) -> FastWeightState:
        return FastWeightState(after.weights, before.conv_tail)

    def time_step(self, logit: Tensor) -> Tensor:
        """Mamba's discretisation step dt = softplus(logit + dt_bias) > 0, per head."""
        return F.softplus(logit + self.dt_bias)

    def apply_rule(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None,
                   state: FastWeightState, scale: float) -> tuple[Tensor, Tensor]:
        rule = RULES.get(self.rule).obj
        return rule(q, k, v, g, beta, scale=scale, initial_state=state.weights,
                    output_final_state=True, impl=self.impl)

    def mixing_flops_per_token(self, context: int) -> int:
        return 6 * self.n_heads * self.key_dim * self.value_dim


class QKVFastWeightBlock(FastWeightBlock):
    """The GDN-style body: conv'd q, k, v with unit-norm q, k; gated RMSNorm output.

    Subclasses choose the decay ``g`` and write strength ``beta`` from ``gate_logits``,
    a projection of x with ``gate_width`` channels; ``make_conv`` and ``convolve`` are the
    short-convolution stage (by default a ``ShortConv`` over q, k and v together).
    """

    def __init__(self, d_model: int, config: QKVConfig, gate_width: int,
                 norm_eps: float, scalar_decay: bool = True) -> None:
        h = config.n_heads
        key_dim = config.head_dim or d_model // h
        value_dim = max(1, round(key_dim * config.expand_v))
        self.widths = [h * key_dim, h * key_dim, h * value_dim]
        conv = self.make_conv(d_model, config)
        super().__init__(h, key_dim, value_dim, conv, config, scalar_decay)
        self.qkv_proj = nn.Linear(d_model, sum(self.widths), bias=False)
        self.gate_logits = nn.Linear(d_model, gate_width, bias=False)
        self.gate_proj = nn.Linear(d_model, self.widths[2], bias=False)
        self.out_norm = GatedRMSNorm(value_dim, norm_eps)
        self.o_proj = nn.Linear(self.widths[2], d_model, bias=False)

    def decay_and_beta(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def make_conv(self, d_model: int, config: QKVConfig) -> nn.Module:
        """The short convolution, built before the module's other parts (``self.widths``
        is set; nothing else is)."""
        return ShortConv(sum(self.widths), config.conv_size)

    def convolve(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (before the norm) and the next conv tail for inputs ``x``."""
        qkv, tail = self.conv(self.qkv_proj(x), tail)
        return (*qkv.split(self.widths, dim=-1), tail)

    def forward(self, x: Tensor, state: FastWeightState) -> tuple[Tensor, FastWeightState]:
        batch, length, _ = x.shape
        heads = (batch, length, self.n_heads, -1)
        *qkv, tail = self.convolve(x, state.conv_tail)
        q, k, v = (part.view(heads) for part in qkv)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g, beta = self.decay_and_beta(self.gate_logits(x))
        o, weights = self.apply_rule(q, k, v, g, beta, state, self.key_dim**-0.5)
        o = self.out_norm(o, self.gate_proj(x).view(heads))
        return self.o_proj(o.reshape(batch, length, -1)), FastWeightState(weights, tail)


class GatedRMSNorm(RMSNorm):
    """``rmsnorm(x) * silu(gate)``: the output norm of GDN and Mamba2, per head."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x) * F.silu(gate)


class ShortConv(nn.Module):
    """Causal depthwise convolution of width W with SiLU, carrying its last W-1 inputs.

    Carrying the tail makes a sequence split into windows give exactly the one-call
    result; a zero tail is the usual causal zero padding.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, bias=False)

    def initial_tail(self, batch_size: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch_size, self.width - 1, self.conv.in_channels)

    def identity_(self) -> None:
        """The newest input passes through, nothing older (a retrofit's start)."""
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[..., -1] = 1.0

    def forward(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        padded = torch.cat([tail, x], dim=1)
        # Conv1d correlates: filter tap w meets the input at lag width - 1 - w
        per_lag = self.conv.weight[:, 0].flip(-1).unbind(-1)
        y = lagged_sum(padded, per_lag, x.shape[1])
        return F.silu(y), padded[:, padded.shape[1] - (self.width - 1) :]


def lagged_sum(padded: Tensor, per_lag: Sequence[Tensor], length: int) -> Tensor:
    """``y_t = sum_j per_lag[j] * x_{t-j}`` over lags j < W, for the ``length`` inputs that
    end ``padded`` [B, W-1 + length, ...] (the W-1 before them are the carried tail).

    A sum of shifted views, not ``nn.Conv1d``: a depthwise convolution's backward on CPU
    runs one small convolution per channel (hundreds of tiny ops per call), and unfold +
    contraction would materialise W copies of the input for backward."""
    last = len(per_lag) - 1  # x_t sits at padded[:, last + t]
    y = padded[:, last:] * per_lag[0]
    for lag in range(1, len(per_lag)):
        y = torch.addcmul(y, padded[:, last - lag:last - lag + length], per_lag[lag])
    return y

"""``torch.compile`` with a clean fallback to eager mode.

Compilation is an optimisation, never a requirement: where ``torch.compile`` is missing or
its backend fails (no C++ compiler, an unsupported Python or platform, a graph inductor
cannot lower), the function runs eagerly, with one warning saying why, and the results
are the same up to floating-point reduction order. Errors raised by the function itself
(a bad shape, a wrong argument) are not swallowed: they surface as they would eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc


class CompiledOrEager:
    """Calls ``torch.compile(fn, dynamic=dynamic)``, or ``fn`` itself once compiling failed.

    ``dynamic=None`` is torch's default: a size seen to change is recompiled once as
    symbolic, so windows of different lengths share one graph after the second."""

    def __init__(self, fn: Callable[..., Any], name: str, dynamic: bool | None = None,
                 backend: str | Callable[..., Any] = "inductor") -> None:
        self.eager, self.name = fn, name
        self.compiled: Callable[..., Any] | None
        try:
            self.compiled = torch.compile(fn, dynamic=dynamic, backend=backend)
        except RuntimeError as error:  # e.g. torch.compile unsupported on this Python
            self._give_up(error)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except (torch._dynamo.exc.BackendCompilerFailed,
                    torch._dynamo.exc.InternalTorchDynamoError) as error:
                self._give_up(error)
        return self.eager(*args)

    def _give_up(self, error: BaseException) -> None:
        self.compiled = None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"archkit: torch.compile of {self.name} failed, running it eagerly "
                      f"({type(error).__name__}: {first_line})", RuntimeWarning, stacklevel=3)

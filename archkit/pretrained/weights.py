"""Pretrained tensors into a built ``HybridModel``, following the retrofit plan.

1. Read the checkpoint's tensors under Llama's Hugging Face names
   (``model.layers.3.self_attn.q_proj.weight``): safetensors as stored, GGUF dequantised to
   float32, with llama.cpp's interleaved q/k row order undone (its converter permutes the
   rows of q and k so each RoPE pair is adjacent; archkit, like transformers, rotates the
   halves (i, i + D/2)).
2. Map them onto archkit's modules: a pretrained layer's norms, attention and MLP onto
   its ``HybridLayer`` (k and v stacked into ``kv_proj``, gate and up into ``gate_up``).
3. Retrofit: an inserted layer's output projections are zeroed, so it adds nothing to the
   residual stream at step 0; a replaced attention's q, k, v, o initialise the fast-weight
   block (k and v repeated over the query heads of their group), its short convolution
   starts as the identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from archkit.model import HybridModel
from archkit.pretrained.retrofit import PlannedLayer, plan_layers
from archkit.pretrained.source import LlamaShape, PretrainedError, gguf_reader, read_shape
from archkit.spec import ModelSpec

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_tensors(shape: LlamaShape) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, float32 for GGUF, under Hugging Face Llama names."""
    if shape.format == "hf":
        return _read_safetensors(shape.file)
    return dict(_read_gguf(shape))


def _read_safetensors(directory: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PretrainedError(f"{directory}: no .safetensors weights")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _read_gguf(shape: LlamaShape) -> Iterator[tuple[str, Tensor]]:
    from gguf import dequantize

    for tensor in gguf_reader(shape.file).tensors:
        stem, _, kind = tensor.name.rpartition(".")
        index, part = stem.split(".", 2)[1:] if stem.startswith("blk.") else (None, stem)
        if part not in GGUF_NAMES:
            raise PretrainedError(f"{shape.file}: tensor {tensor.name!r} is not part of a "
                                  "Llama model archkit can load")
        hf_name = f"{GGUF_NAMES[part]}.{kind}"
        name = hf_name if index is None else f"model.layers.{index}.{hf_name}"
        # GGUF lists dimensions fastest first; numpy wants them slowest first
        rows = dequantize(tensor.data, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)])
        weight = torch.from_numpy(np.array(rows, dtype=np.float32))  # a writable copy
        if part in ("attn_q", "attn_k"):
            heads = shape.n_heads if part == "attn_q" else shape.n_kv_heads
            weight = unpermute_rope_rows(weight, heads)
        yield name, weight


def unpermute_rope_rows(weight: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, D/2, 1, D/2 + 1, ...) back to
    (0, 1, ..., D - 1)."""
    out_features = weight.shape[0]
    return (weight.reshape(heads, out_features // heads // 2, 2, -1).transpose(1, 2)
            .reshape(weight.shape))


def permute_rope_rows(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's q/k row order (the inverse of :func:`unpermute_rope_rows`)."""
    out_features = weight.shape[0]
    return (weight.reshape(heads, 2, out_features // heads // 2, -1).transpose(1, 2)
            .reshape(weight.shape))


def load_pretrained(model: HybridModel, spec: ModelSpec) -> None:
    """Copy the checkpoint ``spec.pretrained`` names into ``model`` and initialise its
    retrofit edits (see the module docstring)."""
    assert spec.pretrained is not None
    shape = read_shape(spec.pretrained.locate())
    tensors = read_tensors(shape)
    plan = plan_layers(spec.pretrained, shape.n_layers)
    with torch.no_grad():
        _copy(model.embedding.weight, tensors, "model.embed_tokens.weight")
        _copy(model.norm.weight, tensors, "model.norm.weight")
        if not spec.tie_embeddings:
            _copy(model.head.weight, tensors, "lm_head.weight")
        for layer, planned in zip(model.layers, plan, strict=True):
            _load_layer(layer, planned, tensors, shape)


def pretrained_parameters(model: HybridModel, spec: ModelSpec) -> set[str]:
    """Names of ``model``'s parameters that :func:`load_pretrained` fills from the
    checkpoint: embedding, head, final norm and every pretrained layer but a replaced
    mixer."""
    assert spec.pretrained is not None
    # from the spec alone, so a run resumes where the checkpoint file is gone
    pretrained_layers = len(spec.resolved_layers) - len(spec.pretrained.insert)
    names = {"embedding.weight", "norm.weight", "head.weight"}
    for i, planned in enumerate(plan_layers(spec.pretrained, pretrained_layers)):
        if planned.origin is None:
            continue
        layer = model.layers[i]
        parts = [("mixer_norm", layer.mixer_norm), ("mlp_norm", layer.mlp_norm),
                 ("mlp", layer.mlp)]
        if planned.attention_pretrained:
            parts.append(("mixer", layer.mixer))
        names |= {f"layers.{i}.{part}.{name}" for part, module in parts
                  for name, _ in module.named_parameters()}
    return names


def _load_layer(layer: nn.Module, planned: PlannedLayer, tensors: dict[str, Tensor],
                shape: LlamaShape) -> None:
    if planned.origin is None:
        _zero_output(layer)
        return
    prefix = f"model.layers.{planned.origin}."

    def take(name: str) -> Tensor:
        return _tensor(tensors, prefix + name)

    _copy(layer.mixer_norm.weight, tensors, prefix + "input_layernorm.weight")
    _copy(layer.mlp_norm.weight, tensors, prefix + "post_attention_layernorm.weight")
    _assign(layer.mlp.gate_up.weight,
            torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")]),
            prefix + "mlp.gate_proj/up_proj")
    _copy(layer.mlp.down.weight, tensors, prefix + "mlp.down_proj.weight")
    q, k, v, o = (take(f"self_attn.{p}_proj.weight") for p in "qkvo")
    if planned.attention_pretrained:
        _assign(layer.mixer.q_proj.weight, q, prefix + "self_attn.q_proj")
        _assign(layer.mixer.kv_proj.weight, torch.cat([k, v]), prefix + "self_attn.k_proj/v_proj")
        _assign(layer.mixer.o_proj.weight, o, prefix + "self_attn.o_proj")
        return
    _from_attention(layer.mixer, q, k, v, o, shape, planned.entry["block"])


def _from_attention(mixer: nn.Module, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                    shape: LlamaShape, block: str) -> None:
    """A fast-weight block's q, k, v and output projections from an attention layer's."""
    projection = getattr(mixer, "qkv_proj", None)
    if projection is None or getattr(mixer, "key_dim", None) != shape.head_dim or \
            mixer.n_heads != shape.n_heads or mixer.value_dim != shape.head_dim:
        raise PretrainedError(
            f"replacing attention by {block!r}: a block with a qkv_proj of {shape.n_heads} "
            f"heads of key and value width {shape.head_dim} (expand_v 1), as the attention "
            "it starts from")
    group = shape.n_heads // shape.n_kv_heads

    def per_query_head(w: Tensor) -> Tensor:
        return w.reshape(shape.n_kv_heads, shape.head_dim, -1).repeat_interleave(
            group, dim=0).reshape(-1, w.shape[-1])

    _assign(projection.weight, torch.cat([q, per_query_head(k), per_query_head(v)]),
            f"{block} qkv_proj from attention")
    _assign(mixer.o_proj.weight, o, f"{block} o_proj from attention")
    mixer.conv.identity_()


def _zero_output(layer: nn.Module) -> None:
    projection = layer.mixer.output_projection()
    if projection is None:
        raise PretrainedError(f"inserting a {layer.block_name!r} layer: its block has no "
                              "output projection to start at zero")
    projection.weight.zero_()
    if layer.mlp is not None:
        layer.mlp.down.weight.zero_()


def _tensor(tensors: dict[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise PretrainedError(f"the checkpoint has no tensor {name!r}")
    return tensors[name]


def _copy(target: Tensor, tensors: dict[str, Tensor], name: str) -> None:
    """The checkpoint's tensor ``name`` into ``target``."""
    _assign(target, _tensor(tensors, name), name)


def _assign(target: Tensor, value: Tensor, what: str) -> None:
    if value.shape != target.shape:
        raise PretrainedError(f"{what}: shape {tuple(value.shape)} in the checkpoint, "
                              f"{tuple(target.shape)} in the model")
    target.copy_(value.to(target.dtype))

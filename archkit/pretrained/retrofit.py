"""The ``model.pretrained`` section and the layer list its retrofit edits produce.

A pretrained Llama of n layers is n ``attention`` layers with SwiGLU MLPs. Two edits turn
it into a hybrid that can sleep, both written in the pretrained model's layer numbers:

- ``insert``: a new layer (any registered block, with or without an MLP) before or after
  pretrained layer i. Its output projections start at zero, so at step 0 the model computes
  exactly what the pretrained one did.
- ``replace``: pretrained layer i's attention becomes a fast-weight block whose q, k, v and
  output projections start as the attention's (its MLP and norms are kept).

:func:`plan_layers` gives, for every layer of the result, where its weights come from;
the spec turns it into ``model.layers`` and the loader into a weight map. Every other
index in a spec (``sleep.layers``, ``train.freeze.layers``) counts the layers of the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from archkit.errors import SpecError
from archkit.pretrained.source import CheckpointSource

Index = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InsertLayer(_Strict):
    """A new layer before or after pretrained layer i, function-preserving at step 0."""

    before: Index | None = None
    after: Index | None = None
    block: str = Field(description="registered block, e.g. jet or gated_delta")
    mlp: bool = Field(False, description="whether the new layer has its own SwiGLU MLP")
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_place(self) -> InsertLayer:
        if (self.before is None) == (self.after is None):
            raise ValueError("give exactly one of `before` and `after`")
        return self

    @property
    def slot(self) -> int:
        """Insert before pretrained layer ``slot`` (n means at the end)."""
        return self.before if self.before is not None else self.after + 1  # type: ignore[operator]


class ReplaceMixer(_Strict):
    """Pretrained layer i's attention replaced by a fast-weight block built from its q, k,
    v and output projections."""

    layer: Index
    block: str = Field(description="registered block with q/k/v projections, e.g. gated_delta")
    config: dict[str, Any] = Field(default_factory=dict)


class PretrainedSpec(CheckpointSource):
    """Start from a pretrained Llama-family checkpoint (``path`` or ``package``), then
    apply the retrofit edits."""

    insert: list[InsertLayer] = Field(default_factory=list)
    replace: list[ReplaceMixer] = Field(default_factory=list)


@dataclass(frozen=True)
class PlannedLayer:
    """A layer of the retrofitted model and where its weights come from."""

    origin: int | None  # the pretrained layer whose weights it takes; None: inserted
    entry: dict[str, Any]  # its model.layers entry
    replaced: bool = False  # its mixer is a fast-weight block built from origin's attention

    @property
    def attention_pretrained(self) -> bool:
        return self.origin is not None and not self.replaced


def plan_layers(pretrained: PretrainedSpec, n: int, heads: dict[str, Any] | None = None
                ) -> list[PlannedLayer]:
    """The layers of an ``n``-layer checkpoint after the edits, in order (see the module
    docstring); ``heads`` are the config defaults a block replacing attention takes (the
    attention's ``n_heads`` and ``head_dim``)."""
    for k, edit in enumerate(pretrained.insert):
        if edit.slot > n or (edit.before is not None and edit.before >= n):
            where = "before" if edit.before is not None else "after"
            raise SpecError(f"model.pretrained.insert[{k}].{where}",
                            f"a pretrained layer index within 0..{n - 1}",
                            getattr(edit, where))
    replaced: dict[int, ReplaceMixer] = {}
    for k, edit in enumerate(pretrained.replace):
        if edit.layer >= n or edit.layer in replaced:
            raise SpecError(f"model.pretrained.replace[{k}].layer",
                            f"a pretrained layer index within 0..{n - 1}, each replaced once",
                            edit.layer)
        replaced[edit.layer] = edit

    def inserted(slot: int) -> list[PlannedLayer]:
        return [PlannedLayer(None, {"block": e.block, "mlp": e.mlp, "config": e.config})
                for e in pretrained.insert if e.slot == slot]

    layers: list[PlannedLayer] = []
    for i in range(n):
        layers += inserted(i)
        if i in replaced:
            edit = replaced[i]
            entry = {"block": edit.block, "mlp": True, "config": {**(heads or {}),
                                                                   **edit.config}}
            layers.append(PlannedLayer(i, entry, replaced=True))
        else:
            layers.append(PlannedLayer(i, {"block": "attention", "mlp": True, "config": {}}))
    return layers + inserted(n)

"""The YAML schema of archkit: pydantic models, ``parse_spec`` and ``load_spec``.

A spec file is a mapping validated by :class:`Spec`. Every model forbids unknown keys.
Reading files (``extends`` chains, merging, dotted keys) is ``archkit.spec_files``'.
Errors of any kind surface as one :class:`SpecError` naming the file, the field path, the
offending value and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from archkit.errors import SpecError
from archkit.metrics import UnknownMetric, lookup
from archkit.pretrained.retrofit import PretrainedSpec, plan_layers
from archkit.pretrained.source import PretrainedError, read_shape
from archkit.registry import BLOCKS, RULES, SLEEP_CONTROLLERS, TASKS, Registry, RegistryError
from archkit.spec_files import apply_dotted, load_yaml_tree

if TYPE_CHECKING:  # for annotations only: tasks sit above the spec in the data flow
    from archkit.tasks import Task

__all__ = ["FreezeSpec", "ModelSpec", "SleepSpec", "Spec", "SpecError", "TaskSpec", "TrainSpec",
           "load_spec", "parse_spec"]

PositiveInt = Annotated[int, Field(gt=0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LayerEntry(StrictModel):
    """One layer: a registered block, its config overrides, and whether it has an MLP."""

    block: str
    mlp: bool = True
    config: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """A resolved layer: block name, validated block config, MLP flag."""

    block: str
    config: BaseModel
    mlp: bool


class ModelSpec(StrictModel):
    pretrained: PretrainedSpec | None = Field(
        None, description="start from a pretrained Llama-family checkpoint (fills the fields "
                          "it fixes) and apply retrofit edits (archkit/pretrained/)")
    vocab_size: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt = Field(4, description="default head count for every block")
    pattern: str | None = Field(None, description="layer letters, e.g. AGAG")
    legend: dict[str, str | LayerEntry] = Field(default_factory=dict)
    layers: list[str | LayerEntry] | None = Field(None, description="explicit layer list")
    blocks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="config per block type, shared by its layers"
    )
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    mlp_hidden: PositiveInt | None = Field(
        None, description="SwiGLU hidden width (default: round(mlp_ratio * d_model))")
    norm_eps: Annotated[float, Field(gt=0)] = 1e-5
    tie_embeddings: bool = True
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    _layers: list[LayerSpec] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_pretrained(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pretrained") is not None:
            return _pretrained_fields(data)
        return data

    def model_post_init(self, _context: Any) -> None:
        self._layers = _resolve_layers(self)

    @property
    def hidden_width(self) -> int:
        """The SwiGLU hidden width of every layer's MLP."""
        return self.mlp_hidden or max(1, round(self.mlp_ratio * self.d_model))

    @property
    def resolved_layers(self) -> list[LayerSpec]:
        """The layer list that both notations (pattern + legend, or layers) validate to."""
        return self._layers


class SleepSpec(StrictModel):
    """How the model sleeps: windows, eviction, which layers loop, and the controller.

    The controller's own options (e.g. ``tol`` for ``adaptive``) sit beside these keys
    and are validated by the controller's registered config model.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    controller: str = Field("fixed", description="registered sleep controller")
    window: PositiveInt = Field(description="L: tokens per window before eviction")
    passes: PositiveInt = Field(1, description="N: passes per window (the controller may vary it)")
    eviction: Literal["hard", "sliding"] = "hard"
    split: Literal["sequence", "context"] = Field(
        "sequence", description="sequence: windows of L over the whole sequence, the one "
                                "holding the first prediction token read awake (the paper); "
                                "context: every context token slept on")
    layers: Literal["all"] | tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = (
        Field("all", description="layers that loop while asleep: all, or [first, last]")
    )
    rule: str = Field("same", description="local update rule of fast-weight blocks asleep")
    backprop: Literal["full", "last_k", "none"] = "full"
    last_k: PositiveInt = Field(1, description="passes that get gradient with last_k")
    checkpoint: bool = Field(False, description="recompute each pass in the backward pass")
    pass_norm: Literal["none", "rms"] = Field(
        "none", description="rms: each pass after the first starts from hidden states "
                            "rescaled to the per-token RMS they had when the first began")
    _controller: BaseModel | None = PrivateAttr(None)

    def model_post_init(self, _context: Any) -> None:
        self._controller = _plugin_config(self, SLEEP_CONTROLLERS, "sleep", "controller")
        if self.rule != "same" and self.rule not in RULES:
            raise SpecError("sleep.rule", RULES.unknown_message(self.rule), self.rule)
        if self.layers != "all" and self.layers[0] > self.layers[1]:
            raise SpecError("sleep.layers", "[first, last] with first <= last", self.layers)

    @property
    def controller_config(self) -> BaseModel:
        assert self._controller is not None
        return self._controller

    def awake_from(self, context_len: int) -> int:
        """Where reading awake starts: tokens before it are slept on and evicted.

        ``sequence`` cuts the whole sequence into windows of L and sleeps on the windows
        that lie wholly inside the context, so the window that holds the first prediction
        token is read in one ordinary pass with the context tokens it shares; ``context``
        sleeps on every context token. The two agree when L divides ``context_len``."""
        if self.split == "context":
            return context_len
        return context_len - context_len % self.window

    def loop_range(self, n_layers: int) -> range:
        return range(n_layers) if self.layers == "all" else range(self.layers[0],
                                                                  self.layers[1] + 1)


class TaskSpec(StrictModel):
    """A registered task by ``name``; every other key is validated by the task's config
    model (``preset: paper | cpu`` fills the keys left out)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(description="registered task")
    _config: BaseModel | None = PrivateAttr(None)

    def model_post_init(self, _context: Any) -> None:
        self._config = _plugin_config(self, TASKS, "task", "name")

    @property
    def config(self) -> BaseModel:
        assert self._config is not None
        return self._config

    def build(self) -> Task:
        """The configured task (through the task registry)."""
        return TASKS.get(self.name).obj(self.config)


def _plugin_config(section: BaseModel, registry: Registry, prefix: str, key: str
                   ) -> BaseModel:
    """Validate the extra keys of ``section`` with the config model of the registry entry
    it names in ``key`` (a sleep controller, a task)."""
    name = getattr(section, key)
    try:
        entry = registry.get(name)
    except RegistryError as err:
        raise SpecError(f"{prefix}.{key}", str(err), name) from None
    try:
        return entry.config.model_validate(section.model_extra or {})
    except ValidationError as err:
        problem = from_validation_error(err, entry.config, prefix)
        if problem.expected.startswith("unknown key"):
            allowed = sorted({*type(section).model_fields, *entry.config.model_fields})
            problem = SpecError(problem.path, f"unknown key for {registry.kind} {name!r}; "
                                f"allowed: {', '.join(allowed)}")
        raise problem from None


class CurriculumStage(StrictModel):
    """``steps`` training steps on the task with ``task`` overriding its settings."""

    steps: PositiveInt
    task: dict[str, Any] = Field(description="task settings for these steps, over `task:`")


class StopRule(StrictModel):
    """Stop once ``metric`` (an evaluation metric) has not beaten its best value before the
    last ``plateau_evals`` evaluations by more than ``min_delta`` in any of them;
    ``train.steps`` stays the cap. A run that stops so has left "did not learn" apart from
    "stopped early": it had ``plateau_evals`` evaluations to improve."""

    metric: str = "exact"
    plateau_evals: PositiveInt = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _evaluation_metric(self) -> StopRule:
        try:
            metric = lookup(self.metric)
        except UnknownMetric as err:
            raise SpecError("train.until.metric", str(err), self.metric) from None
        if "evaluation" not in metric.sources or metric.direction not in ("maximize",
                                                                          "minimize"):
            raise SpecError("train.until.metric", "a metric the evaluation records that is "
                            "maximised or minimised, e.g. exact or loss", self.metric)
        return self

    def improved(self, history: list[float]) -> bool:
        """Whether the last ``plateau_evals`` values of ``history`` (one per evaluation,
        oldest first) beat the best before them; True until there are enough values."""
        if len(history) <= self.plateau_evals:
            return True
        before, recent = history[:-self.plateau_evals], history[-self.plateau_evals:]
        if lookup(self.metric).direction == "maximize":
            return max(recent) - max(before) > self.min_delta
        return min(before) - min(recent) > self.min_delta


class FreezeSpec(StrictModel):
    """Parameter groups that keep their initial values (no gradient, no optimiser)."""

    embeddings: bool = Field(False, description="the token embedding and the head")
    layers: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="every parameter of these layers (model numbering)")
    pretrained: bool = Field(False, description="every weight loaded from model.pretrained "
                                                "(not inserted layers or replaced mixers)")


class TrainSpec(StrictModel):
    """Optimisation and evaluation of one training run (``archkit train``)."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    optimizer: Literal["muon", "adamw"] = Field(
        "muon", description="muon: Muon for hidden matrices, AdamW for the rest")
    lr: Annotated[float, Field(gt=0)] = Field(2e-3, description="Muon (or AdamW-only) lr")
    adamw_lr: Annotated[float, Field(gt=0)] = Field(
        2e-3, description="AdamW lr for embeddings, head, norms, gates, biases")
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    eval_every: PositiveInt = 200
    eval_size: PositiveInt = 512
    eval_seed: int | None = Field(
        None, description="seed of the evaluation set (default: the run's seed); fixed, "
                          "it is one test set for every run, e.g. GSM's 1,600 problems")
    baseline_examples: Annotated[int, Field(ge=1)] = Field(
        4096, description="training examples the chance baseline learns its constant "
                          "answers from (archkit/tasks/baseline.py)")
    target_exact: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="stop early once the evaluation's `exact` reaches this")
    until: StopRule | None = Field(
        None, description="stop once an evaluation metric stops improving (a plateau); "
                          "train.steps caps the run")
    checkpoint_every: PositiveInt = 200
    log_every: PositiveInt = 10
    threads: PositiveInt | None = Field(None, description="torch CPU threads (default: all)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the model on every rank, fsdp "
                           "shards parameters, gradients and optimiser states per layer")
    compile: bool = Field(
        False, description="torch.compile the window passes and the wake step (eager where "
                           "compiling fails); costs a warm-up of tens of seconds per process")
    curriculum: list[CurriculumStage] = Field(
        default_factory=list, description="stages trained in order before the task itself")
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)

    def model_post_init(self, _context: Any) -> None:
        staged = sum(stage.steps for stage in self.curriculum)
        if staged > self.steps:
            raise SpecError("train.curriculum", f"stages of at most train.steps={self.steps} "
                            "steps in all", staged)


class Spec(StrictModel):
    name: str
    seed: int = 0
    model: ModelSpec
    sleep: SleepSpec | None = None
    task: TaskSpec | None = None
    train: TrainSpec | None = None
    _curriculum: list[TaskSpec] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _model_tokenizer(cls, data: Any) -> Any:
        """``task.tokenizer: model`` names the checkpoint ``model.pretrained`` loads."""
        task = data.get("task") if isinstance(data, dict) else None
        if not isinstance(task, dict) or task.get("tokenizer") != "model":
            return data
        pretrained = (data.get("model") or {}).get("pretrained")
        if not isinstance(pretrained, dict):
            raise SpecError("task.tokenizer", "a model.pretrained section (`model` means its "
                            "checkpoint's tokenizer)", "model")
        source = {key: pretrained[key] for key in ("path", "package") if key in pretrained}
        return {**data, "task": {**task, "tokenizer": source}}

    def model_post_init(self, _context: Any) -> None:
        if self.task is not None:
            vocab = self.task.build().vocab_size
            if self.model.vocab_size < vocab:
                raise SpecError("model.vocab_size", f"at least the vocabulary of task "
                                f"{self.task.name!r} ({vocab} tokens)", self.model.vocab_size)
        self._curriculum = self._stage_tasks()
        n_layers = len(self.model.resolved_layers)
        if self.sleep is not None and self.sleep.layers != "all" and \
                self.sleep.layers[1] >= n_layers:
            raise SpecError("sleep.layers", f"layer indices within 0..{n_layers - 1}",
                            list(self.sleep.layers))
        if self.sleep is not None and self.sleep.rule != "same":
            self._check_sleep_rule(self.sleep.rule)
        if self.train is not None:
            self._check_freeze(self.train.freeze, n_layers)

    def _check_freeze(self, freeze: FreezeSpec, n_layers: int) -> None:
        for k, index in enumerate(freeze.layers):
            if index >= n_layers:
                raise SpecError(f"train.freeze.layers[{k}]",
                                f"a layer index within 0..{n_layers - 1}", index)
        if freeze.pretrained and self.model.pretrained is None:
            raise SpecError("train.freeze.pretrained", "a model.pretrained section to freeze "
                            "the weights of", True)

    def _check_sleep_rule(self, rule: str) -> None:
        """Every fast-weight block takes the sleep rule while asleep: each must feed it."""
        for index, layer in enumerate(self.model.resolved_layers):
            rule_problem = getattr(layer.config, "rule_problem", None)
            problem = rule_problem(rule) if rule_problem is not None else None
            if problem:
                raise SpecError("sleep.rule", f"{problem} (layer {index}, {layer.block})", rule)

    @property
    def curriculum_tasks(self) -> list[TaskSpec]:
        """The task of each ``train.curriculum`` stage: ``task:`` with the stage's settings."""
        return self._curriculum

    def _stage_tasks(self) -> list[TaskSpec]:
        if self.train is None or not self.train.curriculum:
            return []
        if self.task is None:
            raise SpecError("train.curriculum", "a `task:` section for the stages to adjust")
        full = self.task.build()
        tasks = []
        for i, stage in enumerate(self.train.curriculum):
            where = f"train.curriculum[{i}].task"
            if "name" in stage.task:
                raise SpecError(f"{where}.name", "no task name: a stage changes the settings "
                                "of `task:`, not which task it is", stage.task["name"])
            try:
                section = TaskSpec(name=self.task.name, **{**(self.task.model_extra or {}),
                                                           **stage.task})
            except SpecError as err:
                raise SpecError(where + err.path.removeprefix("task"), err.expected,
                                err.value) from None
            staged = section.build()
            clash = full.vocabulary_clash(staged)
            if clash is not None:
                raise SpecError(where, f"settings under which every token keeps its id in the "
                                f"task's vocabulary ({clash})", stage.task)
            if staged.vocab_size > self.model.vocab_size:
                raise SpecError("model.vocab_size", f"at least the vocabulary of curriculum "
                                f"stage {i} ({staged.vocab_size} tokens)", self.model.vocab_size)
            tasks.append(section)
        return tasks


def _pretrained_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``model:`` with the fields a pretrained checkpoint fixes filled in; a field the user
    also gave must agree with the checkpoint (a saved spec names them all)."""
    try:
        pretrained = PretrainedSpec.model_validate(data["pretrained"])
    except ValidationError as err:
        raise from_validation_error(err, PretrainedSpec, "model.pretrained") from None
    try:
        shape = read_shape(pretrained.locate())
    except PretrainedError as err:
        if _names_the_checkpoint_fields(data):  # a saved run's spec: its weights are its own
            return data
        where = "path" if pretrained.path is not None else "package"
        raise SpecError(f"model.pretrained.{where}", f"a checkpoint archkit can load ({err})",
                        getattr(pretrained, where)) from None
    fixed = shape.spec_fields()
    attention = fixed.pop("attention")
    heads = {"n_heads": shape.n_heads, "head_dim": shape.head_dim}
    fixed["layers"] = [p.entry for p in plan_layers(pretrained, shape.n_layers, heads)]
    if data.get("pattern") is not None:
        raise SpecError("model.pattern", "no pattern with model.pretrained: the layers are the "
                        "checkpoint's, changed by model.pretrained.insert/replace",
                        data["pattern"])

    def entry(item: Any) -> Any:
        return LayerEntry(block=item) if isinstance(item, str) else LayerEntry.model_validate(
            item)

    def same(key: str, given: Any, wanted: Any) -> bool:
        if key == "layers" and isinstance(given, list):
            return [entry(x) for x in given] == [entry(x) for x in wanted]
        return bool(given == wanted)

    for key, wanted in fixed.items():
        if key in data and not same(key, data[key], wanted):
            raise SpecError(f"model.{key}", f"the checkpoint's value {wanted!r} (or leave it "
                            "out: model.pretrained fixes it)", data[key])
    blocks = {name: dict(config) for name, config in (data.get("blocks") or {}).items()}
    for key, wanted in attention.items():
        given = blocks.get("attention", {}).get(key, wanted)
        if given != wanted:
            raise SpecError(f"model.blocks.attention.{key}", f"the checkpoint's value "
                            f"{wanted!r} (or leave it out)", given)
    blocks["attention"] = {**blocks.get("attention", {}), **attention}
    return {**data, **fixed, "blocks": blocks}


def _names_the_checkpoint_fields(data: dict[str, Any]) -> bool:
    """Whether ``model:`` already gives every field a checkpoint fixes, as the spec a run
    saved does: it can be validated, evaluated and resumed without the checkpoint file."""
    fields = ("vocab_size", "d_model", "n_heads", "mlp_hidden", "norm_eps", "tie_embeddings",
              "layers")
    attention = (data.get("blocks") or {}).get("attention") or {}
    return all(data.get(key) is not None for key in fields) and all(
        key in attention for key in ("n_kv_heads", "head_dim", "rope_theta"))


def _entry(where: str, item: str | LayerEntry) -> tuple[str, LayerEntry]:
    if isinstance(item, str):
        return where, LayerEntry(block=item)
    return f"{where}.block", item


def _resolve_layers(model: ModelSpec) -> list[LayerSpec]:
    if (model.pattern is None) == (model.layers is None):
        raise SpecError(
            "model.pattern", "give either `pattern` (with `legend`) or `layers`, not both",
            model.pattern,
        )
    if model.pattern is not None:
        if not model.pattern:
            raise SpecError("model.pattern", "a non-empty string of legend letters", "")
        for letter in model.pattern:
            if letter not in model.legend:
                raise SpecError(
                    "model.pattern", f"letter {letter!r} is not in model.legend "
                    f"(legend letters: {', '.join(sorted(model.legend)) or 'none'})",
                    model.pattern,
                )
        items = [_entry(f"model.legend.{c}", model.legend[c]) for c in model.pattern]
    else:
        assert model.layers is not None
        if not model.layers:
            raise SpecError("model.layers", "at least one layer", [])
        items = [_entry(f"model.layers[{i}]", x) for i, x in enumerate(model.layers)]
    for name in model.blocks:
        if name not in BLOCKS:
            raise SpecError(f"model.blocks.{name}", BLOCKS.unknown_message(name))
    return [_layer_spec(model, where, entry) for where, entry in items]


def _layer_spec(model: ModelSpec, where: str, entry: LayerEntry) -> LayerSpec:
    try:
        config_model = BLOCKS.get(entry.block).config
    except RegistryError as err:
        raise SpecError(where, str(err), entry.block) from None
    shared = model.blocks.get(entry.block, {})
    raw = {**shared, **entry.config}
    if "n_heads" in config_model.model_fields and raw.get("n_heads") is None:
        raw["n_heads"] = model.n_heads

    def field_path(field: str) -> str:
        layer_base = where.removesuffix(".block")
        if field in entry.config:
            return f"{layer_base}.config.{field}"
        if field == "n_heads" and field not in shared:
            return "model.n_heads"
        return f"model.blocks.{entry.block}.{field}"

    try:
        config = config_model.model_validate(raw)
    except ValidationError as err:
        problem = from_validation_error(err, config_model)
        raise SpecError(field_path(problem.path), problem.expected, problem.value) from None
    check = getattr(config, "check", None)
    problem = check(model.d_model) if check is not None else None
    if problem:
        field, expected = problem
        raise SpecError(field_path(field), expected, getattr(config, field, None))
    return LayerSpec(block=entry.block, config=config, mlp=entry.mlp)


def from_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = ""
                          ) -> SpecError:
    """The first pydantic error as a SpecError with a dotted path (under ``prefix``)."""
    first = err.errors()[0]
    loc = [str(p) if isinstance(p, str) else f"[{p}]" for p in first["loc"]]
    path = ".".join(filter(None, [prefix, *loc])).replace(".[", "[")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        expected = f"unknown key; allowed here: {', '.join(allowed)}.{hint}"
        return SpecError(path, expected)
    if first["type"] == "missing":
        return SpecError(path, "required field is missing")
    return SpecError(path, _lowercase_first(first["msg"]), first.get("input"))


def _lowercase_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along ``loc`` to list the keys the enclosing model accepts."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_spec(
    data: Mapping[str, Any], file: str | Path | None = None, schema: type[BaseModel] = Spec
) -> Any:
    """Validate a mapping against ``schema``; every failure becomes a SpecError."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as err:
        raise from_validation_error(err, schema).with_file(file or "<spec>") from None
    except SpecError as err:
        raise err.with_file(file or "<spec>") from None


def with_overrides(spec: Spec, overrides: Mapping[str, Any]) -> Spec:
    """``spec`` with dotted ``overrides`` applied, validated again."""
    return parse_spec(apply_dotted(spec.model_dump(mode="json"), overrides))


def load_spec(
    path: str | Path, overrides: Mapping[str, Any] | None = None, schema: type[BaseModel] = Spec
) -> Any:
    """Load, merge (``extends``, then ``overrides`` as dotted keys) and validate a spec."""
    tree = load_yaml_tree(path)
    if overrides:
        tree = apply_dotted(tree, overrides)
    return parse_spec(tree, path, schema)

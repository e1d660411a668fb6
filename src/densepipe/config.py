"""The params.yaml schema: one typed section per stage, unknown keys forbidden.

Names that come from a vocabulary (activation, initializer, loss, optimizer,
metric, callback, ...) are checked against the registries that implement them,
so the schema can never accept a name the code would not run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from densepipe.registry import Registry, did_you_mean


class ConfigError(ValueError):
    """A params.yaml problem, already phrased for the user (key path, value, what is allowed)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _in(registry_getter):
    """A validator that canonicalizes a name through a registry (lazily imported)."""
    def check(value):
        if value is None:
            return value
        registry: Registry = registry_getter()
        name = value if isinstance(value, str) else value.get("name")
        canonical = registry.canonical(name)
        return canonical if isinstance(value, str) else {**value, "name": canonical}
    return check


def _activations():
    from densepipe.nn.activations import ACTIVATIONS
    return ACTIVATIONS


def _initializers():
    from densepipe.nn.initializers import INITIALIZERS
    return INITIALIZERS


def _losses():
    from densepipe.nn.losses import LOSSES
    return LOSSES


def _metrics():
    from densepipe.metrics import METRICS
    return METRICS


def _optimizers():
    from densepipe.train.optimizers import OPTIMIZERS
    return OPTIMIZERS


def _sources():
    from densepipe.data.sources import SOURCES
    return SOURCES


# ------------------------------------------------------------------ data / split / scale
class DataConfig(Section):
    source: str = "digits"             # bundled set name, a make_* generator, "csv" or "parquet"
    path: str | None = None            # file for csv / parquet
    target: str | list[str] | None = None  # target column(s); bundled sets know theirs
    task: Literal["auto", "binary", "multiclass", "regression", "reconstruction"] = "auto"  # reconstruction: autoencoders
    options: dict[str, Any] = {}       # generator arguments, e.g. {n_samples: 1000, noise: 0.2}
    drop: list[str] = []               # columns to ignore
    categorical: list[str] | Literal["auto"] = "auto"  # auto: non-numeric columns

    _source = field_validator("source")(_in(_sources))

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.source in ("csv", "parquet") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        return self


class SplitConfig(Section):
    test_size: float = Field(0.2, gt=0, lt=1)   # fraction of rows held out for the test set
    val_size: float = Field(0.1, ge=0, lt=1)    # fraction of rows for validation
    stratify: bool = True                       # keep class proportions (classification)
    shuffle: bool = True
    folds: PositiveInt | None = None            # k-fold: the k-th part of the non-test rows is val
    fold: int = Field(0, ge=0)                  # which fold is validation when folds is set

    @model_validator(mode="after")
    def _fractions(self):
        if self.test_size + self.val_size >= 1:
            raise ValueError(f"split.test_size + split.val_size must be < 1, got "
                             f"{self.test_size} + {self.val_size}")
        if self.folds is not None and (self.folds < 2 or self.fold >= self.folds):
            raise ValueError(f"split.folds must be >= 2 and split.fold < folds, got folds={self.folds}, "
                             f"fold={self.fold}")
        return self


class ScaleConfig(Section):
    numeric: Literal["standard", "minmax", "robust", "none"] = "standard"
    categorical: Literal["onehot", "ordinal", "target"] = "onehot"
    impute: Literal["mean", "median", "most_frequent", "none"] = "mean"  # none: missing values are an error
    target: Literal["none", "standard", "minmax"] = "none"  # regression targets only


# ------------------------------------------------------------------------------ model
class _Layer(Section):
    name: str | None = None
    inputs: list[str] | None = None   # graph models: names of the nodes feeding this one


class DenseLayer(_Layer):
    type: Literal["dense"] = "dense"
    units: PositiveInt | Literal["auto"]          # "auto": the output width the data needs
    activation: str | None = "linear"            # "auto" on an output: by task
    alpha: float | None = None                   # leaky_relu slope / elu alpha
    initializer: str | dict[str, Any] = "glorot_uniform"  # Keras' default
    bias_initializer: str | dict[str, Any] = "zeros"
    use_bias: bool = True
    l1: float = Field(0.0, ge=0)                 # kernel L1 penalty
    l2: float = Field(0.0, ge=0)                 # kernel L2 penalty

    _init = field_validator("initializer", "bias_initializer")(_in(_initializers))

    @field_validator("activation")
    @classmethod
    def _act(cls, v):
        return v if v == "auto" else _in(_activations)(v)


class DropoutLayer(_Layer):
    type: Literal["dropout"] = "dropout"
    rate: float = Field(ge=0, lt=1)


class BatchNormLayer(_Layer):
    type: Literal["batchnorm"] = "batchnorm"
    momentum: float = Field(0.99, gt=0, lt=1)    # Keras convention: running = m*running + (1-m)*batch
    epsilon: float = Field(1e-3, gt=0)


class ActivationLayer(_Layer):
    type: Literal["activation"] = "activation"
    activation: str
    alpha: float | None = None

    _act = field_validator("activation")(_in(_activations))


class GaussianNoiseLayer(_Layer):
    type: Literal["gaussian_noise"] = "gaussian_noise"
    stddev: float = Field(gt=0)                  # active in training only (denoising autoencoders)


class ConcatenateLayer(_Layer):
    type: Literal["concatenate"] = "concatenate"


class AddLayer(_Layer):
    type: Literal["add"] = "add"


LayerConfig = Annotated[
    Union[DenseLayer, DropoutLayer, BatchNormLayer, ActivationLayer, GaussianNoiseLayer,
          ConcatenateLayer, AddLayer],
    Field(discriminator="type"),
]


class InputConfig(Section):
    columns: list[str] | Literal["all", "rest"] = "all"  # raw feature columns feeding this input


class OutputConfig(Section):
    target: str | None = None        # target column (default: the data's target)
    loss: str | dict[str, Any] = "auto"   # auto: by task; or {name: huber, delta: 1.0}
    weight: float = Field(1.0, ge=0)      # loss weight
    metrics: list[str] = []

    @field_validator("loss")
    @classmethod
    def _loss(cls, v):
        return v if v == "auto" else _in(_losses)(v)

    _metrics = field_validator("metrics")(lambda v: [_in(_metrics)(m) for m in v])


class ModelConfig(Section):
    kernels: Literal["fused", "reference"] = "fused"   # reference: plain torch layers
    initializer: str | dict[str, Any] | None = None   # default for dense layers that set none
    inputs: dict[str, InputConfig] = {}     # graph models: named inputs (default: one, "features")
    layers: list[LayerConfig] = Field(min_length=1)
    outputs: dict[str, OutputConfig] = {}   # graph models: node name -> its target and loss

    _init = field_validator("initializer")(_in(_initializers))

    @model_validator(mode="after")
    def _names_unique(self):
        seen = set(self.inputs)
        for i, layer in enumerate(self.layers):
            if layer.name is not None:
                if layer.name in seen:
                    raise ValueError(f"model.layers[{i}].name '{layer.name}' is used twice")
                seen.add(layer.name)
        return self


# ------------------------------------------------------------------------------ train
class OptimizerConfig(Section):
    name: str = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float | None = Field(None, ge=0)  # default per optimizer (adamw: 0.01, others: 0)
    momentum: float = Field(0.0, ge=0)       # sgd / rmsprop
    nesterov: bool = False
    dampening: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw
    eps: float | None = Field(None, gt=0)    # default per optimizer
    amsgrad: bool = False
    alpha: float = Field(0.99, gt=0, lt=1)   # rmsprop smoothing
    centered: bool = False
    lr_decay: float = Field(0.0, ge=0)       # adagrad
    initial_accumulator_value: float = Field(0.0, ge=0)

    _name = field_validator("name")(_in(_optimizers))


class ClipConfig(Section):
    norm: float | None = Field(None, gt=0)   # clip the global L2 norm of all gradients
    value: float | None = Field(None, gt=0)  # clip each gradient element to [-value, value]


class CallbackConfig(Section):
    model_config = ConfigDict(extra="allow")  # each callback's own arguments, checked by it
    type: str

    @field_validator("type")
    @classmethod
    def _type(cls, v):
        from densepipe.train.callbacks import CALLBACKS
        return CALLBACKS.canonical(v)

    @model_validator(mode="after")
    def _args(self):
        from densepipe.train.callbacks import check_callback_args
        check_callback_args(self.type, self.model_extra or {})
        return self


class TrainConfig(Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: str | dict[str, Any] = "auto"      # single-output models; graph outputs set their own
    metrics: list[str] = ["auto"]            # auto: accuracy for classification, mae for regression
    class_weight: Literal["balanced"] | dict[str, float] | None = None
    clip: ClipConfig = ClipConfig()
    callbacks: list[CallbackConfig] = []
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    shuffle: bool = True
    progress: Literal["bar", "epoch", "quiet"] = "epoch"
    checkpoint_every: PositiveInt = 1        # epochs between resume checkpoints
    deterministic: bool = True               # same seed -> same metrics on CPU

    @field_validator("loss")
    @classmethod
    def _loss(cls, v):
        return v if v == "auto" else _in(_losses)(v)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        return [m if m == "auto" else _in(_metrics)(m) for m in v]


class EvaluateConfig(Section):
    threshold: float = Field(0.5, gt=0, lt=1)  # binary decision threshold
    embedding_layer: str | None = None         # save this layer's output on the test rows (autoencoders)


class ReportConfig(Section):
    title: str = "densepipe report"
    max_histogram_layers: PositiveInt = 12


class MlflowConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = None   # default: sqlite:///<repo root>/mlflow.db (MLFLOW_TRACKING_URI wins)
    experiment: str = "densepipe"
    run_name: str | None = None
    parent_run_id: str | None = None  # nests this run under another (sweeps set it per trial)


class Config(Section):
    seed: int = 42
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    scale: ScaleConfig = ScaleConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    mlflow: MlflowConfig = MlflowConfig()


# ------------------------------------------------------------------------ loading / errors
def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at a location, for "did you mean" on unknown keys."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            tag = part  # a discriminated-union member (e.g. "dense")
            members = [m for m in _LAYER_TYPES if m.model_fields["type"].default == tag]
            cls = members[0] if members else None
            continue
        ann = field.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and
                    issubclass(a, BaseModel)), None)
    return list(getattr(cls, "model_fields", {})) if cls else []


_LAYER_TYPES = [DenseLayer, DropoutLayer, BatchNormLayer, ActivationLayer, GaussianNoiseLayer,
                ConcatenateLayer, AddLayer]


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {m.model_fields["type"].default for m in _LAYER_TYPES}:
            continue  # pydantic's union tag, not a key the user wrote
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_errors(err: ValidationError, model: type[BaseModel] = Config) -> str:
    lines = []
    for e in err.errors():
        loc, kind, value = tuple(e["loc"]), e["type"], e.get("input")
        path = _path(loc)
        if kind == "extra_forbidden":
            allowed = _fields_at(model, loc)
            hint = did_you_mean(loc[-1], allowed)
            lines.append(f"{path}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif kind == "union_tag_invalid":
            lines.append(f"{path}: unknown layer type {value.get('type')!r}"
                         f"{did_you_mean(value.get('type'), e['ctx']['expected_tags'].replace(chr(39), '').split(', '))}"
                         f"; allowed: {e['ctx']['expected_tags']}")
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{path}: {msg}{shown}")
    return "invalid params:\n  " + "\n  ".join(lines)


def parse(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(raw: dict, assignment: str) -> None:
    """Sets one `key.path[0].name=value` (DVC's -S syntax; the value is YAML) in raw."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.epochs=5")
    # Both model.layers[0].units and DVC/Hydra's model.layers.0.units address a list item.
    parts = [int(i) if i else (int(name) if name.isdigit() else name) for name, i in _PART.findall(key.strip())]
    node = raw
    for here, nxt in zip(parts, parts[1:]):
        try:
            node = node[here] if not isinstance(node, dict) or here in node else node.setdefault(
                here, [] if isinstance(nxt, int) else {})
        except (IndexError, KeyError, TypeError):
            raise ConfigError(f"--set {assignment!r}: '{key}' does not exist in the params") from None
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except (IndexError, TypeError):
        raise ConfigError(f"--set {assignment!r}: '{key}' does not exist in the params") from None


def load(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse(raw)


def resolved(cfg: Config) -> dict:
    """All defaults filled in, as plain data (logged to MLflow, saved in checkpoints)."""
    return cfg.model_dump(mode="json")

"""The params.yaml schema: one typed section per stage, unknown keys forbidden.

Names that come from a vocabulary (activation, initializer, loss, optimizer,
metric, callback, ...) are checked against the registries that implement them,
so the schema can never accept a name the code would not run. The same goes for
what comes with a name: an initializer's or a loss's arguments are checked against
the function's signature and tried where that is cheap, and the optimizer is built
once on a probe parameter, so a value training would refuse is refused here first.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from densepipe.registry import Registry, did_you_mean


class ConfigError(ValueError):
    """A params.yaml problem, already phrased for the user (key path, value, what is allowed)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data):
        # pydantic reads true as 1 for a number; in YAML it is a slip (batch_size: yes), not a count.
        for key, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(key)
            if isinstance(value, bool) and field is not None and _wants_number(field.annotation):
                raise ValueError(f"{key}: expected a number, got {_show(value)}")
        return data


def _wants_number(annotation) -> bool:
    """Whether a field takes int or float values and not bool (through Optional, Annotated, unions)."""
    leaves, stack = set(), [annotation]
    while stack:
        t = stack.pop()
        args = typing.get_args(t)
        if typing.get_origin(t) is typing.Annotated:
            stack.append(args[0])
        elif typing.get_origin(t) in (typing.Union, types.UnionType):
            stack.extend(args)
        else:
            leaves.add(t)
    return bool(leaves & {int, float}) and bool not in leaves and typing.Any not in leaves


def _in(registry_getter):
    """A validator that canonicalizes a name through a registry (lazily imported)."""
    def check(value):
        return value if value is None else registry_getter().canonical(value)
    return check


def _show(value) -> str:
    """A value as the user wrote it in YAML: {name: constant, value: 0.3}, true, null."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value) if isinstance(value, str) else repr(value)


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


def _constraints():
    from densepipe.nn.constraints import CONSTRAINTS
    return CONSTRAINTS


def _sources():
    from densepipe.data.sources import SOURCES
    return SOURCES


# ------------------------------------------------- names with arguments (initializers, losses)
@dataclass(frozen=True)
class _Vocabulary:
    """A vocabulary whose entries are written as a name or as {name: ..., **arguments}.

    Which arguments an entry takes is read from the registered function's signature, less
    the ones the code passes itself; `values` says what each accepts where a bare `float`
    annotation cannot (a negative stddev is a float too). Validated values replace the
    written ones, so "0.3" reaches the function as 0.3."""
    registry: Callable[[], Registry]
    passed_by_code: tuple[str, ...]
    values: dict[str, TypeAdapter]
    example: str                                  # shown when the name is missing


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(ge=0, le=1)]

_INITIALIZER_ARGS = _Vocabulary(_initializers, ("w", "generator"), {
    "value": TypeAdapter(_Finite),               # constant
    "mean": TypeAdapter(_Finite),
    "stddev": TypeAdapter(_NonNegative),         # random_normal, truncated_normal, sparse
    "minval": TypeAdapter(_Finite),              # random_uniform (minval <= maxval: the trial run checks)
    "maxval": TypeAdapter(_Finite),
    "gain": TypeAdapter(_Finite),                # orthogonal
    "sparsity": TypeAdapter(_Fraction),          # sparse: fraction of zero rows per column
    "scale": TypeAdapter(_Positive),             # variance_scaling: var = scale / n
    "mode": TypeAdapter(Literal["fan_in", "fan_out", "fan_avg"]),
    "distribution": TypeAdapter(Literal["uniform", "truncated_normal", "normal", "untruncated_normal"]),
}, "{name: constant, value: 0.1}")

_LOSS_ARGS = _Vocabulary(_losses, ("raw", "target", "head"), {
    "delta": TypeAdapter(_Positive),             # huber: where the loss turns from squared to linear
    "label_smoothing": TypeAdapter(_Fraction),
    "from_logits": TypeAdapter(bool | Literal["auto"]),
}, "{name: huber, delta: 1.0}")


_CONSTRAINT_ARGS = _Vocabulary(_constraints, ("w",), {
    "max_value": TypeAdapter(_Positive),         # max_norm, min_max_norm
    "min_value": TypeAdapter(_NonNegative),      # min_max_norm (min_value <= max_value: the trial run checks)
    "rate": TypeAdapter(_Fraction),              # min_max_norm: how far each step moves a norm into range
    "axis": TypeAdapter(Literal[0, 1]),          # Keras' axis of its (in, out) kernel
}, "{name: max_norm, max_value: 3}")


def _named(vocabulary: _Vocabulary, value: str | dict) -> str | dict:
    """Canonicalizes a name or {name: ..., **arguments}; a ValueError names what is wrong."""
    registry: Registry = vocabulary.registry()
    if isinstance(value, str):
        return registry.canonical(value)
    if "name" not in value:
        near = next((k for k in value if did_you_mean(k, ["name"])), None)
        hint = f" (did you mean 'name' instead of '{near}'?)" if near else ""
        raise ValueError(f"{registry.kind} {_show(value)} has no 'name' key{hint}; write it as "
                         f"{vocabulary.example}; names: {', '.join(registry.names())}")
    name = registry.canonical(value["name"])
    takes = [p for p in inspect.signature(registry[name]).parameters if p not in vocabulary.passed_by_code]
    args, problems = {}, []
    for key, given in value.items():
        if key == "name":
            continue
        if key not in takes:
            problems.append(f"unknown argument '{key}'{did_you_mean(key, takes)}; "
                            f"{name} takes {', '.join(takes) or 'no arguments'}")
        elif key in vocabulary.values:
            try:
                args[key] = vocabulary.values[key].validate_python(given)
            except ValidationError as err:
                allowed = " -- or: ".join(e["msg"] for e in err.errors())
                problems.append(f"{key}: {allowed} (got {given!r})")
        else:
            args[key] = given
    if problems:
        raise ValueError(f"{registry.kind} {name}: {'; '.join(problems)}")
    return {"name": name, **args}


_WEIGHT_ROLES = {2: ("kernel", (4, 3)), 1: ("bias", (4,))}   # rank -> what it is, a small shape


def _fill_error(spec: str | dict, rank: int) -> str | None:
    """Why the initializer cannot fill a tensor of this rank, or None: it runs on a small one,
    so whatever it would raise at train time (a bias given orthogonal, minval > maxval) shows here."""
    import torch

    from densepipe.nn.initializers import initialize
    w = torch.empty(_WEIGHT_ROLES[rank][1])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's hints about odd arguments; errors are what count
            initialize(w, spec, torch.Generator().manual_seed(0))
    except Exception as err:  # noqa: BLE001  (any error here is the one training would stop with)
        return str(err) or type(err).__name__
    return None if torch.isfinite(w).all() else "it gives non-finite values"


def _initializer(rank: int, role: str | None = None):
    """A validator for an initializer that fills a tensor of this rank (kernel 2, bias 1); `role`
    names it in messages when it is neither."""
    def check(value):
        if value is None:
            return value
        spec = _named(_INITIALIZER_ARGS, value)
        error = _fill_error(spec, rank)
        if error:
            what = role or _WEIGHT_ROLES[rank][0]
            name = spec if isinstance(spec, str) else spec["name"]
            if _fill_error(name, rank):   # the scheme itself, whatever its arguments
                fit = [n for n in _initializers().names() if not _fill_error(n, rank)]
                raise ValueError(f"initializer {name} cannot fill a {what} ({rank}-D): {error}; "
                                 f"initializers for a {what}: {', '.join(fit)}")
            raise ValueError(f"initializer {_show(spec)} cannot fill a {what}: {error}")
        return spec
    return check


def _constraint(rank: int):
    """A validator for a constraint on a tensor of this rank (kernel 2, bias 1): tried on a small
    one, so arguments training would refuse (axis 1 on a bias) are refused here."""
    def check(value):
        if value is None:
            return value
        spec = _named(_CONSTRAINT_ARGS, value)
        import torch

        from densepipe.nn.constraints import constraint
        try:
            constraint(spec)(torch.ones(_WEIGHT_ROLES[rank][1]))
        except ValueError as err:
            role = _WEIGHT_ROLES[rank][0]
            raise ValueError(f"constraint {_show(spec)} cannot constrain a {role}: {err}") from None
        return spec
    return check


def _loss_spec(value):
    return value if value == "auto" else _named(_LOSS_ARGS, value)


# ------------------------------------------------------------------ data / split / scale
class DataConfig(Section):
    source: str = "digits"             # bundled set name, a make_* generator, "csv" or "parquet"
    path: str | None = None            # file for csv / parquet
    target: str | list[str] | None = None  # target column(s); bundled sets know theirs
    # reconstruction: autoencoders (the inputs are the targets)
    task: Literal["auto", "binary", "multiclass", "regression", "reconstruction"] = "auto"
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
    bias_l1: float = Field(0.0, ge=0)            # bias penalties (Keras' bias_regularizer)
    bias_l2: float = Field(0.0, ge=0)
    activity_l1: float = Field(0.0, ge=0)        # output penalties (Keras' activity_regularizer)
    activity_l2: float = Field(0.0, ge=0)
    constraint: str | dict[str, Any] | None = None       # kernel constraint after each step (max_norm, ...)
    bias_constraint: str | dict[str, Any] | None = None

    _init = field_validator("initializer")(_initializer(rank=2))
    _bias_init = field_validator("bias_initializer")(_initializer(rank=1))
    _kernel_con = field_validator("constraint")(_constraint(rank=2))
    _bias_con = field_validator("bias_constraint")(_constraint(rank=1))

    @field_validator("activation")
    @classmethod
    def _act(cls, v):
        return v if v == "auto" else _in(_activations)(v)

    @model_validator(mode="after")
    def _bias_settings_need_a_bias(self):
        if not self.use_bias:
            given = [k for k in ("bias_initializer", "bias_l1", "bias_l2", "bias_constraint")
                     if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)} set, but use_bias is false: the layer has no bias")
        return self


class DropoutLayer(_Layer):
    type: Literal["dropout", "alpha_dropout", "gaussian_dropout"] = "dropout"
    rate: float = Field(ge=0, lt=1)              # the share of units dropped (gaussian: the noise's)


class BatchNormLayer(_Layer):
    type: Literal["batchnorm"] = "batchnorm"
    momentum: float = Field(0.99, gt=0, lt=1)    # Keras convention: running = m*running + (1-m)*batch
    epsilon: float = Field(1e-3, gt=0)


class LayerNormLayer(_Layer):
    type: Literal["layernorm"] = "layernorm"
    epsilon: float = Field(1e-3, gt=0)           # Keras' default (torch's nn.LayerNorm takes 1e-5)
    center: bool = True                          # a learned offset (beta)
    scale: bool = True                           # a learned gain (gamma)
    beta_initializer: str | dict[str, Any] = "zeros"
    gamma_initializer: str | dict[str, Any] = "ones"

    _beta_init = field_validator("beta_initializer")(_initializer(rank=1, role="layernorm beta"))
    _gamma_init = field_validator("gamma_initializer")(_initializer(rank=1, role="layernorm gamma"))


class ActivationLayer(_Layer):
    type: Literal["activation"] = "activation"
    activation: str
    alpha: float | None = None

    _act = field_validator("activation")(_in(_activations))


class GaussianNoiseLayer(_Layer):
    type: Literal["gaussian_noise"] = "gaussian_noise"
    stddev: float = Field(gt=0)                  # active in training only (denoising autoencoders)


class PReLULayer(_Layer):
    type: Literal["prelu"] = "prelu"
    alpha_initializer: str | dict[str, Any] = "zeros"   # Keras' default: starts as relu
    shared: bool = False                                 # one alpha for all units (torch's nn.PReLU())

    _alpha_init = field_validator("alpha_initializer")(_initializer(rank=1, role="prelu alpha"))


class ActivityRegularizationLayer(_Layer):
    type: Literal["activity_regularization"] = "activity_regularization"
    l1: float = Field(0.0, ge=0)                 # penalties on the input, passed on unchanged
    l2: float = Field(0.0, ge=0)


class ConcatenateLayer(_Layer):
    type: Literal["concatenate"] = "concatenate"


class MergeLayer(_Layer):
    """Element-wise merges of inputs of one width (Keras' Add, Subtract, Multiply, ...)."""
    type: Literal["add", "subtract", "multiply", "average", "maximum", "minimum"]


class DotLayer(_Layer):
    type: Literal["dot"] = "dot"
    normalize: bool = False   # rows scaled to unit length first: the cosine similarity


LayerConfig = Annotated[
    DenseLayer | DropoutLayer | BatchNormLayer | LayerNormLayer | ActivationLayer | PReLULayer | GaussianNoiseLayer
    | ActivityRegularizationLayer | ConcatenateLayer | MergeLayer | DotLayer,
    Field(discriminator="type"),
]


class InputConfig(Section):
    columns: list[str] | Literal["all", "rest"] = "all"  # raw feature columns feeding this input


class OutputConfig(Section):
    target: str | None = None        # target column (default: the data's target)
    loss: str | dict[str, Any] = "auto"   # auto: by task; or {name: huber, delta: 1.0}
    weight: float = Field(1.0, ge=0)      # loss weight
    metrics: list[str] = []

    _loss = field_validator("loss")(_loss_spec)
    _metrics = field_validator("metrics")(lambda v: [_in(_metrics)(m) for m in v])


class ModelConfig(Section):
    kernels: Literal["fused", "reference"] = "fused"   # reference: plain torch layers
    initializer: str | dict[str, Any] | None = None   # default for dense layers that set none
    inputs: dict[str, InputConfig] = {}     # graph models: named inputs (default: one, "features")
    layers: list[LayerConfig] = Field(min_length=1)
    outputs: dict[str, OutputConfig] = {}   # graph models: node name -> its target and loss

    _init = field_validator("initializer")(_initializer(rank=2))   # dense kernels

    def layer_names(self) -> list[str]:
        """Each layer's graph name: its `name`, else `<type>_<position>` (dense_1, dropout_2, ...)."""
        return [layer.name or f"{layer.type}_{i + 1}" for i, layer in enumerate(self.layers)]

    def input_names(self) -> list[str]:
        return list(self.inputs) or ["features"]  # one input holding every feature column

    @model_validator(mode="after")
    def _graph(self):
        """The wiring that needs no data: unique names, inputs defined before use, outputs
        that name layers, `auto` widths and activations only where the data decides them."""
        names = self.layer_names()
        known = set(self.input_names())
        for i, name in enumerate(names):
            if name in known or name in names[:i]:
                raise ValueError(f"model.layers[{i}].name '{name}' is used twice")
        unknown = [n for n in self.outputs if n not in names]
        if unknown:
            raise ValueError(f"model.outputs names {unknown}, which are not layers; "
                             f"layers: {', '.join(names)}")
        outputs = list(self.outputs) or names[-1:]
        for i, (layer, name) in enumerate(zip(self.layers, names, strict=True)):
            missing = [s for s in layer.inputs or [] if s not in known]
            if missing:
                raise ValueError(f"model.layers[{i}] ({name}): inputs {missing} are not defined before it; "
                                 f"known: {', '.join(sorted(known))}")
            for key in ("units", "activation"):
                if getattr(layer, key, None) == "auto" and name not in outputs:
                    raise ValueError(f"model.layers[{i}] ({name}): {key}: auto is only allowed on a model "
                                     f"output ({', '.join(outputs)}); give this layer its own {key}")
            known.add(name)
        return self


# ------------------------------------------------------------------------------ train
_Beta = Annotated[float, Field(ge=0, lt=1)]   # a moving-average decay


class OptimizerConfig(Section):
    name: str = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float | None = Field(None, ge=0)  # default per optimizer (adamw: 0.01, others: 0)
    momentum: float = Field(0.0, ge=0)       # sgd / rmsprop
    nesterov: bool = False
    dampening: float = Field(0.0, ge=0)
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)  # adam / adamw / nadam / adamax
    momentum_decay: float = Field(4e-3, ge=0)  # nadam: how fast its momentum schedule rises to beta1
    eps: float | None = Field(None, gt=0)    # default per optimizer
    amsgrad: bool = False
    alpha: float = Field(0.99, gt=0, lt=1)   # rmsprop smoothing
    centered: bool = False
    lr_decay: float = Field(0.0, ge=0)       # adagrad
    initial_accumulator_value: float = Field(0.0, ge=0)

    _name = field_validator("name")(_in(_optimizers))

    @model_validator(mode="after")
    def _as_built(self):
        """Builds the optimizer on a probe parameter, as training will: a combination it refuses
        (nesterov without momentum, ...) stops here, and the values it settles on (adamw's
        weight_decay 0.01, the momentum optimizer's 0.9, ...) are written back, so the resolved
        config shows what training uses and builds the same optimizer again."""
        import torch

        from densepipe.train.optimizers import build_optimizer
        try:
            used = build_optimizer([torch.zeros(1, requires_grad=True)], self).defaults
        except (ValueError, RuntimeError) as err:
            # The settings the user wrote, and those the optimizer's message names.
            shown = [k for k in type(self).model_fields if k != "name" and (
                k in self.model_fields_set or re.search(rf"\b{k}\b", str(err), re.IGNORECASE))]
            got = ", ".join(f"{k}: {_show(getattr(self, k))}" for k in shown)
            raise ValueError(f"optimizer {self.name} refuses these settings: {err} (got {got})") from None
        for key, current in self:
            if key != "name" and key in used:
                # Straight into __dict__: assignment would validate (and build) all over again.
                self.__dict__[key] = (bool(used[key]) if isinstance(current, bool) else
                                      tuple(map(float, used[key])) if isinstance(current, tuple) else
                                      float(used[key]))
        return self


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
        """Checks the callback's arguments and fills in its defaults, so the resolved config
        shows every value the callback runs with (min_delta, mode, cooldown, ...)."""
        from densepipe.train.callbacks import CALLBACKS, check_callback_args
        check_callback_args(self.type, self.model_extra or {})
        args, _ = CALLBACKS[self.type]
        self.__pydantic_extra__ = args.model_validate(self.model_extra or {}).model_dump()
        return self


class DistributedConfig(Section):
    nproc: PositiveInt = 1   # processes on this machine; > 1: the stage starts itself through torchrun


class TrainConfig(Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    # A factory, not a shared instance: an optimizer section is built (and filled in) per config.
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    loss: str | dict[str, Any] = "auto"      # single-output models; graph outputs set their own
    metrics: list[str] = ["auto"]            # auto: accuracy for classification, mae for regression
    class_weight: Literal["balanced"] | dict[str, float] | None = None  # or class label -> weight
    clip: ClipConfig = ClipConfig()
    callbacks: list[CallbackConfig] = []
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    shuffle: bool = True
    progress: Literal["bar", "epoch", "quiet"] = "epoch"
    checkpoint_every: PositiveInt = 1        # epochs between resume checkpoints
    deterministic: bool = True               # same seed -> same metrics on CPU
    distributed: DistributedConfig = DistributedConfig()  # data-parallel processes (DDP)

    _loss = field_validator("loss")(_loss_spec)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        return [m if m == "auto" else _in(_metrics)(m) for m in v]

    @field_validator("class_weight", mode="before")
    @classmethod
    def _class_weight(cls, v):
        if isinstance(v, str) and v != "balanced":
            raise ValueError(f"unknown class_weight{did_you_mean(v, ['balanced'])}; allowed: balanced, or a "
                             f"mapping from class label to weight such as {{0: 1.0, 1: 5.0}}")
        if not isinstance(v, dict):
            return v
        # YAML reads Keras' {0: 1.0, 1: 5.0} with int keys; the train stage matches keys against
        # the class labels as text ("0", "yes"). bool is an int too, but `yes:` is no class id.
        v = {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: w for k, w in v.items()}
        negative = {k: w for k, w in v.items() if isinstance(w, int | float) and w < 0}
        if negative:
            raise ValueError(f"class weights must be >= 0, got {_show(negative)}")
        return v


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
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    mlflow: MlflowConfig = MlflowConfig()


# ------------------------------------------------------------------------ loading / errors
_LAYER_TYPES = typing.get_args(typing.get_args(LayerConfig)[0])
_LAYER_BY_TAG = {tag: m for m in _LAYER_TYPES for tag in typing.get_args(m.model_fields["type"].annotation)}


# Keras / torch spellings of our keys, so "did you mean" leads from them to ours.
_KEY_SYNONYMS = {"kernel_initializer": "initializer", "kernel_constraint": "constraint", "learning_rate": "lr",
                 "epoch": "epochs", "activation_function": "activation", "kernel_regularizer": "l2",
                 "bias_regularizer": "bias_l2",
                 "activity_regularizer": "activity_l2"}


def _model_in(annotation) -> Any:
    return next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and
                 issubclass(a, BaseModel)), None)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, Any]:
    """pydantic's error location as the user wrote it (without union-member labels such as
    the layer tag in layers[0].dense.units or 'constrained-int'), and the section it ends in."""
    out, cls, key_next = [], model, False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
        elif i > 0 and isinstance(loc[i - 1], int) and part in _LAYER_BY_TAG:
            cls = _LAYER_BY_TAG[part]                        # a layer's type tag
        elif key_next:
            out.append(part)                                 # a name the user chose (outputs.<node>)
            key_next = False
        elif cls is None:
            continue                                         # a union member's label
        else:
            out.append(part)
            field = cls.model_fields.get(part)
            if field is None:                                # an unknown key: ends the location
                continue
            key_next = get_origin(field.annotation) is dict
            cls = _model_in(field.annotation)
    return tuple(out), cls


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def _unknown_key(key: str, allowed: list[str]) -> str:
    synonyms = {s: k for s, k in _KEY_SYNONYMS.items() if k in allowed}
    close = difflib.get_close_matches(str(key), [*allowed, *synonyms], n=1, cutoff=0.6)
    hint = ""
    if close:
        hint = (f" (did you mean '{synonyms[close[0]]}'? '{close[0]}' is spelled '{synonyms[close[0]]}' here)"
                if close[0] in synonyms else f" (did you mean '{close[0]}'?)")
    return f"unknown key{hint}; allowed keys here: {', '.join(allowed)}"


def error_message(e: dict) -> str:
    """One pydantic error's message, less the "Value error, " it puts before a validator's own words."""
    return e["msg"].removeprefix("Value error, ")


def format_errors(err: ValidationError, model: type[BaseModel] = Config) -> str:
    lines: dict[str, list[str]] = {}   # path -> messages (several for a value no union member takes)
    got: dict[str, str] = {}           # path -> the offending value, shown once
    for e in err.errors():
        kind, value = e["type"], e.get("input")
        loc, _ = _walk(model, tuple(e["loc"]))
        path = _path(loc)
        if kind == "extra_forbidden":
            _, section = _walk(model, tuple(e["loc"])[:-1])
            msg = _unknown_key(loc[-1], list(getattr(section, "model_fields", {})))
        elif kind == "union_tag_invalid":
            tags = e["ctx"]["expected_tags"]
            hint = did_you_mean(value.get("type"), tags.replace("'", "").split(", "))
            msg = f"unknown layer type {value.get('type')!r}{hint}; allowed: {tags}"
        elif kind == "union_tag_not_found":
            tags = ", ".join(_LAYER_BY_TAG)
            msg = f"a layer needs a 'type'; allowed: {tags} (got {_show(value)})"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = error_message(e)
            if not isinstance(value, dict):
                got[path] = f" (got {value!r})"
        lines.setdefault(path, []).append(msg)
    text = [f"{' -- or: '.join(msgs)}{got.get(path, '')}" for path, msgs in lines.items()]
    # A section's own checks already name the key they found wrong (model.layers[2] ...).
    text = [t if t.startswith(f"{path}.") else f"{path}: {t}" for path, t in zip(lines, text, strict=True)]
    return "invalid params:\n  " + "\n  ".join(text)


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
    parts = [int(i) if i else (int(name) if name.isdigit() else name)
             for name, i in _PART.findall(key.strip())]
    node = raw
    for here, nxt in zip(parts, parts[1:], strict=False):  # each part with the next
        try:
            node = node[here] if not isinstance(node, dict) or here in node else node.setdefault(
                here, [] if isinstance(nxt, int) else {})
        except (IndexError, KeyError, TypeError):
            raise ConfigError(f"--set {assignment!r}: '{key}' does not exist in the params") from None
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except (IndexError, TypeError):
        raise ConfigError(f"--set {assignment!r}: '{key}' does not exist in the params") from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: plain YAML keeps the last one, so a second
    `train:` block would silently drop everything the first one set."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice ({lines}); the second would replace the first: "
                    "merge them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, kind: str = "params file"):
    """A YAML file as data; ConfigError for text that is not YAML (or not UTF-8), a key given twice,
    or a folder. kind: what the file should be, for that message."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506  (a safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a {kind}") from None


def load(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = read_yaml(path) or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse(raw)


def resolved(cfg: Config) -> dict:
    """All defaults filled in, as plain data (logged to MLflow, saved in checkpoints)."""
    return cfg.model_dump(mode="json")


# Keys whose value is a name, or {name: ..., **arguments}.
_NAMED = ("loss", "initializer", "bias_initializer", "alpha_initializer", "constraint", "bias_constraint")


def with_named_mappings(params):
    """params with every named value written as a mapping (loss: mse as loss: {name: mse}): as
    MLflow keys, a run that gave the loss arguments and one that did not share loss.name."""
    if isinstance(params, list):
        return [with_named_mappings(v) for v in params]
    if not isinstance(params, dict):
        return params
    return {k: {"name": v} if k in _NAMED and isinstance(v, str) else with_named_mappings(v)
            for k, v in params.items()}

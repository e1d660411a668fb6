"""Builds a model from the `model` section: a graph of named layers (a plain list
is the Sequential special case), named inputs, and one head per output.

An output's head activation (sigmoid, softmax, step) is split off its last
layer: the network returns logits, losses read them (stable log-sum-exp), and
`predict` applies the head. Layers that read an output get its activated value,
as in Keras, where the activation is part of the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densepipe.metrics import DEFAULT_METRICS, METRICS
from densepipe.nn.activations import resolve
from densepipe.nn.constraints import constraint
from densepipe.nn.dense import FusedDense, run_chain
from densepipe.nn.layers import LAYERS, NOISE_LAYERS, BuildContext
from densepipe.nn.losses import LOSSES
from densepipe.registry import split_named

HEAD_ACTIVATIONS = ("sigmoid", "softmax", "step")
AUTO_ACTIVATION = {"binary": "sigmoid", "multiclass": "softmax", "regression": "linear",
                   "reconstruction": "linear"}
AUTO_LOSS = {"binary": "binary_crossentropy", "multiclass": "sparse_categorical_crossentropy",
             "regression": "mse", "reconstruction": "mse"}


@dataclass
class TargetSpec:
    task: str                         # binary | multiclass | regression | reconstruction
    width: int                        # classes (multiclass), 1 (binary) or value dims
    classes: list | None = None       # original labels, for decoding predictions


@dataclass
class DataSpec:
    inputs: dict[str, int]            # input name -> feature width
    targets: dict[str, TargetSpec]    # target name -> what it holds


@dataclass
class Head:
    node: str                         # graph node producing the logits / values
    target: str
    task: str
    activation: str                   # applied by predict(); losses see the raw values
    loss: str
    loss_params: dict = field(default_factory=dict)
    weight: float = 1.0
    metrics: list[str] = field(default_factory=list)

    def apply(self, raw: Tensor) -> Tensor:
        return resolve(self.activation).reference(raw, 0.0)


@dataclass
class Node:
    name: str
    kind: str
    inputs: list[str]
    width: int


class DenseModel(nn.Module):
    def __init__(self, nodes: list[Node], modules: dict[str, nn.Module], heads: dict[str, Head],
                 input_widths: dict[str, int]):
        super().__init__()
        self.nodes, self.heads, self.input_widths = nodes, heads, input_widths
        self.layers = nn.ModuleDict(modules)
        self._head_of = {h.node: h for h in heads.values()}  # output node -> its head
        # (l1, l2) per node whose output is penalized (Keras' activity_regularizer): its output
        # is needed on its own, so it ends its run as an output does.
        self._activity = {name: m.activity for name, m in modules.items() if any(getattr(m, "activity", ()))}
        self._runs = _runs(nodes, modules, set(self._head_of) | set(self._activity))
        self.activity: Tensor | None = None  # the latest forward's activity penalties, summed over rows
        # Outputs with a split-off head that other layers read: those readers need the head applied.
        read = {i for node in nodes for i in node.inputs}
        self._activated = {n: h for n, h in self._head_of.items() if n in read and h.activation != "linear"}
        # (layer, parameter name, l1, l2) per penalized parameter: training asks every step.
        self._penalties = [(m, attr, l1, l2) for m in modules.values()
                           for attr, (l1, l2) in getattr(m, "penalties", {}).items() if l1 or l2]
        # (layer, parameter name, projection) per declared constraint; looked up by name at each
        # step, so moving the model to another device leaves them pointing at its weights.
        self._constraints = [(m, attr, constraint(spec)) for m in modules.values()
                             for attr, spec in getattr(m, "constraints", {}).items() if spec is not None]

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw outputs (before head activations), keyed by output name."""
        env, raw = dict(inputs), {}
        self.activity = None
        for run in self._runs:
            layers = [self.layers[node.name] for node in run]
            if len(run) > 1 and all(isinstance(m, FusedDense) and m.chainable() for m in layers):
                env[run[-1].name] = run_chain(layers, env[run[0].inputs[0]])
            else:
                for node, layer in zip(run, layers, strict=True):
                    env[node.name] = layer(*(env[i] for i in node.inputs))
            # An output ends its run (see _runs), so only a run's last node can need its head.
            last = run[-1].name
            if last in self._activity:
                self._add_activity(last, env[last])
            if last in self._activated:
                raw[last] = env[last]
                env[last] = self._activated[last].apply(env[last])
        return {name: raw.get(h.node, env[h.node]) for name, h in self.heads.items()}

    def _add_activity(self, name: str, out: Tensor) -> None:
        """Adds l1 * sum|y| + l2 * sum y^2 of a node's output y to self.activity. Summed over the
        rows, as the losses are: per row it is Keras' penalty divided by the batch size. An
        output's penalty is taken after its head's activation, on what Keras' layer returns."""
        head = self._head_of.get(name)
        y = head.apply(out) if head is not None else out
        self.activity = _plus(self.activity, l1_l2(y, *self._activity[name]))

    @torch.no_grad()
    def predict(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Head-activated outputs, computed in inference mode (dropout and noise off, batchnorm
        on its moving statistics) as Keras' predict is; the model's mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            raw = self(inputs)
        finally:
            self.train(was_training)
        return {name: self.heads[name].apply(r) for name, r in raw.items()}

    def penalty(self) -> Tensor | None:
        """Sum of the dense layers' L1/L2 penalties on kernels and biases (None when there are none)."""
        total = None
        for module, attr, l1, l2 in self._penalties:
            total = _plus(total, l1_l2(getattr(module, attr), l1, l2))
        return total

    @property
    def runs(self) -> list[list[Node]]:
        """The nodes grouped as forward runs them: a run of several is one fused chain."""
        return self._runs

    @property
    def penalized(self) -> bool:
        """Whether any weight carries an L1/L2 penalty."""
        return bool(self._penalties)

    def penalized_weights(self) -> list[tuple[Tensor, float, float]]:
        """(weight, l1, l2) per penalized weight, in the order penalty() adds them up."""
        return [(getattr(module, attr), l1, l2) for module, attr, l1, l2 in self._penalties]

    @property
    def reads_activated_outputs(self) -> bool:
        """Whether a layer reads an output after its head's activation (a split-off softmax or sigmoid)."""
        return bool(self._activated)

    @property
    def has_activity(self) -> bool:
        """Whether any layer's output carries an activity penalty."""
        return bool(self._activity)

    @property
    def draws_noise(self) -> bool:
        """Whether training draws from torch's global generator (dropout, gaussian noise)."""
        return any(isinstance(m, NOISE_LAYERS) for m in self.layers.values())

    @property
    def constrained(self) -> bool:
        return bool(self._constraints)

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Projects the constrained weights back onto their sets (after an optimizer step)."""
        for module, attr, project in self._constraints:
            project(getattr(module, attr))

    def dense_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.layers.items() if hasattr(m, "weight") and m.weight.dim() == 2}

    def summary(self) -> list[dict]:
        rows = []
        for node in self.nodes:
            layer = self.layers[node.name]
            # Keras counts non-trainable state too (batchnorm's moving mean / variance).
            params = sum(p.numel() for p in layer.parameters()) + sum(
                b.numel() for n, b in layer.named_buffers() if not n.endswith("num_batches_tracked"))
            rows.append({"layer": node.name, "type": node.kind, "inputs": ", ".join(node.inputs),
                         "output_shape": f"(None, {node.width})", "params": params})
        return rows


def l1_l2(t: Tensor, l1: float, l2: float) -> Tensor | None:
    """l1 * sum|t| + l2 * sum t^2 (Keras' L1L2 regularizer), without the terms whose rate is 0;
    None when both are."""
    total = None
    for rate, term in ((l1, t.abs), (l2, t.square)):
        if rate:
            total = _plus(total, rate * term().sum())
    return total


def l1_l2_grad(t: Tensor, l1: float, l2: float) -> Tensor | None:
    """The gradient of l1_l2(t, l1, l2) with respect to t, computed as autograd's backward of it
    computes it (abs: sign times the rate; square: twice t, times the rate); None when both rates are 0."""
    total = None
    for rate, term in ((l1, t.sgn), (l2, lambda: t * 2)):
        if rate:
            total = _plus(total, term() * rate)
    return total


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None stands for nothing to add."""
    return b if a is None else a if b is None else a + b


def _runs(nodes: list[Node], modules: dict[str, nn.Module], outputs: set[str]) -> list[list[Node]]:
    """The nodes in order, grouped into runs: a run of several is a chain of fused dense
    layers in which each layer's only reader is the next one, so the whole run can execute
    as one dense_chain op (its inner outputs are never needed on their own)."""
    readers: dict[str, int] = {}
    for node in nodes:
        for i in node.inputs:
            readers[i] = readers.get(i, 0) + 1
    runs: list[list[Node]] = []
    for node in nodes:
        prev = runs[-1][-1] if runs else None
        extends = (prev is not None and node.inputs == [prev.name] and readers.get(prev.name) == 1
                   and prev.name not in outputs
                   and all(isinstance(modules[n.name], FusedDense) and modules[n.name].chains
                           for n in (prev, node)))
        if extends:
            runs[-1].append(node)
        else:
            runs.append([node])
    return runs


def _resolve_outputs(model_cfg, train_cfg, spec: DataSpec, last: str) -> dict[str, dict]:
    """Which node feeds which target, with what loss, weight and metrics."""
    if model_cfg.outputs:
        declared = model_cfg.outputs
    else:
        if len(spec.targets) != 1:
            raise ValueError(f"the data has {len(spec.targets)} targets ({', '.join(spec.targets)}); "
                             "declare model.outputs to map each one to a layer")
        from densepipe.config import OutputConfig
        declared = {last: OutputConfig(loss=train_cfg.loss, metrics=[m for m in train_cfg.metrics
                                                                    if m != "auto"])}
    out = {}
    for node, ocfg in declared.items():
        target = ocfg.target or (next(iter(spec.targets)) if len(spec.targets) == 1 else node)
        if target not in spec.targets:
            raise ValueError(f"model.outputs.{node}.target '{target}' is not a target of the data; "
                             f"targets: {', '.join(spec.targets)}")
        out[node] = {"target": target, "cfg": ocfg}
    return out


def build_model(model_cfg, train_cfg, spec: DataSpec, seed: int = 0) -> DenseModel:
    """model_cfg: config.ModelConfig; train_cfg: config.TrainConfig (default loss / metrics)."""
    generator = torch.Generator().manual_seed(seed)
    input_names = list(spec.inputs)
    names = model_cfg.layer_names()  # the schema has checked the wiring that needs no data
    outputs = _resolve_outputs(model_cfg, train_cfg, spec, names[-1])

    widths, nodes, modules, heads = dict(spec.inputs), [], {}, {}
    prev = input_names[0] if len(input_names) == 1 else None
    for i, (layer, name) in enumerate(zip(model_cfg.layers, names, strict=True)):
        srcs = layer.inputs or ([prev] if prev else None)
        where = f"model.layers[{i}] ({name})"
        if not srcs:
            raise ValueError(f"{where}: say which inputs feed it (inputs: [...]); "
                             f"model inputs: {', '.join(input_names)}")
        missing = [s for s in srcs if s not in widths]
        if missing:
            raise ValueError(f"{where}: inputs {missing} are not defined before it; "
                             f"known: {', '.join(widths)}")
        ctx = BuildContext(kernels=model_cfg.kernels, generator=generator, initializer=model_cfg.initializer)
        head_act = None
        if name in outputs:
            target = spec.targets[outputs[name]["target"]]
            ctx.auto_units = target.width
            act = getattr(layer, "activation", None)
            act = AUTO_ACTIVATION[target.task] if act == "auto" else act
            if act in HEAD_ACTIVATIONS:
                head_act, ctx.activation = act, "linear"
            elif act is not None:
                ctx.activation = act
        try:
            module, width = LAYERS[layer.type](layer, [widths[s] for s in srcs], ctx)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        widths[name] = width
        nodes.append(Node(name, layer.type, list(srcs), width))
        modules[name] = module
        prev = name
        if name in outputs:
            heads[name] = _make_head(name, outputs[name], spec, head_act or "linear", width, train_cfg,
                                     head_act or act or "linear")
    _check_every_layer_feeds_an_output(nodes, set(heads))
    return DenseModel(nodes, modules, {_output_key(h, model_cfg): h for h in heads.values()}, spec.inputs)


def _check_every_layer_feeds_an_output(nodes: list[Node], outputs: set[str]) -> None:
    """A layer no output depends on gets no gradient (it would break training) and would be
    counted in the summary, so it is refused; only graphs can hold one."""
    needed = set(outputs)
    for node in reversed(nodes):  # readers come after what they read
        if node.name in needed:
            needed.update(node.inputs)
    for i, node in enumerate(nodes):
        if node.name not in needed:
            raise ValueError(f"model.layers[{i}] '{node.name}' feeds no output; "
                             "remove it or list it under model.outputs")


def _output_key(head: Head, model_cfg) -> str:
    # Single-output models name their output after the target (e.g. "target").
    return head.node if model_cfg.outputs else head.target


# The target tasks each loss can read (see nn/losses.py), checked before training rather than
# left to fail inside torch. Classification targets are class ids, one per row (N,).
ONE_UNIT = ("binary",)                    # one logit per row against 0/1 labels
CLASS_SCORES = ("multiclass",)            # one score per class against class ids
VALUES = ("regression", "reconstruction")  # real values, the output's own width
LOSS_TASKS = {
    "binary_crossentropy": ONE_UNIT,
    "hinge": ONE_UNIT,                    # margins of one unit, labels read as -1 / +1
    "squared_hinge": ONE_UNIT,
    "perceptron": ONE_UNIT,
    "sparse_categorical_crossentropy": CLASS_SCORES,
    "categorical_crossentropy": CLASS_SCORES,  # class ids are one-hot encoded inside the loss
    "kl_divergence": CLASS_SCORES,
    "categorical_hinge": CLASS_SCORES,
    # Element-wise value losses also fit a one-unit binary head: its probability against the
    # 0/1 label (mse is the Brier score). A softmax's k scores do not line up with one class id.
    "mse": VALUES + ONE_UNIT,
    "mae": VALUES + ONE_UNIT,
    "huber": VALUES + ONE_UNIT,
    "log_cosh": VALUES + ONE_UNIT,
    # Relative to the target's own values: a 0/1 label has none to divide by or take the log of.
    "mape": VALUES,
    "msle": VALUES,
    "poisson": VALUES,                    # counts: rates against the observed numbers
    "cosine_similarity": VALUES,          # each row's direction against the target row's
}
# Losses that read the target's own values (errors relative to them, or their logs): a scaled
# target is other values, so the train stage refuses them on one.
UNSCALED_LOSSES = ("mape", "msle", "poisson")
# Losses that read the output as a rate, and the output activations that keep it non-negative
# (on a linear output a negative rate makes the loss's log NaN).
RATE_LOSSES = ("poisson",)
NON_NEGATIVE_ACTIVATIONS = ("softplus", "exponential", "relu", "relu6", "sigmoid", "hard_sigmoid")


def _head_task(task: str, width: int) -> str:
    """The task a head is checked and given defaults as: a binary target on a two-unit
    softmax scores two classes, so it reads its labels as a multiclass head does."""
    return "multiclass" if task == "binary" and width == 2 else task


def _check_fits(what: str, plural: str, name: str, fits: dict[str, tuple[str, ...]], node: str,
                target_name: str, target: TargetSpec, width: int) -> None:
    """Raises a ValueError that names what would fit when `name` (a loss or metric) cannot read
    the target; `fits` maps every name of its kind to the tasks it reads."""
    task = _head_task(target.task, width)
    if task in fits[name]:
        return
    units = f"{width} unit{'s' if width != 1 else ''}"
    read_as = f", read as {task}" if task != target.task else ""
    allowed = [n for n, tasks in fits.items() if task in tasks]
    raise ValueError(f"output '{node}': {what} '{name}' does not fit target '{target_name}', which is "
                     f"{target.task} ({units}{read_as}); {plural} for it: {', '.join(allowed)}")


def _make_head(node: str, out: dict, spec: DataSpec, activation: str, width: int, train_cfg,
               output_activation: str) -> Head:
    """output_activation: what the output's values come out of (the head's, or the layer's own)."""
    ocfg, target = out["cfg"], spec.targets[out["target"]]
    task = _head_task(target.task, width)  # a binary target may also sit on a two-unit softmax
    if width != target.width and task == target.task:
        raise ValueError(f"output '{node}' has {width} units but target '{out['target']}' needs "
                         f"{target.width} ({target.task}); use units: auto")
    loss = ocfg.loss
    if loss == "auto":
        loss = "perceptron" if activation == "step" else AUTO_LOSS[task]
    name, params = split_named(loss)
    name = LOSSES.canonical(name)
    _check_fits("loss", "losses", name, LOSS_TASKS, node, out["target"], target, width)
    if name in RATE_LOSSES and output_activation not in NON_NEGATIVE_ACTIVATIONS:
        raise ValueError(f"output '{node}': loss '{name}' reads the output as a rate, which activation "
                         f"'{output_activation}' can make negative; give the output layer one of: "
                         f"{', '.join(NON_NEGATIVE_ACTIVATIONS)}")
    metrics = list(ocfg.metrics) or _default_metrics(target.task, train_cfg)
    metric_tasks = {m: metric.tasks for m, metric in METRICS.items()}
    for m in metrics:
        _check_fits("metric", "metrics", METRICS.canonical(m), metric_tasks, node, out["target"], target, width)
    return Head(node, out["target"], target.task, activation, name, params, ocfg.weight, metrics)


def _default_metrics(task: str, train_cfg) -> list[str]:
    explicit = [m for m in train_cfg.metrics if m != "auto"]
    return explicit or DEFAULT_METRICS.get(task, ["mae"])

"""Training an MLP without autograd's graph (train/direct.py): the same weights and history as
training through autograd, bit for bit, for every layer, loss and training option it takes; and
autograd for every model it does not."""

from __future__ import annotations

import pytest
import torch

from densepipe import _C, config
from densepipe.nn.layers import DROPOUTS
from densepipe.nn.model import DataSpec, TargetSpec, build_model, l1_l2, l1_l2_grad
from densepipe.train.callbacks import Callback
from densepipe.train.direct import DirectStep, _ChainPlan, _Plan
from densepipe.train.loop import DivergenceError, Split, Trainer

WALL_CLOCK = ("epoch_seconds", "samples_per_sec")
build_dropout_layer = DROPOUTS["dropout"]
ROWS, FEATURES, CLASSES = 203, 6, 4  # 203: a short last batch at batch size 32
MLP = [{"type": "dense", "units": 16, "activation": "relu"},
       {"type": "dense", "units": 8, "activation": "tanh"},
       {"type": "dense", "units": "auto", "activation": "auto", "name": "out"}]


def _data(task: str, width: int) -> tuple[Split, DataSpec]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(ROWS, FEATURES, generator=gen)
    if task == "multiclass":
        y = (x[:, :2].sum(1) * 1.5).round().clamp(-1, 2).long() + 1    # (N,) class ids 0..3
    elif task == "binary":
        y = (x[:, 0] > x[:, 1]).long()
    else:
        y = x[:, :width] * 2 - x[:, 1:width + 1] + 0.1 * torch.randn(ROWS, width, generator=gen)
    classes = list(range(width)) if task == "multiclass" else [0, 1] if task == "binary" else None
    spec = DataSpec({"features": FEATURES}, {"target": TargetSpec(task, width, classes)})
    return Split({"features": x}, {"target": y}), spec


def _graph_data() -> tuple[Split, DataSpec]:
    """Two inputs (the features' halves) and two targets: class ids and a value."""
    data, spec = _data("multiclass", CLASSES)
    x, half = data.inputs["features"], FEATURES // 2
    size = x[:, :1] - 0.5 * x[:, 3:4]
    spec = DataSpec({"a": half, "b": FEATURES - half},
                    {"target": spec.targets["target"], "size": TargetSpec("regression", 1)})
    return Split({"a": x[:, :half], "b": x[:, half:]}, {"target": data.targets["target"], "size": size}), spec


def _fit(layers, task="multiclass", width=CLASSES, *, direct: bool, class_weights=None, freeze=(),
         outputs=None, kernels="fused", inputs=None, **train):
    data, spec = _graph_data() if task == "graph" else _data(task, width)
    model_cfg = {"layers": layers, "kernels": kernels, **({"outputs": outputs} if outputs else {}),
                 **({"inputs": inputs} if inputs else {})}
    train = {"epochs": 3, "batch_size": 32, "progress": "quiet", "optimizer": {"name": "adam", "lr": 0.01}, **train}
    cfg = config.parse({"model": model_cfg, "train": train})
    model = build_model(cfg.model, cfg.train, spec, seed=1)
    for name in freeze:
        model.get_parameter(name).requires_grad_(False)
    trainer = Trainer(model, cfg.train, seed=1, class_weights=class_weights)
    assert trainer.direct is not None, "the model should qualify for training without autograd's graph"
    if not direct:
        trainer.direct = None
    history = trainer.fit(data)
    records = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in history.records]
    return model.state_dict(), records


def _assert_same_training(layers, task="multiclass", width=CLASSES, **kw):
    direct_weights, direct_history = _fit(layers, task, width, direct=True, **kw)
    graph_weights, graph_history = _fit(layers, task, width, direct=False, **kw)
    assert direct_weights.keys() == graph_weights.keys()
    for key, value in graph_weights.items():
        assert torch.equal(direct_weights[key], value), key
    assert direct_history == graph_history
    first, last = direct_history[0]["loss"], direct_history[-1]["loss"]
    assert last < first  # it trained: equal because both learned the same, not because neither moved


CASES = {
    "softmax classifier": dict(layers=MLP),
    "class weights": dict(layers=MLP, class_weights={"target": torch.tensor([0.5, 2.0, 1.0, 3.0])}),
    "loss weight": dict(layers=MLP, outputs={"out": {"weight": 0.25}}),
    "frozen kernel and bias": dict(layers=MLP, freeze=("layers.dense_1.weight", "layers.out.bias")),
    "frozen first layer": dict(layers=MLP, freeze=("layers.dense_1.weight", "layers.dense_1.bias")),
    "no biases, pre-activation kept": dict(layers=[
        {"type": "dense", "units": 12, "activation": "gelu", "use_bias": False},
        {"type": "dense", "units": 12, "activation": "leaky_relu", "alpha": 0.1},
        {"type": "dense", "units": "auto", "activation": "auto", "use_bias": False, "name": "out"}]),
    "one layer": dict(layers=[{"type": "dense", "units": "auto", "activation": "auto"}]),
    "sgd, clipping, constraint": dict(
        layers=[{**MLP[0], "constraint": {"name": "max_norm", "max_value": 1.0}}, MLP[2]],
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, clip={"norm": 0.5}),
    "categorical cross-entropy, label smoothing": dict(layers=MLP, outputs={"out": {
        "loss": {"name": "categorical_crossentropy", "label_smoothing": 0.1}}}),
    "sparse cross-entropy from probabilities": dict(layers=MLP, outputs={"out": {
        "loss": {"name": "sparse_categorical_crossentropy", "from_logits": False}}}),
    "dropout": dict(layers=[MLP[0], {"type": "dropout", "rate": 0.3}, MLP[1], {"type": "dropout", "rate": 0.1},
                            MLP[2]]),
    "gaussian dropout": dict(layers=[MLP[0], {"type": "gaussian_dropout", "rate": 0.2}, MLP[1], MLP[2]]),
    "dropout of rate 0": dict(layers=[MLP[0], {"type": "dropout", "rate": 0.0}, MLP[2]]),
    "dropout on the input": dict(layers=[{"type": "dropout", "rate": 0.2}, MLP[0], MLP[2]]),
    "dropout after a frozen layer": dict(layers=[MLP[0], {"type": "dropout", "rate": 0.3}, MLP[1], MLP[2]],
                                         freeze=("layers.dense_1.weight", "layers.dense_1.bias")),
    "batchnorm and dropout between dense layers": dict(
        layers=[MLP[0], {"type": "batchnorm"}, {"type": "dropout", "rate": 0.2}, MLP[1], {"type": "batchnorm"},
                MLP[2]]),
    "batchnorm on the input": dict(layers=[{"type": "batchnorm", "momentum": 0.9}, *MLP]),
    "frozen batchnorm": dict(layers=[MLP[0], {"type": "batchnorm"}, MLP[2]],
                             freeze=("layers.batchnorm_2.weight", "layers.batchnorm_2.bias")),
    "batchnorm, a last batch of one row": dict(layers=[MLP[0], {"type": "batchnorm"}, MLP[2]], batch_size=101),
    "noise and an activation on the input": dict(
        layers=[{"type": "gaussian_noise", "stddev": 0.3}, {"type": "activation", "activation": "tanh"}, *MLP]),
    "kernel penalty": dict(layers=[{**MLP[0], "l2": 0.01}, MLP[1], {**MLP[2], "l1": 0.003}]),
    "kernel and bias penalties, both rates": dict(
        layers=[{**MLP[0], "l1": 0.002, "l2": 0.01, "bias_l1": 0.001, "bias_l2": 0.02}, MLP[1], MLP[2]],
        optimizer={"name": "sgd", "lr": 0.1}),
    "penalties with dropout and batchnorm": dict(
        layers=[{**MLP[0], "l2": 0.05}, {"type": "batchnorm"}, {"type": "dropout", "rate": 0.2},
                {**MLP[1], "l1": 0.01}, MLP[2]]),
    "penalty on a frozen layer": dict(layers=[{**MLP[0], "l2": 0.01}, {**MLP[1], "l2": 0.01}, MLP[2]],
                                      freeze=("layers.dense_1.weight", "layers.dense_1.bias")),
    "only frozen weights penalized": dict(layers=[{**MLP[0], "l2": 0.01}, MLP[1], MLP[2]],
                                          freeze=("layers.dense_1.weight",)),
    "alpha dropout": dict(layers=[{**MLP[0], "activation": "selu"}, {"type": "alpha_dropout", "rate": 0.2}, MLP[2]]),
    "layernorm": dict(layers=[MLP[0], {"type": "layernorm"}, MLP[1], {"type": "layernorm", "center": False}, MLP[2]]),
    "frozen layernorm behind a frozen layer": dict(
        layers=[MLP[0], {"type": "layernorm"}, MLP[1], MLP[2]],
        freeze=("layers.dense_1.weight", "layers.dense_1.bias", "layers.layernorm_2.weight")),
    "noise behind a batchnorm and after a dense layer": dict(
        layers=[{"type": "batchnorm"}, {"type": "gaussian_noise", "stddev": 0.3}, MLP[0],
                {"type": "gaussian_noise", "stddev": 0.1}, MLP[2]]),
    "standalone activations": dict(layers=[MLP[0], {"type": "activation", "activation": "relu"}, MLP[1],
                                           {"type": "activation", "activation": "softplus"}, MLP[2]]),
    "reference kernels": dict(layers=MLP, kernels="reference"),
    "reference kernels, dropout, batchnorm": dict(
        layers=[MLP[0], {"type": "dropout", "rate": 0.2}, MLP[1], {"type": "batchnorm"}, MLP[2]],
        kernels="reference"),
    "two inputs, two outputs on one trunk, class weights": dict(
        task="graph", inputs={"a": {}, "b": {}},
        layers=[{"type": "concatenate", "inputs": ["a", "b"], "name": "both"},
                {**MLP[0], "inputs": ["both"], "name": "trunk"},
                {"type": "dense", "units": "auto", "activation": "auto", "inputs": ["trunk"], "name": "cls"},
                {"type": "dense", "units": "auto", "inputs": ["trunk"], "name": "size"}],
        outputs={"cls": {"target": "target"}, "size": {"target": "size", "weight": 0.5}},
        class_weights={"target": torch.tensor([0.5, 2.0, 1.0, 3.0])}),
    "a layer read three times, an input read twice": dict(
        task="graph", inputs={"a": {}, "b": {}},
        layers=[{"type": "concatenate", "inputs": ["a", "b"], "name": "both"},
                {**MLP[0], "inputs": ["both"], "name": "trunk"},
                {"type": "dense", "units": 16, "activation": "tanh", "inputs": ["trunk"], "name": "side"},
                {"type": "add", "inputs": ["trunk", "side"], "name": "res"},
                {"type": "dropout", "rate": 0.2, "inputs": ["res"], "name": "drop"},
                {"type": "dense", "units": 8, "activation": "relu", "inputs": ["a"], "name": "a_only"},
                {"type": "concatenate", "inputs": ["drop", "a_only"], "name": "joined"},
                {"type": "dense", "units": "auto", "activation": "auto", "inputs": ["joined"], "name": "cls"},
                {"type": "dense", "units": "auto", "inputs": ["trunk"], "name": "size"}],
        outputs={"cls": {"target": "target", "weight": 2.0}, "size": {"target": "size"}}),
    "an output read by another layer": dict(
        task="graph", inputs={"a": {}, "b": {}},
        layers=[{"type": "concatenate", "inputs": ["a", "b"], "name": "both"},
                {**MLP[0], "inputs": ["both"], "name": "trunk"},
                {"type": "batchnorm", "inputs": ["trunk"], "name": "norm"},
                {"type": "dense", "units": "auto", "inputs": ["norm"], "name": "size"},
                {"type": "concatenate", "inputs": ["norm", "size"], "name": "with_size"},
                {"type": "dense", "units": "auto", "activation": "auto", "inputs": ["with_size"], "name": "cls"}],
        outputs={"size": {"target": "size"}, "cls": {"target": "target"}}),
    "binary cross-entropy": dict(layers=MLP, task="binary", width=1),
    "binary, class weights": dict(layers=MLP, task="binary", width=1,
                                  class_weights={"target": torch.tensor([3.0, 0.5])}),
    "regression, mse": dict(layers=MLP, task="regression", width=2),
    "regression, huber": dict(layers=MLP, task="regression", width=2,
                              outputs={"out": {"loss": {"name": "huber", "delta": 0.5}}}),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_same_weights_and_history_as_autograd(case):
    _assert_same_training(**case)


def test_frozen_parameters_are_left_without_gradient():
    data, spec = _data("multiclass", CLASSES)
    cfg = config.parse({"model": {"layers": MLP}, "train": {"progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, spec)
    step = DirectStep.build(model, torch.device("cpu"), world=1)
    frozen = model.layers["dense_1"].weight.requires_grad_(False)
    seed = torch.tensor(1.0 / ROWS)
    step.plan().grads(data.inputs, data.targets, seed, dict.fromkeys(model.heads))
    assert frozen.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


CHAIN_PLANS = {  # model config, parameters to freeze, class weights
    "softmax classifier": ({"layers": MLP}, (), None),
    "loss weight and class weights": ({"layers": MLP, "outputs": {"out": {"weight": 0.25}}}, (),
                                      torch.tensor([0.5, 2.0, 1.0, 3.0])),
    "frozen first layer": ({"layers": MLP}, ("layers.dense_1.weight", "layers.dense_1.bias"), None),
    "nothing trains": ({"layers": MLP[2:]}, ("layers.out.weight", "layers.out.bias"), None),
}


@pytest.mark.parametrize(("model_cfg", "freeze", "class_weights"), CHAIN_PLANS.values(), ids=CHAIN_PLANS.keys())
def test_an_mlp_steps_without_walking_the_graph_and_gets_the_walks_gradients(model_cfg, freeze, class_weights):
    data, _ = _data("multiclass", CLASSES)
    model = _model(model_cfg)
    for name in freeze:
        model.get_parameter(name).requires_grad_(False)
    plan = DirectStep.build(model, torch.device("cpu"), world=1).plan()
    assert isinstance(plan, _ChainPlan)
    seed = torch.tensor(1.0 / ROWS)
    (head,) = model.heads
    row_weights = {head: None if class_weights is None else class_weights[data.targets["target"]]}
    results = []
    for steps in (plan, _Plan(plan.step, plan.nodes)):  # the MLP's own steps, then the graph walk's
        raw, losses = steps.grads(data.inputs, data.targets, seed, row_weights)
        results.append((raw, losses, {name: p.grad for name, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (raw, losses, grads), (walk_raw, walk_losses, walk_grads) = results
    assert raw.keys() == walk_raw.keys() == losses.keys() == walk_losses.keys() == {head}
    assert torch.equal(raw[head], walk_raw[head]) and torch.equal(losses[head], walk_losses[head])
    for name, g in walk_grads.items():
        assert (g is None) == (name in freeze), name
        assert (grads[name] is None) if g is None else torch.equal(grads[name], g), name


class _FreezeAfterFirstEpoch(Callback):
    """Freezes one parameter once the first epoch ends, as user code between epochs may."""

    def __init__(self, name: str):
        super().__init__(None)
        self.name, self.after_first = name, None

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 0:
            param = trainer.model.get_parameter(self.name)
            param.requires_grad_(False)
            self.after_first = param.detach().clone()


def test_each_epoch_plans_with_the_parameters_that_train_then():
    data, spec = _data("multiclass", CLASSES)
    cfg = config.parse({"model": {"layers": MLP},
                        "train": {"epochs": 3, "batch_size": 32, "progress": "quiet",
                                  "optimizer": {"name": "sgd", "lr": 0.1}}})
    model = build_model(cfg.model, cfg.train, spec, seed=1)
    trainer = Trainer(model, cfg.train, seed=1)
    assert trainer.direct is not None
    freeze = _FreezeAfterFirstEpoch("layers.dense_1.weight")
    trainer.callbacks.append(freeze)
    others = {name: p.detach().clone() for name, p in model.named_parameters() if name != freeze.name}
    trainer.fit(data)
    frozen = model.get_parameter(freeze.name)
    assert frozen.grad is None and torch.equal(frozen, freeze.after_first)  # epochs 2 and 3 left it alone
    assert all(not torch.equal(p, others[name]) for name, p in model.named_parameters() if name in others)


def _model(model_cfg, task="multiclass", width=CLASSES, **train):
    _, spec = _data(task, width)
    if "inputs" in model_cfg:
        spec = DataSpec({name: FEATURES for name in model_cfg["inputs"]}, spec.targets)
    cfg = config.parse({"model": model_cfg, "train": {"progress": "quiet", **train}})
    return build_model(cfg.model, cfg.train, spec)


OUT = MLP[2]
AUTOGRAD_MODELS = {
    "activity penalty": {"layers": [{**MLP[0], "activity_l1": 0.01}, OUT]},
    "an output read after its head's activation": {
        "layers": [{**MLP[0], "name": "trunk"}, {"type": "dense", "units": "auto", "activation": "auto",
                                                 "inputs": ["trunk"], "name": "out"},
                   {"type": "dense", "units": "auto", "activation": "auto", "inputs": ["out"], "name": "again"}],
        "outputs": {"out": {"target": "target"}, "again": {"target": "target"}}},
}


@pytest.mark.parametrize("model_cfg", AUTOGRAD_MODELS.values(), ids=AUTOGRAD_MODELS.keys())
def test_other_models_train_through_autograd(model_cfg):
    assert DirectStep.build(_model(model_cfg), torch.device("cpu"), world=1) is None


@pytest.mark.parametrize(("device", "world"), [("cuda", 1), ("cpu", 2)])
def test_gpu_and_several_processes_train_through_autograd(device, world):
    # Decided from the device's type alone: no GPU is needed to ask.
    assert DirectStep.build(_model({"layers": MLP}), torch.device(device), world=world) is None


HOOKED = {  # layer config, its name, whether training may still skip autograd's graph
    "chained dense layer": (MLP, "dense_2", False),
    "batchnorm": ([MLP[0], {"type": "batchnorm"}, MLP[2]], "batchnorm_2", False),
    "dropout": ([MLP[0], {"type": "dropout", "rate": 0.2}, MLP[2]], "dropout_2", False),
    "layernorm, called as itself": ([MLP[0], {"type": "layernorm"}, MLP[2]], "layernorm_2", True),
}


@pytest.mark.parametrize(("layers", "name", "direct"), HOOKED.values(), ids=HOOKED.keys())
def test_a_hooked_layer_sees_every_batch(layers, name, direct):
    data, spec = _data("multiclass", CLASSES)
    cfg = config.parse({"model": {"layers": layers},
                        "train": {"epochs": 1, "batch_size": 64, "progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, spec)
    trainer = Trainer(model, cfg.train)
    assert trainer.direct is not None and trainer.direct.usable()
    calls = []
    model.layers[name].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    assert trainer.direct.usable() == direct
    trainer.fit(data)
    assert len(calls) == -(-ROWS // 64)  # one call per training step: the hook saw every batch


def test_dropout_layer_multiplies_by_its_noise():
    x = torch.randn(64, 33, requires_grad=True)
    layer = build_dropout_layer(0.3)
    torch.manual_seed(5)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    torch.manual_seed(5)
    noise = layer.multiplier(x)  # what training without autograd multiplies by
    assert torch.equal(y, x * noise) and torch.equal(gx, 2 * y * noise)
    assert 0 < (y == 0).float().mean() < 0.5  # some units dropped, most kept
    layer.eval()
    assert layer(x) is x and layer.multiplier(x) is None


@pytest.mark.parametrize(("l1", "l2"), [(0.01, 0.0), (0.0, 0.03), (0.002, 0.05), (0.0, 0.0)])
def test_penalty_gradient_is_autograds(l1, l2):
    t = torch.randn(17, 9, generator=torch.Generator().manual_seed(4))
    t[0, :3] = 0.0  # abs has a kink there: autograd's gradient is 0
    t.requires_grad_()
    penalty = l1_l2(t, l1, l2)
    if penalty is None:
        assert l1_l2_grad(t, l1, l2) is None
        return
    (expected,) = torch.autograd.grad(penalty, t)
    assert torch.equal(l1_l2_grad(t.detach(), l1, l2), expected)


# ------------------------------------------------- an MLP classifier's epoch in one call
EPOCH_CALLS = {name: CASES[name] for name in (
    "softmax classifier", "class weights", "loss weight", "frozen kernel and bias", "frozen first layer",
    "no biases, pre-activation kept", "one layer", "sgd, clipping, constraint")}
EPOCH_CALLS["nothing trains"] = dict(layers=MLP[2:], freeze=("layers.out.weight", "layers.out.bias"))


@pytest.mark.parametrize("case", EPOCH_CALLS.values(), ids=EPOCH_CALLS.keys())
def test_an_mlp_classifier_trains_each_epoch_in_one_call_as_its_python_steps_do(case, monkeypatch):
    calls = []
    one_call = _C.chain_classifier_epoch
    monkeypatch.setattr(_C, "chain_classifier_epoch", lambda *a: calls.append(a) or one_call(*a))
    weights, history = _fit(direct=True, **case)
    assert len(calls) == 3  # every epoch
    monkeypatch.setattr(_ChainPlan, "runs_epochs", lambda self, dense: False)  # the Python loop's steps
    step_weights, step_history = _fit(direct=True, **case)
    assert len(calls) == 3
    for key, value in step_weights.items():
        assert torch.equal(weights[key], value), key
    assert history == step_history  # losses, metrics, gradient norms: the same values


NOT_IN_ONE_CALL = {  # model config, task, width: MLPs whose steps stay in Python
    "binary cross-entropy": ({"layers": MLP}, "binary", 1),
    "regression": ({"layers": MLP}, "regression", 2),
    "from probabilities": ({"layers": MLP, "outputs": {"out": {"loss": {
        "name": "sparse_categorical_crossentropy", "from_logits": False}}}}, "multiclass", CLASSES),
    "categorical cross-entropy": ({"layers": MLP, "outputs": {"out": {"loss": "categorical_crossentropy"}}},
                                  "multiclass", CLASSES),
    "kernel penalty": ({"layers": [{**MLP[0], "l2": 0.01}, MLP[2]]}, "multiclass", CLASSES),
}


@pytest.mark.parametrize(("model_cfg", "task", "width"), NOT_IN_ONE_CALL.values(), ids=NOT_IN_ONE_CALL.keys())
def test_other_mlps_step_in_python(model_cfg, task, width):
    model = _model(model_cfg, task, width)
    plan = DirectStep.build(model, torch.device("cpu"), world=1).plan()
    assert isinstance(plan, _ChainPlan)
    assert not plan.runs_epochs([m.weight for m in model.dense_layers().values()])


def test_a_graph_steps_in_python():
    model = _model({"layers": [MLP[0], {"type": "dropout", "rate": 0.2}, MLP[2]]})
    plan = DirectStep.build(model, torch.device("cpu"), world=1).plan()
    assert not isinstance(plan, _ChainPlan)
    assert not plan.runs_epochs([m.weight for m in model.dense_layers().values()])


def test_the_one_call_logs_norms_only_of_the_chains_own_weights():
    model, other = _model({"layers": MLP}), _model({"layers": MLP})
    plan = DirectStep.build(model, torch.device("cpu"), world=1).plan()
    assert plan.runs_epochs([m.weight for m in model.dense_layers().values()])
    assert not plan.runs_epochs([m.weight for m in other.dense_layers().values()])
    assert not plan.runs_epochs([m.weight for m in model.dense_layers().values()][1:])


def _diverging_fit():
    data, spec = _data("multiclass", CLASSES)
    relu = [{**MLP[0], "units": 32}, {**MLP[1], "activation": "relu"}, MLP[2]]
    cfg = config.parse({"model": {"layers": relu},
                        "train": {"epochs": 6, "batch_size": 32, "progress": "quiet",
                                  "optimizer": {"name": "sgd", "lr": 1e-2},
                                  "callbacks": [{"type": "exponential_decay", "gamma": 1e8}]}})
    model = build_model(cfg.model, cfg.train, spec, seed=1)
    trainer = Trainer(model, cfg.train, seed=1)
    with pytest.raises(DivergenceError) as err:
        trainer.fit(data)
    return str(err.value), model.state_dict(), len(trainer.history)


def test_a_diverging_epoch_in_one_call_names_the_batch_the_python_steps_name(monkeypatch):
    msg, weights, good = _diverging_fit()
    assert good >= 1 and f"epoch {good + 1}, batch" in msg
    monkeypatch.setattr(_ChainPlan, "runs_epochs", lambda self, dense: False)
    step_msg, step_weights, step_good = _diverging_fit()
    assert (msg, good) == (step_msg, step_good)
    for key, value in step_weights.items():
        assert torch.isfinite(value).all() and torch.equal(weights[key], value), key


def test_an_error_in_the_update_stops_the_epoch_with_its_own_type_and_message():
    data, spec = _data("multiclass", CLASSES)
    cfg = config.parse({"model": {"layers": MLP}, "train": {"epochs": 2, "batch_size": 32, "progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, spec, seed=1)
    trainer = Trainer(model, cfg.train, seed=1)
    steps = []

    def third_step_fails(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise ValueError("a step hook refused the update")

    trainer.optimizer.register_step_pre_hook(third_step_fails)
    with pytest.raises(ValueError, match="a step hook refused the update"):
        trainer.fit(data)
    assert len(steps) == 3 and len(trainer.history) == 0


# ------------------------------------------------- a step's rows split across threads
SPLIT_ROWS = 101  # 2 blocks on 2 threads: rows [0, 50) and [50, 101)


def _split_case(weighted: bool):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SPLIT_ROWS + 20, FEATURES, generator=gen)  # more rows than the step takes
    target = torch.randint(0, CLASSES, (SPLIT_ROWS + 20,), generator=gen)
    order = torch.randperm(SPLIT_ROWS + 20, generator=gen)[:SPLIT_ROWS]
    weights = [torch.randn(16, FEATURES, generator=gen).requires_grad_(),
               torch.randn(CLASSES, 16, generator=gen).requires_grad_()]
    biases = [torch.randn(16, generator=gen).requires_grad_(), torch.randn(CLASSES, generator=gen).requires_grad_()]
    class_weight = torch.tensor([0.5, 2.0, 1.0, 3.0]) if weighted else None
    return x, target, order, weights, biases, class_weight


def _one_step_epoch(x, target, order, weights, biases, class_weight):
    """One step over all of `order` in one call, with a head weight of 0.5 (in the log's total only: the
    seed passed in is the caller's, head weight included); returns (log row, logits, each parameter's
    gradient)."""
    seen = []
    log, out = _C.chain_classifier_epoch(
        x, target, order, x.new_empty(len(order), FEATURES), [(0, len(order))], [torch.tensor(1 / len(order))],
        class_weight, weights, biases, ["relu", "linear"], [0.0, 0.0], [True, True], [True, True], True, 0.5,
        lambda: seen.append([p.grad.clone() for p in weights + biases]))
    return log[0], out, seen[0]


def _block_by_ops(x, target, rows, step_rows, weights, biases, class_weight):
    """A step's calls on some of its rows, made one by one: (logits, weighted row losses, gradients).
    step_rows: how many rows the whole step has (its seed is 1 / step_rows, as _one_step_epoch's)."""
    ops = torch.ops.densepipe
    xb, ids = x[rows], target[rows]
    coef = torch.tensor(1 / step_rows)
    coef = coef if class_weight is None else coef * class_weight[ids]
    with torch._C._AutoDispatchBelowAutograd():
        out, hidden, preacts = ops.dense_chain_forward(xb, weights, biases, ["relu", "linear"], [0.0, 0.0])
        loss, grad = ops.softmax_cross_entropy(out, ids)
        grad.mul_(coef.unsqueeze(1) if coef.dim() else coef)
        _, dws, dbs = ops.dense_chain_backward(grad, xb, hidden, out, weights, preacts, ["relu", "linear"],
                                               [0.0, 0.0], [True, True], [True, True], False)
    return out, loss if class_weight is None else loss * class_weight[ids], [*dws, *dbs]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "class weights"])
def test_a_large_step_splits_its_rows_across_threads_and_sums_the_blocks_gradients_in_order(threads, weighted):
    x, target, order, weights, biases, class_weight = _split_case(weighted)
    threads(2)
    log, out, grads = _one_step_epoch(x, target, order, weights, biases, class_weight)
    blocks = [_block_by_ops(x, target, order[rows], SPLIT_ROWS, weights, biases, class_weight)
              for rows in (slice(0, 50), slice(50, SPLIT_ROWS))]
    assert torch.equal(out, torch.cat([b[0] for b in blocks]))
    part = torch.cat([b[1] for b in blocks]).sum()
    assert torch.equal(log[:2], torch.stack([part * 0.5, part]))
    for i, g in enumerate(grads):
        assert torch.equal(g, blocks[0][2][i] + blocks[1][2][i]), i
    assert torch.equal(log[2:], torch.stack([grads[0].norm(), grads[1].norm()]))

    threads(1)  # one block: the calls on all rows at once
    log1, out1, grads1 = _one_step_epoch(x, target, order, weights, biases, class_weight)
    _, _, whole = _block_by_ops(x, target, order, SPLIT_ROWS, weights, biases, class_weight)
    assert all(torch.equal(g, w) for g, w in zip(grads1, whole, strict=True))
    assert all(torch.allclose(g, g1, rtol=1e-5, atol=1e-6) for g, g1 in zip(grads, grads1, strict=True))


def test_a_step_splits_only_into_blocks_of_32_rows_or_more(threads):
    x, target, order, weights, biases, _ = _split_case(False)
    threads(2)
    order = order[:63]  # 2 blocks would have 31 and 32 rows: one block
    _, _, grads = _one_step_epoch(x, target, order, weights, biases, None)
    _, _, whole = _block_by_ops(x, target, order, len(order), weights, biases, None)
    assert all(torch.equal(g, w) for g, w in zip(grads, whole, strict=True))


def test_training_with_split_steps_agrees_with_the_python_steps_and_repeats_exactly(threads, monkeypatch):
    threads(2)
    case = dict(layers=MLP, batch_size=64)  # 64-row steps: two blocks of 32
    weights, history = _fit(direct=True, **case)
    again, again_history = _fit(direct=True, **case)
    assert all(torch.equal(v, again[k]) for k, v in weights.items()) and history == again_history
    monkeypatch.setattr(_ChainPlan, "runs_epochs", lambda self, dense: False)  # the Python loop's steps
    step_weights, step_history = _fit(direct=True, **case)
    for key, value in step_weights.items():
        assert torch.allclose(weights[key], value, rtol=1e-4, atol=1e-5), key
    for ours, theirs in zip(history, step_history, strict=True):
        assert ours.keys() == theirs.keys()
        assert all(ours[k] == pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in theirs.items()), ours

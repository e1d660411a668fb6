"""Values that only the code behind a name can judge (an initializer's or a loss's arguments,
an optimizer's combination of settings) are refused by `densepipe validate`, before any
work, with the key path, the value, what is allowed and "did you mean"; and the resolved
config shows the values training will use."""

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from densepipe import cli, config
from densepipe.nn.initializers import INITIALIZERS
from densepipe.nn.losses import LOSSES
from densepipe.stages.train import class_weights
from densepipe.train.optimizers import OPTIMIZERS, build_optimizer

OUT = [{"type": "dense", "units": "auto", "activation": "auto"}]


def dense(**kw) -> dict:
    return {"model": {"layers": [{"type": "dense", "units": 4, **kw}, *OUT]}}


def train(**kw) -> dict:
    return {"model": {"layers": OUT}, "train": kw}


def error(raw) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    return str(err.value)


@pytest.mark.parametrize("raw,expected", [
    # initializer arguments: names from the initializer's signature, values by what it accepts
    (dense(initializer={"name": "constant", "valu": 0.3}),
     r"model\.layers\[0\]\.initializer: initializer constant: unknown argument 'valu' \(did you mean "
     r"'value'\?\); constant takes value$"),
    (dense(initializer={"name": "random_normal", "stddev": -1}),
     r"model\.layers\[0\]\.initializer: initializer random_normal: stddev: Input should be greater than or "
     r"equal to 0 \(got -1\)"),
    (dense(initializer={"name": "constant", "value": "abc"}),
     r"model\.layers\[0\]\.initializer: initializer constant: value: Input should be a valid number.*"
     r"\(got 'abc'\)"),
    (dense(initializer={"name": "variance_scaling", "mode": "fan"}),
     r"initializer variance_scaling: mode: Input should be 'fan_in', 'fan_out' or 'fan_avg' \(got 'fan'\)"),
    (dense(initializer={"name": "zeros", "value": 1}),
     r"initializer zeros: unknown argument 'value'; zeros takes no arguments"),
    (dense(initializer={"name": "random_uniform", "minval": 1, "maxval": 0}),
     r"model\.layers\[0\]\.initializer: initializer \{name: random_uniform, minval: 1\.0, maxval: 0\.0\} "
     r"cannot fill a kernel: .*from=1 > to=0"),
    ({"model": {"layers": OUT, "initializer": {"name": "random_normal", "stdev": 0.1}}},
     r"model\.initializer: initializer random_normal: unknown argument 'stdev' \(did you mean 'stddev'\?\)"),
    # a bias is 1-D: schemes that need a matrix are refused there, with those that fit
    (dense(bias_initializer="orthogonal"),
     r"model\.layers\[0\]\.bias_initializer: initializer orthogonal cannot fill a bias \(1-D\): Only tensors "
     r"with 2 or more dimensions are supported; initializers for a bias: constant, .*zeros \(got 'orthogonal'\)"),
    (dense(bias_initializer={"name": "sparse", "sparsity": 0.5}),
     r"model\.layers\[0\]\.bias_initializer: initializer sparse cannot fill a bias \(1-D\)"),
    # loss arguments, in train.loss and per output of a graph model
    (train(loss={"name": "huber", "delt": 2}),
     r"train\.loss: loss huber: unknown argument 'delt' \(did you mean 'delta'\?\); huber takes delta$"),
    (train(loss={"name": "huber", "delta": -2}),
     r"train\.loss: loss huber: delta: Input should be greater than 0 \(got -2\)"),
    (train(loss={"name": "bce", "label_smoothing": 1.5}),
     r"train\.loss: loss binary_crossentropy: label_smoothing: Input should be less than or equal to 1 "
     r"\(got 1\.5\)"),
    (train(loss={"name": "cce", "from_logits": "sometimes"}),
     r"train\.loss: loss categorical_crossentropy: from_logits: Input should be a valid boolean.* -- or: "
     r"Input should be 'auto' \(got 'sometimes'\)"),
    ({"model": {"layers": OUT, "outputs": {"dense_1": {"loss": {"name": "huber", "delt": 2}}}}},
     r"model\.outputs\.dense_1\.loss: loss huber: unknown argument 'delt' \(did you mean 'delta'\?\)"),
    ({"model": {"layers": OUT, "outputs": {"dense_1": {"loss": {"name": "huber", "delta": 0}}}}},
     r"model\.outputs\.dense_1\.loss: loss huber: delta: Input should be greater than 0 \(got 0\)"),
    # a mapping without its name
    (train(loss={"delta": 2}),
     r"train\.loss: loss \{delta: 2\} has no 'name' key; write it as \{name: huber, delta: 1\.0\}; names: "
     r"binary_crossentropy, .*huber"),
    (dense(initializer={"valu": 0.3}),
     r"model\.layers\[0\]\.initializer: initializer \{valu: 0\.3\} has no 'name' key; write it as "
     r"\{name: constant, value: 0\.1\}; names: constant, "),
    (dense(initializer={"nmae": "he_normal"}),
     r"has no 'name' key \(did you mean 'name' instead of 'nmae'\?\)"),
    # optimizer settings the optimizer itself refuses
    (train(optimizer={"name": "sgd", "nesterov": True}),
     r"train\.optimizer: optimizer sgd refuses these settings: Nesterov momentum requires a momentum and "
     r"zero dampening \(got momentum: 0\.0, nesterov: true, dampening: 0\.0\)"),
    (train(optimizer={"name": "sgd", "nesterov": True, "momentum": 0.9, "dampening": 0.1}),
     r"train\.optimizer: optimizer sgd refuses these settings: .*\(got momentum: 0\.9, nesterov: true, "
     r"dampening: 0\.1\)"),
    (train(optimizer={"name": "adam", "betas": [0.9, 1.5]}),
     r"train\.optimizer\.betas\[1\]: Input should be less than 1 \(got 1\.5\)"),
    (train(optimizer={"name": "adamw", "betas": [-0.1, 0.999]}),
     r"train\.optimizer\.betas\[0\]: Input should be greater than or equal to 0 \(got -0\.1\)"),
    # a layer without its type
    ({"model": {"layers": [{"units": 10}]}},
     r"model\.layers\[0\]: a layer needs a 'type'; allowed: dense, dropout, alpha_dropout, gaussian_dropout, "
     r"batchnorm, layernorm, activation, "
     r"prelu, gaussian_noise, activity_regularization, concatenate, add, subtract, multiply, average, maximum, "
     r"minimum, dot \(got \{units: 10\}\)"),
    # class weights
    (train(class_weight="balance"),
     r"train\.class_weight: unknown class_weight \(did you mean 'balanced'\?\); allowed: balanced, or a "
     r"mapping from class label to weight .*\(got 'balance'\)"),
    (train(class_weight={0: 1.0, 1: -5.0}),
     r"train\.class_weight: class weights must be >= 0, got \{1: -5\.0\}$"),
    # YAML's true / yes where a number belongs: not read as 1
    (train(batch_size=True), r"^  train: batch_size: expected a number, got true$"),
    (train(clip={"norm": True}), r"^  train\.clip: norm: expected a number, got true$"),
    (dense(units=True), r"^  model\.layers\[0\]: units: expected a number, got true$"),
    (train(optimizer={"name": "adam", "lr": False}), r"^  train\.optimizer: lr: expected a number, got false$"),
])
def test_refused_with_a_message(raw, expected):
    msg = error(raw)
    assert msg.startswith("invalid params:\n")
    assert re.search(expected, msg, re.MULTILINE), msg


def test_validate_command_refuses_what_training_would(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  layers:\n    - {type: dense, units: 4, bias_initializer: orthogonal}\n"
                    "    - {type: dense, units: auto}\ntrain:\n  optimizer: {name: sgd, nesterov: true}\n")
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "model.layers[0].bias_initializer: initializer orthogonal cannot fill a bias" in err
    assert "train.optimizer: optimizer sgd refuses these settings" in err


@pytest.mark.parametrize("raw", [
    dense(initializer={"name": "variance_scaling", "scale": 2, "mode": "fan_out", "distribution": "uniform"},
          bias_initializer={"name": "constant", "value": 0.1}),
    dense(initializer={"name": "orthogonal", "gain": 2}, bias_initializer="random_normal"),
    dense(initializer={"name": "sparse", "sparsity": 0.5, "stddev": 0.02}),
    train(loss={"name": "huber", "delta": 2}),
    train(loss={"name": "bce", "from_logits": False, "label_smoothing": 0.1}),
    train(loss={"name": "scce", "from_logits": "auto"}),
    train(optimizer={"name": "sgd", "nesterov": True, "momentum": 0.9}),
    train(optimizer={"name": "momentum", "nesterov": True}),   # the momentum optimizer takes no nesterov flag
    train(shuffle=False, optimizer={"name": "adam", "amsgrad": True}),  # true / false where a flag belongs
    dense(use_bias=False),
])
def test_accepted(raw):
    config.parse(raw)


def test_arguments_reach_the_function_as_validated():
    cfg = config.parse(dense(initializer={"name": "Constant", "value": "0.3"}))
    assert cfg.model.layers[0].initializer == {"name": "constant", "value": 0.3}
    cfg = config.parse(train(loss={"name": "smooth_l1", "delta": "2"}))
    assert cfg.train.loss == {"name": "huber", "delta": 2.0}


@pytest.mark.parametrize("vocabulary,registry", [(config._INITIALIZER_ARGS, INITIALIZERS),
                                                 (config._LOSS_ARGS, LOSSES)])
def test_every_argument_has_a_value_rule(vocabulary, registry):
    """A new argument in an initializer or a loss needs its rule here, or any value would pass."""
    for name, fn in registry.items():
        args = set(inspect.signature(fn).parameters) - set(vocabulary.passed_by_code)
        assert args <= set(vocabulary.values), (name, args - set(vocabulary.values))


# ------------------------------------------------------------------- class weights
@pytest.mark.parametrize("written", [{0: 1.0, 1: 5.0}, {"0": 1.0, "1": 5.0}, {1: 5.0}])
def test_class_weight_keys_as_ints_or_text(written):
    cfg = config.parse(train(class_weight=written))
    pre = SimpleNamespace(targets={"target": {"task": "binary", "classes": [0, 1]}})
    weights = class_weights(cfg, pre, {"target": [0, 1, 1]})
    assert weights["target"].tolist() == [1.0, 5.0]


def test_class_weight_keys_round_trip_through_the_resolved_config():
    cfg = config.parse(train(class_weight={0: 1.0, 1: 5.0}))
    resolved = yaml.safe_load(yaml.safe_dump(config.resolved(cfg)))
    assert resolved["train"]["class_weight"] == {"0": 1.0, "1": 5.0}
    assert config.parse(resolved) == cfg


# ------------------------------------------------------------------- the resolved view
def resolved_cli(tmp_path, capsys, raw) -> dict:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["config", str(path), "--resolved"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert config.parse(out) == config.parse(raw)   # round-trips
    return out


def test_resolved_shows_callback_defaults(tmp_path, capsys):
    out = resolved_cli(tmp_path, capsys, train(callbacks=[{"type": "early_stopping", "patience": 3},
                                                          {"type": "reduce_on_plateau", "factor": 0.5}]))
    stop, plateau = out["train"]["callbacks"]
    assert stop == {"type": "early_stopping", "monitor": "val_loss", "min_delta": 0.0, "patience": 3,
                    "mode": "auto", "baseline": None, "restore_best_weights": False, "start_from_epoch": 0}
    assert plateau == {"type": "reduce_on_plateau", "monitor": "val_loss", "factor": 0.5, "patience": 10,
                       "mode": "auto", "min_delta": 1e-4, "cooldown": 0, "min_lr": 0.0}


@pytest.mark.parametrize("name,shown", [
    ("adamw", {"weight_decay": 0.01, "eps": 1e-8}),
    ("adam", {"weight_decay": 0.0, "eps": 1e-8}),
    ("adagrad", {"weight_decay": 0.0, "eps": 1e-10}),
    ("rmsprop", {"weight_decay": 0.0, "eps": 1e-8}),
    ("sgd", {"weight_decay": 0.0, "eps": None, "momentum": 0.0}),   # sgd has no eps
    ("momentum", {"momentum": 0.9, "nesterov": False}),
    ("nesterov", {"momentum": 0.9, "nesterov": True}),
    ("nadam", {"weight_decay": 0.0, "eps": 1e-8, "momentum_decay": 0.004}),
    ("adamax", {"weight_decay": 0.0, "eps": 1e-8, "betas": [0.9, 0.999]}),
])
def test_resolved_shows_the_optimizer_values_used(tmp_path, capsys, name, shown):
    out = resolved_cli(tmp_path, capsys, train(optimizer={"name": name}))["train"]["optimizer"]
    assert out == {**out, **shown}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_filled_in_optimizer_values_build_the_same_optimizer(name):
    def built(cfg):
        return build_optimizer([torch.zeros(1, requires_grad=True)], cfg).defaults
    as_written = config.OptimizerConfig.model_construct(name=name)   # per-optimizer defaults left to it
    assert built(config.parse(train(optimizer={"name": name})).train.optimizer) == built(as_written)


def test_nadam_settings_reach_the_optimizer():
    cfg = config.parse(train(optimizer={"name": "nadam", "lr": 0.01, "momentum_decay": 0.02, "betas": [0.8, 0.99]}))
    opt = build_optimizer([torch.zeros(1, requires_grad=True)], cfg.train.optimizer)
    assert type(opt).__name__ == "NAdam" and type(opt).__module__ == "densepipe.optim.nadam"
    assert {k: opt.defaults[k] for k in ("lr", "momentum_decay", "betas")} == {
        "lr": 0.01, "momentum_decay": 0.02, "betas": (0.8, 0.99)}
    with pytest.raises(config.ConfigError, match=r"train\.optimizer\.momentum_decay: Input should be greater than "
                                                 r"or equal to 0 \(got -1\)"):
        config.parse(train(optimizer={"name": "nadam", "momentum_decay": -1}))

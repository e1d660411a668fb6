"""A loss or metric that cannot read an output's target stops the model build with a message
naming the output, the target, its task and what would fit; every combination that fits trains."""

import argparse
import math
import re

import pytest
import torch
import yaml

from densepipe import cli, config
from densepipe.metrics import METRICS
from densepipe.nn.losses import LOSSES
from densepipe.nn.model import LOSS_TASKS, RATE_LOSSES, DataSpec, TargetSpec, build_model
from densepipe.stages import scale as scale_stage
from densepipe.stages import split as split_stage
from densepipe.train.loop import Split, Trainer

GEN = torch.Generator().manual_seed(0)
ROWS, FEATURES = 48, 4
X = torch.randn(ROWS, FEATURES, generator=GEN)

# name -> (target, output units, output activation, target values as the data stages encode them:
# class ids (N,) for classification, standardized values (N, 1) for regression, the features
# themselves for reconstruction)
HEADS = {
    "binary": (TargetSpec("binary", 1), "auto", "auto", torch.randint(0, 2, (ROWS,), generator=GEN)),
    "binary_on_two_units": (TargetSpec("binary", 1), 2, "softmax", torch.randint(0, 2, (ROWS,), generator=GEN)),
    "multiclass": (TargetSpec("multiclass", 10), "auto", "auto", torch.randint(0, 10, (ROWS,), generator=GEN)),
    "regression": (TargetSpec("regression", 1), "auto", "auto", torch.randn(ROWS, 1, generator=GEN)),
    "reconstruction": (TargetSpec("reconstruction", FEATURES), "auto", "auto", X),
}
CLASS_LOSSES = {"sparse_categorical_crossentropy", "categorical_crossentropy", "kl_divergence", "categorical_hinge"}
VALUE_LOSSES = {"mse", "mae", "huber", "log_cosh"}
RELATIVE_LOSSES = {"mape", "msle", "poisson"}  # relative to the target's own values: not a 0/1 label's
DIRECTION_LOSSES = {"cosine_similarity"}  # each row's direction: a vector of values, not one probability
CLASS_METRICS = {"accuracy", "precision", "recall", "f1", "auc"}
VALUE_METRICS = {"mae", "mse", "rmse", "r2", "mape", "msle"}
RANK_METRICS = {"top_k_accuracy"}  # ranks the class scores: a softmax's only
# What each head can be trained with: a one-unit binary head also takes the value losses and
# metrics (its probability against the 0/1 label); a softmax's scores do not line up with one id.
FITTING_LOSSES = {
    "binary": {"binary_crossentropy", "hinge", "squared_hinge", "perceptron"} | VALUE_LOSSES,
    "binary_on_two_units": CLASS_LOSSES,
    "multiclass": CLASS_LOSSES,
    "regression": VALUE_LOSSES | RELATIVE_LOSSES | DIRECTION_LOSSES,
    "reconstruction": VALUE_LOSSES | RELATIVE_LOSSES | DIRECTION_LOSSES,
}
FITTING_METRICS = {
    "binary": CLASS_METRICS | VALUE_METRICS,
    "binary_on_two_units": CLASS_METRICS | RANK_METRICS,
    "multiclass": CLASS_METRICS | RANK_METRICS,
    "regression": VALUE_METRICS,
    "reconstruction": VALUE_METRICS,
}


def build(head: str, loss="auto", metrics=("auto",)):
    target, units, activation, _ = HEADS[head]
    if loss in RATE_LOSSES and activation == "auto" and target.task in ("regression", "reconstruction"):
        activation = "softplus"  # a rate output: a linear one is refused (tested below)
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 6, "activation": "tanh"},
                                             {"type": "dense", "units": units, "activation": activation}]},
                        "train": {"loss": loss, "metrics": list(metrics), "epochs": 1, "batch_size": 16,
                                  "progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, DataSpec({"features": FEATURES}, {"target": target}), seed=0)
    return model, cfg


def listed(message: str, plural: str) -> set[str]:
    return set(re.search(rf"{plural} for it: (.*)$", message).group(1).split(", "))


def test_every_loss_has_its_tasks():
    assert set(LOSS_TASKS) == set(LOSSES.names())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("loss", LOSSES.names())
def test_a_loss_trains_where_it_fits_and_is_named_with_the_fitting_ones_where_not(head, loss):
    if loss in FITTING_LOSSES[head]:
        model, cfg = build(head, loss)
        logs = Trainer(model, cfg.train).fit(Split({"features": X}, {"target": HEADS[head][3]})).records[0]
        assert math.isfinite(logs["loss"])
        return
    with pytest.raises(ValueError, match=rf"output 'dense_2': loss '{loss}' does not fit target 'target'") as err:
        build(head, loss)
    task = HEADS[head][0].task
    assert f"which is {task} (" in str(err.value)
    assert listed(str(err.value), "losses") == FITTING_LOSSES[head]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("metric", METRICS.names())
def test_a_metric_is_logged_where_it_fits_and_is_named_with_the_fitting_ones_where_not(head, metric):
    if metric in FITTING_METRICS[head]:
        model, cfg = build(head, metrics=[metric])
        logs = Trainer(model, cfg.train).fit(Split({"features": X}, {"target": HEADS[head][3]})).records[0]
        assert math.isfinite(logs[metric])
        return
    with pytest.raises(ValueError, match=rf"output 'dense_2': metric '{metric}' does not fit target 'target'") as err:
        build(head, metrics=[metric])
    assert listed(str(err.value), "metrics") == FITTING_METRICS[head]


@pytest.mark.parametrize("loss", ["hinge", "mse"])
def test_a_value_or_margin_loss_on_ten_classes_names_the_class_losses(loss):
    with pytest.raises(ValueError) as err:
        build("multiclass", loss)
    assert str(err.value) == (f"output 'dense_2': loss '{loss}' does not fit target 'target', which is multiclass "
                              "(10 units); losses for it: sparse_categorical_crossentropy, categorical_crossentropy, "
                              "kl_divergence, categorical_hinge")


def test_a_rate_loss_needs_a_non_negative_output():
    with pytest.raises(ValueError) as err:
        config_model = {"layers": [{"type": "dense", "units": "auto", "activation": "linear"}]}
        cfg = config.parse({"model": config_model, "train": {"loss": "poisson"}})
        build_model(cfg.model, cfg.train, DataSpec({"features": FEATURES}, {"target": TargetSpec("regression", 1)}))
    assert str(err.value) == ("output 'dense_1': loss 'poisson' reads the output as a rate, which activation "
                              "'linear' can make negative; give the output layer one of: softplus, exponential, "
                              "relu, relu6, sigmoid, hard_sigmoid")


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "kl_divergence", "sparse_categorical_crossentropy",
                                  "cce", "scce"])
def test_a_class_loss_on_one_binary_unit_names_the_binary_losses(loss):
    with pytest.raises(ValueError, match=r"which is binary \(1 unit\); losses for it: binary_crossentropy, hinge, "):
        build("binary", loss)


def test_a_binary_target_on_two_units_is_read_as_two_classes():
    with pytest.raises(ValueError, match=r"loss 'binary_crossentropy' .* binary \(2 units, read as multiclass\)"):
        build("binary_on_two_units", "bce")
    model, _ = build("binary_on_two_units")                                   # loss: auto
    assert model.heads["target"].loss == "sparse_categorical_crossentropy"


def test_metric_task_mismatches_name_the_metric_and_the_task():
    with pytest.raises(ValueError, match=r"metric 'accuracy' does not fit target 'target', which is regression "
                                         r"\(1 unit\); metrics for it: mae, mse, rmse, r2, mape, msle$"):
        build("regression", metrics=["acc"])
    with pytest.raises(ValueError, match=r"metric 'mae' .* multiclass \(10 units\); "
                                         r"metrics for it: accuracy, precision, recall, f1, auc, top_k_accuracy$"):
        build("multiclass", metrics=["mae"])


# ------------------------------------------------------------- through the train command
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    params = {"seed": 0, "data": {"source": "digits"},
              "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu"},
                                   {"type": "dense", "units": "auto", "activation": "auto"}]},
              "train": {"epochs": 1, "progress": "quiet"}, "mlflow": {"enabled": False}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    path = str(tmp / "params.yaml")
    split_stage.run(argparse.Namespace(params=path, set=[], out=str(tmp / "split")))
    scale_stage.run(argparse.Namespace(params=path, set=[], split=str(tmp / "split"), out=str(tmp / "processed")))
    return tmp


@pytest.mark.parametrize("override,message", [
    ("train.loss=hinge", "loss 'hinge' does not fit target 'target', which is multiclass (10 units); losses "),
    ("train.metrics=[mae]", "metric 'mae' does not fit target 'target', which is multiclass (10 units); metrics "),
])
def test_train_command_reports_a_misfit_and_writes_nothing(digits, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    code = cli.main(["train", "--params", str(digits / "params.yaml"), "--set", override,
                     "--data", str(digits / "processed"), "--model", str(out / "model.pt"),
                     "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "train.json"),
                     "--history", str(out / "history.csv"), "--run", str(out / "run.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("densepipe train: error: output 'dense_2': ") and message in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("loss", sorted(RELATIVE_LOSSES))
def test_a_loss_on_the_target_s_own_values_refuses_a_scaled_target(tmp_path, capsys, loss):
    params = {"seed": 0, "data": {"source": "diabetes"}, "scale": {"target": "standard"},
              "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu"},
                                   {"type": "dense", "units": "auto",
                                    "activation": "softplus" if loss in RATE_LOSSES else "auto"}]},
              "train": {"epochs": 2, "progress": "quiet", "loss": loss}, "mlflow": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    path = str(tmp_path / "params.yaml")
    split_stage.run(argparse.Namespace(params=path, set=[], out=str(tmp_path / "split")))
    out = tmp_path / "run"
    argv = ["train", "--params", path, "--data", str(tmp_path / "processed"), "--model", str(out / "model.pt"),
            "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "train.json"),
            "--history", str(out / "history.csv"), "--run", str(out / "run.json")]
    for target_scaling, code in (("standard", 1), ("none", 0)):
        scale_stage.run(argparse.Namespace(params=path, set=[f"scale.target={target_scaling}"],
                                           split=str(tmp_path / "split"), out=str(tmp_path / "processed")))
        assert cli.main([*argv, "--set", f"scale.target={target_scaling}"]) == code
    err = capsys.readouterr().err
    assert (f"densepipe train: error: output 'dense_2': loss '{loss}' reads target 'target' in its own units, "
            f"but scale.target scales it; set scale.target: none") in err
    history = (out / "history.csv").read_text()  # the unscaled run trained
    assert "loss" in history

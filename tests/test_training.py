"""End-to-end training: logic gates, digits, a two-head model, reproducibility,
resume after a kill through the real train stage, and progress output."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits, load_iris
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from conftest import fresh_python
from densepipe import checkpoint as ckpt
from densepipe import config
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.stages import scale as scale_stage
from densepipe.stages import split as split_stage
from densepipe.stages import train as train_stage
from densepipe.train.history import History
from densepipe.train.loop import Split, Trainer

TIMING = ("epoch_seconds", "samples_per_sec")


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def fit(model_cfg, spec, train, val=None, *, seed=0, log=lambda m: None, **train_cfg):
    cfg = config.parse({"model": model_cfg, "train": {"progress": "quiet", **train_cfg}})
    model = build_model(cfg.model, cfg.train, spec, seed=seed)
    trainer = Trainer(model, cfg.train, seed=seed, log=log)
    return trainer, trainer.fit(train, val)


def gate(fn):
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])   # (4, 2) truth table
    y = torch.tensor([fn(int(a), int(b)) for a, b in x.tolist()])
    return Split({"features": x}, {"target": y})


BINARY2 = DataSpec({"features": 2}, {"target": TargetSpec("binary", 1, [0, 1])})


def predicted_labels(model, split):
    return (model.predict(split.inputs)["target"].reshape(-1) >= 0.5).long()


# ---------------------------------------------------------------- logic gates
def test_xor_with_one_hidden_layer():
    data = gate(lambda a, b: a ^ b)
    trainer, history = fit({"layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                       {"type": "dense", "units": "auto", "activation": "auto"}]},
                           BINARY2, data, epochs=300, batch_size=4, optimizer={"name": "adam", "lr": 0.05})
    assert torch.equal(predicted_labels(trainer.model, data), data.targets["target"])
    assert history.records[-1]["accuracy"] == 1.0
    assert history.records[-1]["loss"] < 0.1 * history.records[0]["loss"]


def test_perceptron_learns_and_with_the_step_rule():
    data = gate(lambda a, b: a & b)
    trainer, history = fit({"layers": [{"type": "dense", "units": "auto", "activation": "step"}]},
                           BINARY2, data, epochs=100, batch_size=4, optimizer={"name": "sgd", "lr": 0.1})
    head = trainer.model.heads["target"]
    assert (head.activation, head.loss) == ("step", "perceptron")
    assert torch.equal(predicted_labels(trainer.model, data), data.targets["target"])
    assert history.records[-1]["loss"] == 0.0           # every row on its side: nothing left to update


def test_sigmoid_unit_learns_and_with_cross_entropy():
    data = gate(lambda a, b: a & b)
    trainer, history = fit({"layers": [{"type": "dense", "units": "auto", "activation": "sigmoid"}]},
                           BINARY2, data, epochs=300, batch_size=4, optimizer={"name": "sgd", "lr": 1.0})
    assert trainer.model.heads["target"].loss == "binary_crossentropy"
    assert torch.equal(predicted_labels(trainer.model, data), data.targets["target"])
    assert history.records[-1]["accuracy"] == 1.0


# --------------------------------------------------------------------- digits
def digits_splits():
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(Xtr)

    def split(X_, y_):
        return Split({"features": torch.tensor(scaler.transform(X_), dtype=torch.float32)},
                     {"target": torch.tensor(y_)})
    return split(Xtr, ytr), split(Xte, yte)


DIGITS = DataSpec({"features": 64}, {"target": TargetSpec("multiclass", 10, list(range(10)))})
DIGITS_MODEL = {"layers": [{"type": "dense", "units": 128, "activation": "relu"},
                           {"type": "dropout", "rate": 0.1},
                           {"type": "dense", "units": "auto", "activation": "auto"}]}


def test_digits_classifier_above_95_percent():
    train, test = digits_splits()
    trainer, _ = fit(DIGITS_MODEL, DIGITS, train, epochs=20, batch_size=64)
    pred = trainer.model.predict(test.inputs)["target"].argmax(dim=1)
    accuracy = (pred == test.targets["target"]).float().mean().item()
    assert accuracy > 0.95


def test_same_params_and_seed_give_identical_results():
    train, test = digits_splits()
    runs = [fit(DIGITS_MODEL, DIGITS, train, test, seed=7, epochs=3, batch_size=64) for _ in range(2)]
    (t1, h1), (t2, h2) = runs
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in h1.records]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in h2.records]
    s1, s2 = t1.model.state_dict(), t2.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _, h3 = fit(DIGITS_MODEL, DIGITS, train, test, seed=8, epochs=3, batch_size=64)
    assert h3.records[-1]["loss"] != h1.records[-1]["loss"]       # the seed matters


def test_train_deterministic_switch_sets_torch_flags_without_loading_the_compiler():
    # train.deterministic switches torch's deterministic algorithms for the train stage; torch's
    # own switch would import torch._dynamo, about 2 s of every train stage's start-up.
    code = ("import sys, torch\n"
            "from densepipe.stages.common import use_deterministic_algorithms as switch\n"
            "switch(True)\n"
            "on = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()\n"
            "loaded = 'torch._dynamo' in sys.modules\n"
            "import torch._inductor.config as inductor\n"
            "switch(False)\n"
            "off = torch.are_deterministic_algorithms_enabled(), inductor.deterministic\n"
            "switch(True)\n"
            "print(on, loaded, off, inductor.deterministic)")
    assert fresh_python(code) == "(True, True) False (False, False) True"


# ------------------------------------------------------------- two-head model
def test_two_heads_on_one_trunk_train_both():
    X, species = load_iris(return_X_y=True)
    features, width = X[:, :3], X[:, 3:]               # predict petal width from the other three
    idx_tr, idx_va = train_test_split(np.arange(len(X)), test_size=0.3, stratify=species, random_state=0)
    xs, ws = StandardScaler().fit(features[idx_tr]), StandardScaler().fit(width[idx_tr])

    def split(idx):
        return Split({"features": torch.tensor(xs.transform(features[idx]), dtype=torch.float32)},
                     {"petal_width": torch.tensor(ws.transform(width[idx]), dtype=torch.float32),
                      "species": torch.tensor(species[idx])})

    spec = DataSpec({"features": 3}, {"petal_width": TargetSpec("regression", 1),
                                      "species": TargetSpec("multiclass", 3, [0, 1, 2])})
    model_cfg = {
        "layers": [{"type": "dense", "name": "trunk", "units": 32, "activation": "relu"},
                   {"type": "dense", "name": "width", "inputs": ["trunk"], "units": "auto"},
                   {"type": "dense", "name": "kind", "inputs": ["trunk"], "units": "auto",
                    "activation": "auto"}],
        "outputs": {"width": {"target": "petal_width", "metrics": ["r2"]},
                    "kind": {"target": "species", "weight": 0.5}},
    }
    trainer, history = fit(model_cfg, spec, split(idx_tr), split(idx_va), epochs=150, batch_size=32,
                           optimizer={"name": "adam", "lr": 0.01})
    first, last = history.records[0], history.records[-1]
    assert trainer.model.heads["width"].loss == "mse"
    assert trainer.model.heads["kind"].loss == "sparse_categorical_crossentropy"
    assert last["width_loss"] < 0.25 * first["width_loss"]
    assert last["kind_loss"] < 0.25 * first["kind_loss"]
    assert last["loss"] == pytest.approx(last["width_loss"] + 0.5 * last["kind_loss"], rel=1e-5)
    assert last["val_kind_accuracy"] >= 0.9
    assert last["val_width_r2"] >= 0.8


def test_per_output_losses_and_metrics_match_a_pass_over_the_epoch_outputs():
    # Two outputs, one of them the input batch itself (an identity path): the epoch's metrics are
    # read after every step has run, so what each step logged must not be overwritten by later ones.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=gen)
    data = Split({"features": x}, {"y1": torch.randn(32, 2, generator=gen), "y2": x.clone()})
    spec = DataSpec({"features": 3}, {"y1": TargetSpec("regression", 2), "y2": TargetSpec("regression", 3)})
    model_cfg = {
        "layers": [{"type": "dense", "name": "a", "inputs": ["features"], "units": 2},
                   {"type": "activation", "name": "b", "inputs": ["features"], "activation": "linear"}],
        "outputs": {"a": {"target": "y1", "metrics": ["mse"]}, "b": {"target": "y2", "metrics": ["mse"]}},
    }
    _, history = fit(model_cfg, spec, data, epochs=2, batch_size=8, shuffle=False,
                     optimizer={"name": "sgd", "lr": 0.1})
    last = history.records[-1]
    assert last["b_loss"] == 0.0 and last["b_mse"] == 0.0
    # The loss sums were logged per step, the metric is computed from the kept outputs at the end.
    assert last["a_mse"] == pytest.approx(last["a_loss"], rel=1e-6) and last["a_loss"] > 0
    assert last["loss"] == pytest.approx(last["a_loss"] + last["b_loss"], rel=1e-6)


# ------------------------------------------------------------------- progress
@pytest.mark.parametrize("mode", ["quiet", "epoch", "bar"])
def test_progress_modes(mode, capsys):
    data = gate(lambda a, b: a | b)
    fit({"layers": [{"type": "dense", "units": "auto", "activation": "auto"}]}, BINARY2, data,
        log=print, epochs=3, progress=mode)
    out = capsys.readouterr().out
    if mode == "quiet":
        assert out == ""
    elif mode == "epoch":
        lines = out.splitlines()
        assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
        assert all("loss" in line and "accuracy" in line for line in lines)


# ------------------------------------------------------------ what is logged
IRIS = DataSpec({"features": 4}, {"target": TargetSpec("multiclass", 3, [0, 1, 2])})


def iris_split() -> Split:
    X, y = load_iris(return_X_y=True)
    return Split({"features": torch.tensor(StandardScaler().fit_transform(X), dtype=torch.float32)},
                 {"target": torch.tensor(y)})


def test_logged_loss_includes_the_kernel_penalty_as_keras_does():
    data = iris_split()
    layers = [{"type": "dense", "units": 8, "activation": "relu", "l1": 0.01, "l2": 0.1},
              {"type": "dense", "units": "auto", "activation": "auto", "l2": 0.05}]
    # A vanishing lr and one step per epoch: the weights the loss was taken with are, to float
    # precision, the final ones.
    trainer, history = fit({"layers": layers}, IRIS, data, data, epochs=1, batch_size=len(data.targets["target"]),
                           optimizer={"name": "sgd", "lr": 1e-12})
    model = trainer.model
    with torch.no_grad():
        data_loss = torch.nn.functional.cross_entropy(model(data.inputs)["target"], data.targets["target"])
        penalty = model.penalty()
    assert penalty > 0.1 * data_loss                                   # big enough to tell apart
    record = history.records[0]
    assert record["loss"] == pytest.approx(float(data_loss + penalty), rel=1e-5)
    assert record["val_loss"] == pytest.approx(float(data_loss + penalty), rel=1e-5)


def test_activity_penalty_is_trained_and_logged_per_row_as_keras_does():
    data = iris_split()
    n = len(data.targets["target"])
    layers = [{"type": "dense", "units": 8, "activation": "relu", "activity_l1": 0.2, "activity_l2": 0.1},
              {"type": "dense", "units": "auto", "activation": "auto"}]
    cfg = config.parse({"model": {"layers": layers},
                        "train": {"progress": "quiet", "epochs": 1, "batch_size": n, "shuffle": False,
                                  "optimizer": {"name": "sgd", "lr": 0.5}}})
    model = build_model(cfg.model, cfg.train, IRIS, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The objective by hand: mean cross-entropy plus Keras' activity penalty, divided by the batch size.
    w1, b1 = before["layers.dense_1.weight"].requires_grad_(), before["layers.dense_1.bias"].requires_grad_()
    w2, b2 = before["layers.dense_2.weight"].requires_grad_(), before["layers.dense_2.bias"].requires_grad_()
    h = torch.relu(data.inputs["features"] @ w1.T + b1)
    data_loss = torch.nn.functional.cross_entropy(h @ w2.T + b2, data.targets["target"])
    activity = (0.2 * h.abs().sum() + 0.1 * (h ** 2).sum()) / n
    grads = torch.autograd.grad(data_loss + activity, (w1, b1, w2, b2))
    history = Trainer(model, cfg.train, seed=0).fit(data, data)
    assert history.records[0]["loss"] == pytest.approx(float((data_loss + activity).detach()), rel=1e-5)
    assert activity > 0.1 * data_loss                                  # big enough to tell apart
    L = model.layers
    for p, start, g in zip((L["dense_1"].weight, L["dense_1"].bias, L["dense_2"].weight, L["dense_2"].bias),
                           (w1, b1, w2, b2), grads, strict=True):
        torch.testing.assert_close(p.detach(), start.detach() - 0.5 * g, rtol=1e-5, atol=1e-6)
    # val_loss carries it too, taken on the validation rows with the trained weights.
    with torch.no_grad():
        h = torch.relu(L["dense_1"](data.inputs["features"]))
        val = torch.nn.functional.cross_entropy(L["dense_2"](h), data.targets["target"])
        val_activity = (0.2 * h.abs().sum() + 0.1 * (h ** 2).sum()) / n
    assert history.records[0]["val_loss"] == pytest.approx(float(val + val_activity), rel=1e-5)


def test_gradient_norms_are_logged_before_clipping():
    data = iris_split()
    layers = [{"type": "dense", "units": 8, "activation": "tanh"},
              {"type": "dense", "units": "auto", "activation": "auto"}]
    one_step = {"epochs": 1, "batch_size": len(data.targets["target"]), "optimizer": {"name": "sgd", "lr": 0.1}}
    _, free = fit({"layers": layers}, IRIS, data, **one_step)
    _, clipped = fit({"layers": layers}, IRIS, data, clip={"norm": 1e-4}, **one_step)
    norms = {k: v for k, v in free.records[0].items() if k.startswith("grad_norm/")}
    assert len(norms) == 2 and min(norms.values()) > 1e-3               # far above the clip norm
    assert {k: clipped.records[0][k] for k in norms} == pytest.approx(norms, rel=1e-6)


def test_regression_metrics_are_in_the_targets_own_units():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen)
    y = x @ torch.tensor([1.0, -0.5, 0.2]) + 0.1 * torch.randn(200, generator=gen)
    data = Split({"features": x}, {"target": y})
    spec = DataSpec({"features": 3}, {"target": TargetSpec("regression", 1)})
    layers = {"layers": [{"type": "dense", "units": "auto"}]}
    common = dict(epochs=2, metrics=["mae", "rmse", "r2"], optimizer={"name": "adam", "lr": 0.01})
    _, scaled = fit(layers, spec, data, data, **common)
    # The same training (the loss is in the units the model trains on); metrics undo the scaling.
    cfg = config.parse({"model": layers, "train": {"progress": "quiet", **common}})
    trainer = Trainer(build_model(cfg.model, cfg.train, spec, seed=0), cfg.train,
                      target_units={"target": (100.0, 50.0)})
    units = trainer.fit(data, data)
    for a, b in zip(scaled.records, units.records, strict=True):
        assert b["loss"] == a["loss"] and b["val_loss"] == a["val_loss"]
        for key in ("mae", "val_mae", "rmse", "val_rmse"):
            assert b[key] == pytest.approx(50.0 * a[key], rel=1e-5)
        assert b["val_r2"] == pytest.approx(a["val_r2"], abs=1e-6)


def test_the_train_stage_reports_regression_metrics_in_original_units(tmp_path):
    params = {"seed": 0, "data": {"source": "diabetes"}, "scale": {"target": "standard"},
              "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"},
                                   {"type": "dense", "units": "auto"}]},
              "train": {"epochs": 3, "progress": "quiet", "metrics": ["mae"]}, "mlflow": {"enabled": False}}
    prepare_data(tmp_path, params)
    args = stage_args(tmp_path, "run")
    train_stage.run(args)
    metrics = json.loads(open(args.metrics).read())
    # diabetes' target spans about 25-346 (std 77): a mean absolute error in those units is
    # tens, in standard-scaled units it would be below one.
    assert metrics["val_mae"] > 10 and metrics["mae"] > 10


# ------------------------------------------------------- resume through the stage
PARAMS = {
    "seed": 3,
    "data": {"source": "digits"},
    "model": {"layers": [{"type": "dense", "units": 32, "activation": "relu"},
                         {"type": "dropout", "rate": 0.2},
                         {"type": "dense", "units": "auto", "activation": "auto"}]},
    "train": {"epochs": 6, "batch_size": 64, "progress": "quiet",
              "callbacks": [{"type": "reduce_on_plateau", "monitor": "loss", "patience": 1, "factor": 0.5,
                             "min_delta": 1.0},  # halves the lr every epoch after the first
                            {"type": "early_stopping", "patience": 10, "restore_best_weights": True},
                            {"type": "model_checkpoint"}]},
    "mlflow": {"enabled": False},
}


def stage_args(tmp, run):
    out = tmp / run
    return argparse.Namespace(params=str(tmp / "params.yaml"), set=[], data=str(tmp / "processed"),
                              model=str(out / "model.pt"), checkpoint=str(out / "checkpoint.pt"),
                              metrics=str(out / "train.json"), history=str(out / "history.csv"),
                              run=str(out / "run.json"))


def outputs(args):
    records = History.from_csv(args.history).records
    history = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    metrics = json.loads(open(args.metrics).read())
    assert not set(TIMING) & set(metrics)  # wall-clock speed is not a metric of the model
    weights = torch.load(args.model, weights_only=True)["state_dict"]
    return history, metrics, weights


def prepare_data(tmp_path, params: dict) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    path = str(tmp_path / "params.yaml")
    split_stage.run(argparse.Namespace(params=path, set=[], out=str(tmp_path / "split")))
    scale_stage.run(argparse.Namespace(params=path, set=[], split=str(tmp_path / "split"),
                                       out=str(tmp_path / "processed")))


def kill_after_epoch(monkeypatch, args, epoch: int) -> None:
    """Runs the train stage until the process 'dies' right after the given epoch's checkpoint."""
    save_resume = ckpt.save_resume

    def save_then_die(path, state, key):
        save_resume(path, state, key)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save_resume", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_stage.run(args)


def whole_and_killed(tmp_path, monkeypatch, capsys, epoch: int):
    """The stage's arguments of an uninterrupted run and of one killed after `epoch`."""
    prepare_data(tmp_path, PARAMS)
    whole = stage_args(tmp_path, "whole")
    train_stage.run(whole)
    killed = stage_args(tmp_path, "killed")
    kill_after_epoch(monkeypatch, killed, epoch)
    capsys.readouterr()
    return whole, killed


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    whole, killed = whole_and_killed(tmp_path, monkeypatch, capsys, 3)
    train_stage.run(killed)
    assert "resuming from" in capsys.readouterr().out

    h1, m1, w1 = outputs(whole)
    h2, m2, w2 = outputs(killed)
    assert len(h1) == PARAMS["train"]["epochs"]
    assert h2 == h1
    assert m2 == m1
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert min(r["lr"] for r in h1) < 1e-3          # the plateau schedule's state crossed the kill
    # A finished run leaves nothing to resume: running again starts over and ends the same.
    train_stage.run(killed)
    assert "resuming" not in capsys.readouterr().out
    assert outputs(killed)[0] == h1


@pytest.mark.parametrize("best_only", [True, False])
def test_resume_rewrites_a_checkpointed_model_file_that_was_removed(tmp_path, monkeypatch, capsys, best_only):
    # dvc repro removes a stage's outputs before it runs it again: a resumed run whose model file a
    # callback wrote must write it again, from the weights its resume state kept. Best only, the lr
    # only falls and the first epoch stays the best; every epoch, the file holds the latest weights,
    # which the resume state keeps once, as the model's.
    checkpoint = {"type": "model_checkpoint", "monitor": "lr", "mode": "max", "save_best_only": best_only}
    params = {**PARAMS, "train": {**PARAMS["train"],
                                  "callbacks": [*PARAMS["train"]["callbacks"][:2], checkpoint]}}
    prepare_data(tmp_path, params)
    whole = stage_args(tmp_path, "whole")
    train_stage.run(whole)
    killed = stage_args(tmp_path, "killed")
    kill_after_epoch(monkeypatch, killed, 3)
    state = torch.load(killed.checkpoint, weights_only=True)
    assert state["saved_epoch"] == (0 if best_only else 2)
    assert (state["saved_weights"] is not None) == best_only
    Path(killed.model).unlink()
    capsys.readouterr()
    train_stage.run(killed)
    assert "resuming from" in capsys.readouterr().out
    h1, m1, w1 = outputs(whole)
    h2, m2, w2 = outputs(killed)
    assert h2 == h1 and m2 == m1
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.load(killed.model, weights_only=True)["epoch"] == (1 if best_only else PARAMS["train"]["epochs"])


def test_resume_ignores_display_settings_but_not_training_ones(tmp_path, monkeypatch, capsys):
    whole, killed = whole_and_killed(tmp_path, monkeypatch, capsys, 2)
    # Another progress display and checkpoint interval: the same training, so it resumes.
    killed.set = ["train.progress=epoch", "train.checkpoint_every=2"]
    train_stage.run(killed)
    assert "resuming from" in capsys.readouterr().out
    assert outputs(killed)[0] == outputs(whole)[0]

    other = stage_args(tmp_path, "other")
    kill_after_epoch(monkeypatch, other, 2)
    capsys.readouterr()
    other.set = ["train.optimizer.lr=0.01"]  # another training: starts over
    train_stage.run(other)
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize("monitor, with_val, message", [
    ("val_acc", True, "'val_acc' is not logged (did you mean 'val_accuracy'?)"),
    ("val_loss", False, "'val_loss' is not logged (there is no validation data: split.val_size is 0)"),
    ("los", False, "'los' is not logged (did you mean 'loss'?)"),
    ("learning_rate", False, "'learning_rate' is not logged (did you mean 'lr'? that is its name here)"),
])
def test_a_callback_monitoring_an_unlogged_value_is_refused_before_training(monitor, with_val, message):
    data = iris_split()
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"progress": "quiet", "epochs": 2,
                                  "callbacks": [{"type": "reduce_on_plateau", "monitor": "loss"},
                                                {"type": "early_stopping", "monitor": monitor}]}})
    trainer = Trainer(build_model(cfg.model, cfg.train, IRIS, seed=0), cfg.train)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(config.ConfigError) as err:
        trainer.fit(data, data if with_val else None)
    assert str(err.value).startswith(f"train.callbacks[1].monitor: {message}; logged: loss, accuracy")
    assert len(trainer.history) == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # nothing trained


@pytest.mark.parametrize("checkpoint, held", [
    # monitors the lr, which only falls: the first epoch stays the best, and the model file holds it
    ({"type": "model_checkpoint", "monitor": "lr", "mode": "max", "save_best_only": True}, 1),
    ({"type": "model_checkpoint", "save_best_only": False}, 4),   # every epoch: the last
    (None, 4),                                                     # no callback: the final weights
])
def test_reported_metrics_are_those_of_the_weights_in_the_model_file(tmp_path, checkpoint, held):
    params = {**PARAMS, "train": {"epochs": 4, "batch_size": 64, "progress": "quiet",
                                  "callbacks": [{"type": "exponential_decay", "gamma": 0.5},
                                                *([checkpoint] if checkpoint else [])]}}
    prepare_data(tmp_path, params)
    args = stage_args(tmp_path, "run")
    train_stage.run(args)
    history, metrics, weights = outputs(args)
    assert metrics["epochs_run"] == 4
    row = {k: v for k, v in history[held - 1].items() if k != "epoch" and not k.startswith("grad_norm/")}
    assert {k: metrics[k] for k in row} == row
    assert torch.load(args.model, weights_only=True)["epoch"] == held
    if held == 1:
        assert metrics["val_loss"] != history[-1]["val_loss"]


def test_early_stopping_restores_the_first_epoch_when_its_value_cannot_be_compared():
    from densepipe.train.callbacks import EarlyStopping

    class Weights:  # the trainer services the callback uses
        def __init__(self):
            self.current, self.loaded, self.restored_epoch, self.log = 0, None, None, lambda m: None

        def weights_copy(self):
            return {"w": self.current}

        def load_weights(self, state):
            self.loaded = state

        def request_stop(self, reason):
            pass

    trainer = Weights()
    cb = EarlyStopping(EarlyStopping.Args(monitor="val_loss", patience=5, restore_best_weights=True))
    for epoch, value in enumerate([float("nan"), float("nan")]):
        trainer.current = epoch
        cb.on_epoch_end(trainer, epoch, {"val_loss": value})
    cb.on_train_end(trainer)
    assert trainer.loaded == {"w": 0} and trainer.restored_epoch == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_one_is_a_config_error():
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                        "train": {"device": "cuda", "progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, DataSpec({"features": 3}, {"t": TargetSpec("regression", 1)}))
    with pytest.raises(config.ConfigError, match=r"^train\.device: 'cuda' but (this torch .* is built without "
                                                 r"CUDA|no CUDA device is visible); use train\.device: auto"):
        Trainer(model, cfg.train)


# ------------------------------------------------------------------------ CUDA
PLAIN_MODEL = {"layers": [{"type": "dense", "units": 64, "activation": "tanh"},
                          {"type": "dense", "units": "auto", "activation": "auto"}]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not available")
def test_training_on_cuda_follows_the_cpu_run():
    # Without shuffling or dropout the two runs see the same batches and draws, so they
    # differ only by the rounding of the two devices' kernels.
    train, test = digits_splits()
    runs = {dev: fit(PLAIN_MODEL, DIGITS, train, test, seed=3, epochs=3, batch_size=64, shuffle=False,
                     device=dev) for dev in ("cpu", "cuda")}
    (t_cpu, h_cpu), (t_gpu, h_gpu) = runs["cpu"], runs["cuda"]
    assert next(t_gpu.model.parameters()).device.type == "cuda"
    for r_cpu, r_gpu in zip(h_cpu.records, h_gpu.records, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert r_gpu[key] == pytest.approx(r_cpu[key], rel=1e-4, abs=1e-5), key
    s_cpu, s_gpu = t_cpu.model.state_dict(), t_gpu.model.state_dict()
    for k in s_cpu:
        torch.testing.assert_close(s_gpu[k].cpu(), s_cpu[k], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not available")
def test_digits_classifier_on_cuda_above_95_percent():
    train, test = digits_splits()
    trainer, history = fit(DIGITS_MODEL, DIGITS, train, test, epochs=20, batch_size=64, device="cuda")
    pred = trainer.model.predict(test.to("cuda").inputs)["target"].argmax(dim=1).cpu()
    assert (pred == test.targets["target"]).float().mean().item() > 0.95
    assert history.records[-1]["val_accuracy"] > 0.95

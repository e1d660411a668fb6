"""Metrics accumulated as sufficient statistics over uneven batches equal
scikit-learn's value on the whole set."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from densepipe import config
from densepipe.metrics import METRICS, metric_mode
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.train import loop
from densepipe.train.loop import Split, Trainer

GEN = torch.Generator().manual_seed(0)
N = 1003
BATCHES = [1, 7, 100, 395, 500]                      # uneven, sums to N


def accumulate(name, pred, target):
    m = METRICS[name]
    total, start = None, 0
    for size in BATCHES:
        s = m.stats(pred[start:start + size], target[start:start + size])
        total = s if total is None else total + s
        start += size
    return m.finish(total).item()


def binary_case():
    prob = torch.rand(N, 1, generator=GEN)                    # sigmoid head output (N, 1)
    y = (torch.rand(N, generator=GEN) < 0.4).long()
    return prob, y, (prob[:, 0] >= 0.5).long().numpy()


@pytest.mark.parametrize("name,reference", [
    ("accuracy", skm.accuracy_score), ("precision", skm.precision_score),
    ("recall", skm.recall_score), ("f1", skm.f1_score),
])
def test_binary_classification_metrics(name, reference):
    prob, y, pred = binary_case()
    assert accumulate(name, prob, y) == pytest.approx(reference(y.numpy(), pred), abs=1e-12)


def test_multiclass_accuracy():
    prob = torch.softmax(torch.randn(N, 7, generator=GEN), dim=1)
    y = torch.randint(0, 7, (N,), generator=GEN)
    assert accumulate("acc", prob, y) == pytest.approx(skm.accuracy_score(y, prob.argmax(1)), abs=1e-12)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("name,reference", [
    ("mae", skm.mean_absolute_error), ("mse", skm.mean_squared_error),
    ("rmse", lambda t, p: np.sqrt(skm.mean_squared_error(t, p))), ("r2", skm.r2_score),
])
def test_regression_metrics(name, reference, width):
    scales = torch.tensor([1.0, 10.0, 0.1])[:width]           # columns of different spread
    y = (torch.randn(N, width, generator=GEN) * scales + 5).double()
    pred = y + torch.randn(N, width, generator=GEN, dtype=torch.float64) * scales * 0.5
    target = y[:, 0] if width == 1 else y                     # single targets arrive as (N,)
    expected = reference(target.numpy(), pred.numpy() if width > 1 else pred[:, 0].numpy())
    assert accumulate(name, pred, target) == pytest.approx(expected, rel=1e-9)


def test_modes():
    assert metric_mode("val_loss") == "min" and metric_mode("val_accuracy") == "max"
    assert metric_mode("r2") == "max" and metric_mode("val_rmse") == "min"
    assert metric_mode("val_species_loss") == "min"
    # several outputs prefix their metrics with the output's name
    assert metric_mode("val_species_accuracy") == "max" and metric_mode("width_r2") == "max"
    assert metric_mode("val_width_mae") == "min" and metric_mode("val_width_rmse") == "min"


def test_trainer_evaluate_over_uneven_chunks_equals_sklearn(monkeypatch):
    """The trainer's own accumulation (chunks of 37 rows, a short last one) on a real model."""
    monkeypatch.setattr(loop, "EVAL_CHUNK", 37)
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                             {"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"metrics": ["accuracy", "precision", "recall", "f1"], "progress": "quiet"}})
    spec = DataSpec({"features": 4}, {"target": TargetSpec("binary", 1)})
    model = build_model(cfg.model, cfg.train, spec, seed=0)
    x = torch.randn(500, 4, generator=GEN)
    y = (x[:, 0] + 0.3 * torch.randn(500, generator=GEN) > 0).long()
    losses, values = Trainer(model, cfg.train).evaluate(Split({"features": x}, {"target": y}))
    prob = model.predict({"features": x})["target"][:, 0]
    pred = (prob >= 0.5).long().numpy()
    expected = [skm.accuracy_score(y, pred), skm.precision_score(y, pred), skm.recall_score(y, pred),
                skm.f1_score(y, pred)]
    np.testing.assert_allclose([v.item() for v in values], expected, rtol=1e-12)
    assert losses[0].item() == pytest.approx(skm.log_loss(y.numpy(), prob.double().numpy()), rel=1e-5)


def test_training_metrics_over_shuffled_uneven_batches_equal_sklearn():
    """The epoch's logged training metrics: batches of 37 rows in shuffled order, and a step
    too small to move the weights, so they must equal scikit-learn on the model's predictions."""
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                             {"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"epochs": 1, "batch_size": 37, "optimizer": {"name": "sgd", "lr": 1e-30},
                                  "metrics": ["accuracy", "precision", "recall", "f1"], "progress": "quiet"}})
    spec = DataSpec({"features": 4}, {"target": TargetSpec("binary", 1)})
    model = build_model(cfg.model, cfg.train, spec, seed=1)
    x = torch.randn(500, 4, generator=GEN)
    y = (x[:, 1] + 0.5 * torch.randn(500, generator=GEN) > 0).long()
    prob = model.predict({"features": x})["target"][:, 0]
    pred = (prob >= 0.5).long().numpy()
    logs = Trainer(model, cfg.train).fit(Split({"features": x}, {"target": y})).records[0]
    expected = {"accuracy": skm.accuracy_score(y, pred), "precision": skm.precision_score(y, pred),
                "recall": skm.recall_score(y, pred), "f1": skm.f1_score(y, pred)}
    assert {k: logs[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert logs["loss"] == pytest.approx(skm.log_loss(y.numpy(), prob.double().numpy()), rel=1e-5)

"""Metrics accumulated as sufficient statistics over uneven batches equal
scikit-learn's value on the whole set."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from densepipe import config
from densepipe.metrics import AUC_THRESHOLDS, METRICS, auc_thresholds, labels_from_raw, metric_mode
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


@pytest.mark.parametrize("classes", [3, 5, 12])
def test_top_k_accuracy_is_scikit_learns_with_keras_k(classes):
    prob = torch.softmax(torch.randn(N, classes, generator=GEN), dim=1)
    y = torch.randint(0, classes, (N,), generator=GEN)
    expected = skm.top_k_accuracy_score(y, prob, k=5, labels=range(classes)) if classes > 5 else 1.0
    assert accumulate("sparse_top_k_categorical_accuracy", prob, y) == pytest.approx(expected, abs=1e-12)
    if classes > 5:
        assert expected < 1.0 and expected > skm.accuracy_score(y, prob.argmax(1))   # k = 5, not 1 or all


def test_top_k_accuracy_counts_a_tie_at_the_boundary_in():
    prob = torch.tensor([[0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0]])   # class 6 ties with four others
    assert accumulate_once("top_k_accuracy", prob, torch.tensor([6])) == 1.0
    assert accumulate_once("top_k_accuracy", prob, torch.tensor([7])) == 0.0


def accumulate_once(name, pred, target):
    return METRICS[name].finish(METRICS[name].stats(pred, target)).item()


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


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("name,reference", [
    ("mape", lambda t, p: 100 * skm.mean_absolute_percentage_error(t, p)),   # Keras' mape is in percent
    ("mean_squared_logarithmic_error", skm.mean_squared_log_error),
])
def test_relative_regression_metrics(name, reference, width):
    # Positive targets away from 0 (the percentage divides by them) and predictions above epsilon
    # (scikit-learn refuses the log of a negative; Keras reads less than epsilon as epsilon).
    y = torch.rand(N, width, generator=GEN, dtype=torch.float64) * 10 + 0.5
    pred = (y * (1 + 0.3 * torch.randn(N, width, generator=GEN, dtype=torch.float64))).clamp_min(0.01)
    target = y[:, 0] if width == 1 else y
    expected = reference(target.numpy(), pred.numpy() if width > 1 else pred[:, 0].numpy())
    assert accumulate(name, pred, target) == pytest.approx(expected, rel=1e-9)


def test_relative_regression_metrics_read_values_below_epsilon_as_epsilon():
    pred, target = torch.tensor([[-5.0], [2.0]], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    msle = (math.log1p(1e-7) - math.log1p(1e-7)) ** 2 + (math.log1p(2.0) - math.log1p(1.0)) ** 2
    assert accumulate("msle", pred, target) == pytest.approx(msle / 2, rel=1e-12)
    assert accumulate("mape", pred, target) == pytest.approx((100 * 5 / 1e-7 + 100) / 2, rel=1e-9)


def test_modes():
    assert metric_mode("val_loss") == "min" and metric_mode("val_accuracy") == "max"
    assert metric_mode("r2") == "max" and metric_mode("val_rmse") == "min"
    assert metric_mode("val_species_loss") == "min"
    # several outputs prefix their metrics with the output's name
    assert metric_mode("val_species_accuracy") == "max" and metric_mode("width_r2") == "max"
    assert metric_mode("val_width_mae") == "min" and metric_mode("val_width_rmse") == "min"
    assert metric_mode("val_mape") == "min" and metric_mode("msle") == "min"
    assert metric_mode("lr") is None and metric_mode("grad_norm/dense_1") is None  # no better direction


def class_scoring_model(target: TargetSpec):
    """A small model on 4 features with every class metric, and its config."""
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                             {"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"metrics": ["accuracy", "precision", "recall", "f1"], "progress": "quiet"}})
    return build_model(cfg.model, cfg.train, DataSpec({"features": 4}, {"target": target}), seed=0), cfg


def test_trainer_evaluate_over_uneven_chunks_equals_sklearn(monkeypatch):
    """The trainer's own accumulation (chunks of 37 rows, a short last one) on a real model."""
    monkeypatch.setattr(loop, "EVAL_CHUNK", 37)
    model, cfg = class_scoring_model(TargetSpec("binary", 1))
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
                                  "metrics": ["accuracy", "precision", "recall", "f1", "auc"], "progress": "quiet"}})
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
    # The thresholded area: the same counts in any order of batches, near the exact area.
    whole = METRICS["auc"]
    assert logs["auc"] == pytest.approx(whole.finish(whole.stats(prob[:, None], y)).item(), abs=1e-12)
    assert logs["auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), prob.numpy()), abs=2e-3)
    assert logs["loss"] == pytest.approx(skm.log_loss(y.numpy(), prob.double().numpy()), rel=1e-5)



def test_multiclass_training_metrics_read_from_the_logits_equal_sklearn():
    """Every metric here reads only the predicted class, so the epoch's statistics come from the
    raw scores (their argmax is the softmax's): they must equal scikit-learn on predict()."""
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 8, "activation": "tanh"},
                                             {"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"epochs": 1, "batch_size": 37, "optimizer": {"name": "sgd", "lr": 1e-30},
                                  "metrics": ["accuracy", "precision", "recall", "f1"], "progress": "quiet"}})
    model = build_model(cfg.model, cfg.train, DataSpec({"features": 4}, {"target": TargetSpec("multiclass", 6)}),
                        seed=2)
    x = torch.randn(500, 4, generator=GEN)
    y = torch.randint(0, 6, (500,), generator=GEN)
    pred = model.predict({"features": x})["target"].argmax(1).numpy()
    logs = Trainer(model, cfg.train).fit(Split({"features": x}, {"target": y})).records[0]
    macro = {"labels": range(6), "average": "macro", "zero_division": 0}
    expected = {"accuracy": skm.accuracy_score(y, pred), "precision": skm.precision_score(y, pred, **macro),
                "recall": skm.recall_score(y, pred, **macro), "f1": skm.f1_score(y, pred, **macro)}
    assert {k: logs[k] for k in expected} == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("activation, metrics, units, reads_raw", [
    ("softmax", ["accuracy", "f1"], 4, True),
    ("linear", ["precision", "recall"], 3, True),
    ("softmax", ["accuracy", "auc"], 4, False),           # auc reads the probabilities
    ("softmax", ["accuracy", "top_k_accuracy"], 4, False),
    ("sigmoid", ["accuracy"], 4, False),                   # saturates: large scores tie at 1.0
    ("sigmoid", ["accuracy"], 1, False),                   # one unit: its label is p > 0.5, not an argmax
    ("linear", ["accuracy"], 1, False),
])
def test_which_heads_metrics_read_the_raw_scores(activation, metrics, units, reads_raw):
    assert labels_from_raw(activation, metrics, torch.zeros(5, units)) is reads_raw


# ------------------------------------------------------- precision / recall / F1 over classes
CLASS_SCORES = [("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)]


@pytest.mark.parametrize("name,reference", CLASS_SCORES)
@pytest.mark.parametrize("classes", [3, 10])
def test_multiclass_scores_are_macro_averaged_as_sklearn(name, reference, classes):
    prob = torch.softmax(torch.randn(N, classes, generator=GEN) * 2, dim=1)   # softmax head output (N, k)
    y = torch.randint(0, classes, (N,), generator=GEN)
    pred = prob.argmax(1).numpy()
    expected = reference(y.numpy(), pred, labels=range(classes), average="macro", zero_division=0)
    assert accumulate(name, prob, y) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name,reference", CLASS_SCORES)
def test_multiclass_scores_count_absent_classes_as_zero(name, reference):
    # Class 4 is neither predicted nor present and class 3 is present but never predicted:
    # both score 0 in the macro average (scikit-learn's zero_division=0 over every label).
    logits = torch.randn(N, 5, generator=GEN)
    logits[:, 3:] -= 100.0
    prob = torch.softmax(logits, dim=1)
    y = torch.randint(0, 4, (N,), generator=GEN)
    pred = prob.argmax(1).numpy()
    expected = reference(y.numpy(), pred, labels=range(5), average="macro", zero_division=0)
    assert accumulate(name, prob, y) == pytest.approx(expected, abs=1e-12)
    assert expected < reference(y.numpy(), pred, average="macro", zero_division=0)  # absent classes count


@pytest.mark.parametrize("name,reference", CLASS_SCORES)
def test_binary_target_on_a_two_unit_softmax_scores_the_positive_class(name, reference):
    prob = torch.softmax(torch.randn(N, 2, generator=GEN), dim=1)             # (N, 2)
    y = (torch.rand(N, generator=GEN) < 0.4).long()
    expected = reference(y.numpy(), prob.argmax(1).numpy(), average="binary")
    assert accumulate(name, prob, y) == pytest.approx(expected, abs=1e-12)


def predicted(prob):
    return (prob[:, 0] >= 0.5).long().numpy() if prob.shape[1] == 1 else prob.argmax(1).numpy()


@pytest.mark.parametrize("classes", [2, 6])
def test_test_set_scores_agree_with_the_training_metrics(classes):
    """evaluate.py's precision / recall / f1 are the training metrics' values on the same predictions."""
    from densepipe.evaluate import evaluate_output
    prob = torch.softmax(torch.randn(N, classes, generator=GEN), dim=1).double()
    y = torch.randint(0, classes, (N,), generator=GEN)
    head = prob[:, 1:] if classes == 2 else prob                              # binary: one sigmoid unit
    task = "binary" if classes == 2 else "multiclass"
    test, _ = evaluate_output(task, head.numpy(), y.numpy(), {"classes": list(range(classes))})
    average = "binary" if classes == 2 else "macro"
    for name, reference in CLASS_SCORES:
        expected = reference(y.numpy(), predicted(head), labels=range(classes), average=average, zero_division=0)
        assert test[name] == pytest.approx(expected, abs=1e-12)
        assert accumulate(name, head, y) == pytest.approx(test[name], abs=1e-12)


def test_trainer_multiclass_scores_over_uneven_chunks_equal_sklearn_macro(monkeypatch):
    monkeypatch.setattr(loop, "EVAL_CHUNK", 37)
    model, cfg = class_scoring_model(TargetSpec("multiclass", 10))
    x = torch.randn(500, 4, generator=GEN)
    y = torch.randint(0, 10, (500,), generator=GEN)
    _, values = Trainer(model, cfg.train).evaluate(Split({"features": x}, {"target": y}))
    pred = model.predict({"features": x})["target"].argmax(1).numpy()
    macro = {"labels": range(10), "average": "macro", "zero_division": 0}
    expected = [skm.accuracy_score(y, pred), skm.precision_score(y, pred, **macro),
                skm.recall_score(y, pred, **macro), skm.f1_score(y, pred, **macro)]
    np.testing.assert_allclose([v.item() for v in values], expected, rtol=1e-12)
    assert values[1].item() < 1.0                                            # not label 1 against label 0


def test_a_probability_of_exactly_one_half_is_the_negative_class():
    # Keras' binary_accuracy and scikit-learn's predict both use p > 0.5.
    from densepipe.evaluate import predicted_labels

    prob = torch.tensor([0.5, 0.5, 0.5000001, 0.2])
    target = torch.tensor([0, 0, 1, 0])
    stats = METRICS["accuracy"].stats(prob, target)
    assert METRICS["accuracy"].finish(stats).item() == 1.0
    assert predicted_labels(prob.numpy()).tolist() == [0, 0, 1, 0]
    assert predicted_labels(np.array([0.3, 0.7]), threshold=0.7).tolist() == [0, 0]


# ------------------------------------------------------------------------------------- AUC
def on_the_grid(shape):
    """Probabilities in the middle of the gaps between AUC thresholds: scores that share a gap are
    equal, so the curve through the thresholds is the exact ROC curve."""
    gaps = torch.randint(0, AUC_THRESHOLDS - 1, shape, generator=GEN)
    return (gaps.double() + 0.5) / (AUC_THRESHOLDS - 1)


def test_auc_on_grid_scores_is_the_exact_area():
    prob = on_the_grid((N, 1))
    y = (torch.rand(N, generator=GEN) < prob[:, 0]).long()  # better than chance: an area well above 0.5
    expected = skm.roc_auc_score(y.numpy(), prob[:, 0].numpy())
    assert expected > 0.6
    assert accumulate("auc", prob, y) == pytest.approx(expected, abs=1e-12)


def test_auc_of_several_classes_is_the_micro_average_over_one_hot_labels():
    prob = on_the_grid((N, 5))
    y = torch.where(torch.rand(N, generator=GEN) < 0.5, prob.argmax(1), torch.randint(0, 5, (N,), generator=GEN))
    hot = np.eye(5)[y.numpy()]
    expected = skm.roc_auc_score(hot.ravel(), prob.numpy().ravel())
    assert accumulate("AUC", prob, y) == pytest.approx(expected, abs=1e-12)


def test_auc_of_continuous_scores_is_close_to_the_exact_area():
    # Between thresholds the curve is a straight line: the area differs from the exact one by little.
    prob = torch.rand(N, 1, generator=GEN)
    y = (torch.rand(N, generator=GEN) < prob[:, 0]).long()
    assert accumulate("auc", prob, y) == pytest.approx(skm.roc_auc_score(y.numpy(), prob[:, 0].numpy()), abs=2e-3)
    assert metric_mode("val_auc") == "max"


def test_auc_thresholds_bracket_every_probability():
    t = auc_thresholds()
    assert len(t) == AUC_THRESHOLDS and t[0] < 0 and t[-1] > 1
    assert torch.allclose(t[1:-1], torch.arange(1, AUC_THRESHOLDS - 1, dtype=torch.float64) / (AUC_THRESHOLDS - 1))
    stats = METRICS["auc"].stats(torch.tensor([[0.0], [1.0], [0.5]]), torch.tensor([1, 0, 1]))
    assert stats[:, 0].tolist() == [2, 1] and stats[:, -1].tolist() == [0, 0]

"""Every loss against torch / scikit-learn references or its formula, and class weights."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, mean_absolute_percentage_error, mean_squared_log_error
from sklearn.utils.class_weight import compute_class_weight

from densepipe import config
from densepipe.data.preprocess import Preprocessor
from densepipe.nn.losses import LOSSES, loss_fn, weighted_mean
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.stages.train import class_weights
from densepipe.train.loop import Split, Trainer

GEN = torch.Generator().manual_seed(0)
N = 64


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale


def labels(k, n=N):
    return torch.randint(0, k, (n,), generator=GEN)


def loss(name, raw, target, head="linear", **params):
    return LOSSES[name](raw, target, head, **params)


def close(a, b, tol=1e-10):
    as64 = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(a), as64(b), rtol=tol, atol=tol)


# ------------------------------------------------------------------ regression
@pytest.mark.parametrize("width", [1, 3])
def test_mse_mae(width):
    p, t = randn(N, width), randn(N, width)
    close(loss("mse", p, t).mean(), F.mse_loss(p, t))
    close(loss("mae", p, t).mean(), F.l1_loss(p, t))
    close(loss("mean_squared_error", p, t), ((p - t) ** 2).mean(dim=1))


def test_regression_target_of_shape_n_matches_a_single_output():
    p, t = randn(N, 1), randn(N)
    close(loss("mse", p, t), (p[:, 0] - t) ** 2)


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
def test_huber(delta):
    p, t = randn(N, 2, scale=2), randn(N, 2, scale=2)
    d = (p - t).abs()
    formula = torch.where(d <= delta, 0.5 * d ** 2, delta * (d - 0.5 * delta)).mean(dim=1)
    close(loss("huber", p, t, delta=delta), formula)
    close(loss("huber", p, t, delta=delta).mean(), F.huber_loss(p, t, delta=delta))


@pytest.mark.parametrize("width", [1, 3])
def test_mape_and_msle_vs_sklearn(width):
    # Positive targets away from 0 (mape divides by them), predictions above epsilon (scikit-learn
    # refuses the log of a negative, Keras reads less than epsilon as epsilon). Keras' mape is in
    # percent, scikit-learn's a fraction.
    t = torch.rand(N, width, generator=GEN, dtype=torch.float64) * 10 + 0.5
    p = (t * (1 + 0.3 * randn(N, width))).clamp_min(0.01)
    close(loss("mean_absolute_percentage_error", p, t).mean(), 100 * mean_absolute_percentage_error(t, p))
    close(loss("msle", p, t).mean(), mean_squared_log_error(t, p))


def test_mape_and_msle_read_values_below_epsilon_as_epsilon():
    p, t = torch.tensor([[-5.0], [2.0]], dtype=torch.float64), torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    close(loss("mape", p, t), [100 * 5 / 1e-7, 100.0])
    close(loss("msle", p, t), [0.0, (math.log1p(2.0) - math.log1p(1.0)) ** 2])


def test_log_cosh_formula_and_stability():
    p, t = randn(N, 2, scale=3), randn(N, 2, scale=3)
    close(loss("log_cosh", p, t), torch.log(torch.cosh(p - t)).mean(dim=1))
    big = torch.tensor([[400.0]], dtype=torch.float64)     # cosh overflows; log cosh ~ |d| - log 2
    close(loss("log_cosh", big, torch.zeros(1, 1)), [400.0 - math.log(2.0)])


# -------------------------------------------------------------- binary
def test_binary_crossentropy_from_logits_vs_torch_and_sklearn():
    z, y = randn(N, 1, scale=3), labels(2)
    per = loss("binary_crossentropy", z, y, head="sigmoid")
    close(per.mean(), F.binary_cross_entropy_with_logits(z[:, 0], y.double()))
    close(per.mean(), log_loss(y.numpy(), torch.sigmoid(z[:, 0]).numpy()), tol=1e-9)


def test_binary_crossentropy_from_probabilities():
    p, y = torch.rand(N, 1, generator=GEN, dtype=torch.float64) * 0.98 + 0.01, labels(2)
    per = loss("binary_crossentropy", p, y, head="linear", from_logits=False)
    close(per.mean(), F.binary_cross_entropy(p[:, 0], y.double()))
    close(per.mean(), log_loss(y.numpy(), p[:, 0].numpy()), tol=1e-9)
    # A sigmoid head read as probabilities applies the sigmoid first.
    z = randn(N, 1)
    close(loss("bce", z, y, head="sigmoid", from_logits=False).mean(),
          F.binary_cross_entropy(torch.sigmoid(z[:, 0]), y.double()))


def test_binary_crossentropy_label_smoothing():
    z, y, ls = randn(N, 1), labels(2), 0.2
    smoothed = y.double() * (1 - ls) + 0.5 * ls      # Keras' binary label smoothing
    close(loss("binary_crossentropy", z, y, head="sigmoid", label_smoothing=ls).mean(),
          F.binary_cross_entropy_with_logits(z[:, 0], smoothed))


# ----------------------------------------------------------- categorical
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_categorical_crossentropy_vs_torch(smoothing):
    z, y = randn(N, 5, scale=2), labels(5)
    expected = F.cross_entropy(z, y, reduction="none", label_smoothing=smoothing)
    close(loss("categorical_crossentropy", z, F.one_hot(y, 5).double(), head="softmax",
               label_smoothing=smoothing), expected)
    close(loss("categorical_crossentropy", z, y, head="softmax", label_smoothing=smoothing), expected)


def test_categorical_crossentropy_soft_targets_and_probabilities():
    z = randn(N, 4)
    t = torch.softmax(randn(N, 4), dim=1)            # a distribution per row
    close(loss("cce", z, t, head="softmax"), F.cross_entropy(z, t, reduction="none"))
    p = torch.softmax(z, dim=1)
    close(loss("cce", p, t, head="linear", from_logits=False), -(t * p.log()).sum(1))


def test_sparse_categorical_crossentropy_vs_torch_and_sklearn():
    z, y = randn(N, 6), labels(6)
    per = loss("sparse_categorical_crossentropy", z, y, head="softmax")
    close(per, F.cross_entropy(z, y, reduction="none"))
    close(per.mean(), log_loss(y.numpy(), torch.softmax(z, 1).numpy(), labels=range(6)), tol=1e-9)
    # from probabilities (a softmax output layer the user keeps as is)
    close(loss("scce", torch.softmax(z, 1), y, head="linear", from_logits=False), per, tol=1e-9)


def test_kl_divergence_vs_torch():
    z = randn(N, 4)
    t = torch.softmax(randn(N, 4), dim=1)
    expected = F.kl_div(torch.log_softmax(z, 1), t, reduction="none").sum(1)
    close(loss("kl_divergence", z, t, head="softmax"), expected)
    close(loss("kld", z, t, head="softmax").mean(),
          F.kl_div(torch.log_softmax(z, 1), t, reduction="batchmean"))


# ------------------------------------------------------------ margin losses
@pytest.mark.parametrize("encoding", ["01", "pm1"])
def test_hinge_and_squared_hinge(encoding):
    z, y01 = randn(N, 1, scale=2), labels(2)
    y = y01 if encoding == "01" else 2 * y01 - 1
    s = (2 * y01 - 1).double().reshape(-1, 1)        # {-1, 1}
    close(loss("hinge", z, y), torch.clamp(1 - s * z, min=0).mean(1))
    close(loss("squared_hinge", z, y), (torch.clamp(1 - s * z, min=0) ** 2).mean(1))


def test_perceptron_criterion():
    z, y = randn(N, 1), labels(2)
    s = (2 * y - 1).double().reshape(-1, 1)
    per = loss("perceptron", z, y, head="step")
    close(per, torch.clamp(-s * z, min=0).mean(1))
    # Its gradient is the perceptron rule: -y x on misclassified rows, 0 elsewhere.
    zz = z.clone().requires_grad_(True)
    loss("perceptron", zz, y, head="step").sum().backward()
    close(zz.grad, torch.where(s * z < 0, -s, torch.zeros_like(s)))


def test_categorical_hinge_keras_formula():
    z, y = randn(N, 5, scale=2), labels(5)
    zn, yn = z.numpy(), y.numpy()
    onehot = np.eye(5)[yn]
    # Keras: pos = sum(y_true * y_pred), neg = max((1 - y_true) * y_pred), max(0, neg - pos + 1)
    pos, neg = (onehot * zn).sum(1), ((1 - onehot) * zn).max(1)
    close(loss("categorical_hinge", z, y), np.maximum(0.0, neg - pos + 1))
    close(loss("categorical_hinge", z, torch.tensor(onehot)), np.maximum(0.0, neg - pos + 1))  # one-hot targets
    # A true score ahead of every other by the margin costs nothing.
    clear = torch.full((3, 5), -1.0, dtype=torch.float64)
    clear[torch.arange(3), torch.tensor([0, 2, 4])] = 1.5
    assert loss("categorical_hinge", clear, torch.tensor([0, 2, 4])).tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------ counts and directions
@pytest.mark.parametrize("width", [1, 3])
def test_poisson_vs_torch_and_keras_formula(width):
    rate = F.softplus(randn(N, width))
    counts = torch.poisson(torch.full((N, width), 2.0, dtype=torch.float64), generator=GEN)
    ours = loss("poisson", rate, counts)
    close(ours, (rate - counts * torch.log(rate + 1e-7)).mean(1))  # Keras' poisson
    close(ours.mean(), F.poisson_nll_loss(rate, counts, log_input=False, eps=1e-7))
    assert torch.isfinite(loss("poisson", torch.zeros(2, width, dtype=torch.float64),
                               torch.ones(2, width, dtype=torch.float64))).all()


def test_cosine_similarity_vs_torch_and_keras_sign():
    p, t = randn(N, 4), randn(N, 4)
    ours = loss("cosine_similarity", p, t)
    close(ours, -F.cosine_similarity(p, t, dim=1), tol=1e-12)
    close(loss("cosine", 3 * t, t), -torch.ones(N, dtype=torch.float64))       # same direction: -1
    close(loss("cosine_similarity", -t, t), torch.ones(N, dtype=torch.float64))  # opposite: +1
    zero = torch.zeros(1, 4, dtype=torch.float64)
    close(loss("cosine_similarity", zero, t[:1]), torch.zeros(1, dtype=torch.float64))  # Keras: 0, not NaN


def test_loss_fn_binds_parameters():
    p, t = randn(N, 1, scale=3), randn(N, 1)
    close(loss_fn("huber", delta=0.3)(p, t, "linear"), loss("huber", p, t, delta=0.3))


# ------------------------------------------------------------- class weights
def test_balanced_class_weights_equal_sklearn():
    y = np.array([0] * 50 + [1] * 30 + [2] * 7 + [3] * 13)
    frame = pd.DataFrame({"x": np.arange(len(y), dtype=float), "y": y})
    pre = Preprocessor.fit(frame, ["y"], {"y": "multiclass"}, config.ScaleConfig())
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                        "train": {"class_weight": "balanced"}})
    weights = class_weights(cfg, pre, {"y": y})["y"]
    expected = compute_class_weight("balanced", classes=np.unique(y), y=y)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


def test_explicit_class_weights_by_label():
    frame = pd.DataFrame({"x": np.arange(6.0), "y": ["no", "yes", "no", "yes", "no", "no"]})
    pre = Preprocessor.fit(frame, ["y"], {"y": "binary"}, config.ScaleConfig())
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                        "train": {"class_weight": {"yes": 3.0}}})
    assert class_weights(cfg, pre, {"y": np.array([0, 1, 0, 1, 0, 0])})["y"].tolist() == [1.0, 3.0]
    bad = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                        "train": {"class_weight": {"maybe": 3.0}}})
    with pytest.raises(config.ConfigError, match=r"'maybe'.*classes: \['no', 'yes'\]"):
        class_weights(bad, pre, {"y": np.array([0, 1])})


def test_class_weights_on_a_target_without_classes_are_refused():
    frame = pd.DataFrame({"x": np.arange(6.0), "y": np.linspace(0, 1, 6)})
    pre = Preprocessor.fit(frame, ["y"], {"y": "regression"}, config.ScaleConfig())
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto"}]},
                        "train": {"class_weight": "balanced"}})
    with pytest.raises(config.ConfigError, match=r"^train\.class_weight: weights classes, but no target has "
                                                 r"classes: 'y' \(regression\); remove train\.class_weight$"):
        class_weights(cfg, pre, {"y": np.zeros(6)})


def test_class_weights_shape_the_training_loss_only():
    # As Keras' class_weight: the training loss is weighted, the validation loss is not.
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": "auto", "activation": "auto"}]},
                        "train": {"progress": "quiet", "epochs": 1, "batch_size": 40}})
    spec = DataSpec({"features": 5}, {"target": TargetSpec("multiclass", 3)})
    model = build_model(cfg.model, cfg.train, spec, seed=0)
    x, y = torch.randn(40, 5, generator=GEN), labels(3, 40)
    table = torch.tensor([0.5, 2.0, 1.5])
    trainer = Trainer(model, cfg.train, class_weights={"target": table})
    with torch.no_grad():
        before = F.cross_entropy(model({"features": x})["target"], y, reduction="none")
    data = Split({"features": x}, {"target": y})
    history = trainer.fit(data, data)  # one step over all 40 rows
    assert history.series("loss")[0] == pytest.approx(weighted_mean(before, table[y]).item(), rel=1e-5)
    assert history.series("loss")[0] == pytest.approx((table[y] * before).mean().item(), rel=1e-5)
    with torch.no_grad():
        after = F.cross_entropy(model({"features": x})["target"], y)
    assert history.series("val_loss")[0] == pytest.approx(after.item(), rel=1e-5)
    losses, _ = trainer.evaluate(data)
    assert losses[0].item() == pytest.approx(after.item(), rel=1e-5)

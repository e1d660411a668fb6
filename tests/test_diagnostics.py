"""The report's plain-language flags on histories built to show (or not show) each problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from densepipe.report import diagnostics as dg


def history(loss, val_loss=None, **columns) -> pd.DataFrame:
    h = {"epoch": np.arange(1, len(loss) + 1), "loss": loss, **columns}
    if val_loss is not None:
        h["val_loss"] = val_loss
    return pd.DataFrame(h)


OVERFIT = history([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [1.0, 0.7, 0.6, 0.8, 0.9, 1.1])


def test_overfitting_advises_a_remedy_unless_the_model_holds_the_best_epoch():
    flag = dg.overfitting({"history": OVERFIT})
    assert flag.startswith("Overfitting: validation loss was lowest at epoch 3 (0.6) and rose to 1.1")
    assert flag.endswith("Try early stopping with restore_best_weights, dropout, L2 regularization or fewer units.")
    held = dg.overfitting({"history": OVERFIT, "held_epoch": 3})
    assert held.endswith("The model file holds epoch 3, so the test metrics are those of the best one.")
    assert dg.overfitting({"history": history([1.0, 0.6, 0.4, 0.3], [1.0, 0.7, 0.6, 0.55])}) is None


@pytest.mark.parametrize("loss, starts", [
    ([2.8e4, 5e4, 9.7e4], "Underfitting: the training loss rose (2.8e+04 -> 9.7e+04)"),
    ([1.0, 0.98, 0.95], "Underfitting: the training loss barely moved (1 -> 0.95)"),
    ([1.0, 0.5, 0.2], None),
])
def test_underfitting_tells_a_rising_loss_from_a_flat_one(loss, starts):
    flag = dg.underfitting({"history": history(loss)})
    assert flag is None if starts is None else flag.startswith(starts)


def norms(*layers) -> dict:
    return {f"grad_norm/dense_{i + 1}": v for i, v in enumerate(layers)}


@pytest.mark.parametrize("columns, expected", [
    # large from the first epoch on and falling (an unscaled regression target): healthy
    (norms([2.3e3, 1.8e3, 1.2e3], [9e2, 7e2, 5e2]), None),
    (norms([1.0, 30.0, 250.0], [0.5, 0.6, 0.7]),
     "Exploding gradients: the gradient norm of dense_1 grew 250x over training (first epoch 1, peak 250)."),
    (norms([1.0, 2.0, np.inf], [0.5, 0.6, 0.7]), "Exploding gradients: a gradient norm became NaN/inf."),
])
def test_exploding_gradients_are_judged_by_growth(columns, expected):
    flag = dg.exploding({"history": history([1.0, 0.9, 0.8], **columns)})
    assert flag is None if expected is None else flag.startswith(expected)


def test_vanishing_gradients_name_the_weak_layers():
    flag = dg.vanishing({"history": history([1.0, 0.9], **norms([1e-6, 2e-6], [0.5, 0.4], [0.3, 0.2]))})
    assert flag.startswith("Vanishing gradients: layer(s) dense_1 get gradients")
    assert dg.vanishing({"history": history([1.0, 0.9], **norms([0.1, 0.2], [0.5, 0.4]))}) is None


def test_report_tables_show_flags_as_yes_or_no():
    from densepipe.report.html import _fmt

    assert [_fmt(True), _fmt(False), _fmt(3), _fmt(1234), _fmt(0.123456)] == ["yes", "no", "3", "1,234", "0.1235"]


@pytest.mark.parametrize("layers", [3, 12])
def test_gradient_norm_curves_each_get_their_own_colour(layers):
    from matplotlib.colors import to_hex

    from densepipe.report.figures import grad_norms

    h = history([1.0, 0.9, 0.8], **norms(*([0.1, 0.2, 0.3],) * layers))
    ax = grad_norms({"history": h}).axes[0]
    assert len({to_hex(line.get_color()) for line in ax.get_lines()}) == layers
    assert ax.get_title() == "gradient L2 norm per dense layer (RMS over the epoch's steps)"

"""Training metrics as sufficient statistics, so an epoch's value is exact and
accumulates on the device with no host sync per batch.

Each metric maps (pred, target) of one batch to a small vector of sums
(`stats`), and an epoch's summed vector to its value (`finish`). `pred` is the
head's output: probabilities for sigmoid/softmax heads, values for regression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from densepipe.registry import Registry


@dataclass(frozen=True)
class Metric:
    stats: Callable[[Tensor, Tensor], Tensor]   # batch -> sums (k,)
    finish: Callable[[Tensor], Tensor]          # summed (k,) -> value
    mode: str = "max"                           # which direction is better (for monitors)
    task: str = "any"                           # classification | regression | any


METRICS: Registry[Metric] = Registry("metric")


def _labels(pred: Tensor) -> Tensor:
    if pred.dim() == 1 or pred.shape[-1] == 1:
        return (pred.reshape(-1) >= 0.5).long()
    return pred.argmax(dim=-1)


def _flat(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    pred = pred.reshape(pred.shape[0], math.prod(pred.shape[1:]))  # not -1: a shard may have no rows
    return pred, target.to(pred.dtype).reshape(pred.shape)


def _ratio(s: Tensor) -> Tensor:
    return s[0] / s[1].clamp_min(1)


def _count(t: Tensor) -> Tensor:
    return torch.tensor(float(t.numel()), device=t.device, dtype=torch.float64)


def _accuracy_stats(pred, target):
    hits = (_labels(pred) == target.reshape(-1).long()).sum().double()
    return torch.stack([hits, _count(target.reshape(-1))])


METRICS.add("accuracy", Metric(_accuracy_stats, _ratio, "max", "classification"),
            ("acc", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy"))


def _confusion_stats(pred, target):
    p, t = _labels(pred), target.reshape(-1).long()
    tp = ((p == 1) & (t == 1)).sum().double()
    fp = ((p == 1) & (t == 0)).sum().double()
    fn = ((p == 0) & (t == 1)).sum().double()
    return torch.stack([tp, fp, fn])


METRICS.add("precision", Metric(_confusion_stats, lambda s: s[0] / (s[0] + s[1]).clamp_min(1), "max",
                                "classification"))
METRICS.add("recall", Metric(_confusion_stats, lambda s: s[0] / (s[0] + s[2]).clamp_min(1), "max",
                             "classification"))
METRICS.add("f1", Metric(_confusion_stats, lambda s: 2 * s[0] / (2 * s[0] + s[1] + s[2]).clamp_min(1), "max",
                         "classification"))


def _abs_stats(pred, target):
    p, t = _flat(pred, target)
    return torch.stack([(p - t).abs().sum().double(), _count(t)])


def _sq_stats(pred, target):
    p, t = _flat(pred, target)
    return torch.stack([((p - t) ** 2).sum().double(), _count(t)])


def _r2_stats(pred, target):
    # Per output column: several outputs average their R^2, as scikit-learn's r2_score does.
    p, t = _flat(pred, target)
    t64 = t.double()
    n = t64.new_full(t64.shape[1:], t.shape[0])
    return torch.stack([((p - t) ** 2).sum(0).double(), t64.sum(0), (t64 ** 2).sum(0), n])  # (4, outputs)


def _r2_finish(s):
    total = s[2] - s[1] ** 2 / s[3].clamp_min(1)
    return (1 - s[0] / total.clamp_min(1e-12)).mean()


METRICS.add("mae", Metric(_abs_stats, _ratio, "min", "regression"), ("mean_absolute_error",))
METRICS.add("mse", Metric(_sq_stats, _ratio, "min", "regression"), ("mean_squared_error",))
METRICS.add("rmse", Metric(_sq_stats, lambda s: _ratio(s).sqrt(), "min", "regression"),
            ("root_mean_squared_error",))
METRICS.add("r2", Metric(_r2_stats, _r2_finish, "max", "regression"), ("r2_score",))

DEFAULT_METRICS = {"binary": ["accuracy"], "multiclass": ["accuracy"], "regression": ["mae"]}


def metric_mode(name: str) -> str:
    """'min' or 'max' for a monitored quantity such as 'val_loss' or 'accuracy'."""
    base = name.removeprefix("val_").split("/")[-1]
    if base == "loss" or base.endswith("_loss"):
        return "min"
    if base in METRICS:
        return METRICS[base].mode
    # Several outputs log "<output>_<metric>" (val_species_accuracy): the longest metric name wins.
    suffix = next((m for m in sorted(METRICS.names(), key=len, reverse=True) if base.endswith(f"_{m}")), None)
    return METRICS[suffix].mode if suffix else "min"

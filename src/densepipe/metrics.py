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

from densepipe.nn.activations import resolve
from densepipe.nn.losses import LOSSES
from densepipe.registry import Registry

# The target tasks a metric can read, checked when the model's heads are built (a binary
# target on a two-unit softmax is read as multiclass there). Class metrics compare predicted
# labels with class ids. Value metrics compare the output with the target element by element,
# which a one-unit binary head allows too: its probability against the 0/1 label (mse is the
# Brier score); a softmax's k scores against one class id do not line up.
CLASS_TASKS = ("binary", "multiclass")
VALUE_TASKS = ("regression", "reconstruction", "binary")


@dataclass(frozen=True)
class Metric:
    stats: Callable[[Tensor, Tensor], Tensor]   # batch -> sums (k,) or (k, classes / outputs)
    finish: Callable[[Tensor], Tensor]          # summed stats -> value
    mode: str = "max"                           # which direction is better (for monitors)
    tasks: tuple[str, ...] = CLASS_TASKS + VALUE_TASKS  # target tasks it can read
    by_label: bool = False                      # reads only each row's predicted class (_labels)


METRICS: Registry[Metric] = Registry("metric")


def _labels(pred: Tensor) -> Tensor:
    if pred.dim() == 1 or pred.shape[-1] == 1:
        return (pred.reshape(-1) > 0.5).long()  # strict, as Keras and scikit-learn: p = 0.5 is negative
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


METRICS.add("accuracy", Metric(_accuracy_stats, _ratio, "max", CLASS_TASKS, by_label=True),
            ("acc", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy"))


def labels_from_raw(activation: str, metrics: list[str], raw: Tensor) -> bool:
    """Whether a head's metrics may read its raw scores in place of its output: when each of them
    reads only the predicted class, the output has several units (whose argmax is the class; one
    unit's is its 0.5 threshold) and the activation keeps every row's order. The argmax is then the
    same, and the activation (a softmax over narrow rows: a few percent of a small model's epoch)
    is left out."""
    return (raw.dim() > 1 and raw.shape[-1] > 1 and resolve(activation).keeps_order
            and all(METRICS[m].by_label for m in metrics))


def _classes(pred: Tensor) -> int:
    return max(pred.shape[-1] if pred.dim() > 1 else 1, 2)  # one unit decides between two classes


def _confusion_stats(pred, target):
    """Per class: hits, predicted count, true count -> (3, classes). Counts add up over steps and
    ranks, and every per-class precision / recall / F1 follows from them. Compared against the
    class ids rather than scattered into bins: plain sums, deterministic on every device."""
    p, t = _labels(pred), target.reshape(-1).long()
    classes = torch.arange(_classes(pred), device=p.device)
    is_pred, is_true = p[:, None] == classes, t[:, None] == classes  # (N, classes) bool
    return torch.stack([(is_pred & is_true).sum(0), is_pred.sum(0), is_true.sum(0)]).double()


def class_average(per_class):
    """One score from per-class scores (..., classes), torch or numpy: two classes give the
    second (positive) class's score, as scikit-learn's average="binary"; more give their mean,
    as average="macro" over every class. Shared with the test-set metrics in evaluate.py."""
    return per_class[..., 1] if per_class.shape[-1] == 2 else per_class.mean(-1)


def _per_class(score: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    # clamp_min(1): a class never predicted (or never present) scores 0, scikit-learn's zero_division=0
    return lambda s: class_average(score(s[0], s[1].clamp_min(1), s[2].clamp_min(1)))


METRICS.add("precision", Metric(_confusion_stats, _per_class(lambda hit, npred, ntrue: hit / npred), "max",
                                CLASS_TASKS, by_label=True))
METRICS.add("recall", Metric(_confusion_stats, _per_class(lambda hit, npred, ntrue: hit / ntrue), "max",
                             CLASS_TASKS, by_label=True))
METRICS.add("f1", Metric(_confusion_stats, _per_class(lambda hit, npred, ntrue: 2 * hit / (npred + ntrue)),
                         "max", CLASS_TASKS, by_label=True))


# Area under the ROC curve as Keras' AUC computes it: true and false positive counts at a fixed
# grid of thresholds (counts add up over steps and ranks, unlike a ranking), the curve through
# those points integrated by trapezoids. Close to the exact area (scikit-learn's roc_auc_score):
# equal when no two distinct scores fall between the same pair of thresholds.
AUC_THRESHOLDS = 200  # Keras' num_thresholds default


def auc_thresholds(device=None) -> Tensor:
    # Evenly spaced on [0, 1], the ends just outside it: every probability is above the first
    # threshold (its counts are all positives and all negatives) and none above the last.
    t = torch.linspace(0, 1, AUC_THRESHOLDS, dtype=torch.float64, device=device)
    t[0], t[-1] = -1e-7, 1 + 1e-7
    return t


def _scores_and_labels(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Every (score, is-positive) pair the curve counts: a one-unit head's probability against its
    0/1 label; a softmax's probabilities against the one-hot class ids, all pooled (the micro-average,
    as Keras' AUC on one-hot labels)."""
    t = target.reshape(-1).long()
    if pred.dim() == 1 or pred.shape[-1] == 1:
        return pred.reshape(-1), t == 1
    hot = t[:, None] == torch.arange(pred.shape[-1], device=t.device)
    return pred.reshape(-1), hot.reshape(-1)


def _above(scores: Tensor, thresholds: Tensor) -> Tensor:
    """How many scores lie strictly above each threshold (sorted, then searched: deterministic)."""
    ordered = scores.double().sort().values
    return len(ordered) - torch.searchsorted(ordered, thresholds, right=True)


def _auc_stats(pred, target):
    """Positives and negatives scored above each threshold -> (2, thresholds)."""
    score, positive = _scores_and_labels(pred, target)
    thresholds = auc_thresholds(score.device)
    return torch.stack([_above(score[positive], thresholds), _above(score[~positive], thresholds)]).double()


def _auc_finish(s):
    tpr = s[0] / s[0, 0].clamp_min(1)  # at the first threshold every score is above it
    fpr = s[1] / s[1, 0].clamp_min(1)  # no positives or no negatives: area 0, as Keras
    return ((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2).sum()


METRICS.add("auc", Metric(_auc_stats, _auc_finish, "max", CLASS_TASKS), ("roc_auc",))


TOP_K = 5  # Keras' default k for its top-k accuracies


def _top_k_stats(pred, target):
    """A row counts when its class is among the k highest scores. Fewer than k scores rank above
    the true class's: ties at the boundary count as in, as tf.math.in_top_k (Keras) has it."""
    t = target.reshape(-1, 1).long()
    above = (pred > pred.gather(1, t)).sum(1)                     # (N,) scores beating the true class
    return torch.stack([(above < TOP_K).sum().double(), _count(t)])


METRICS.add("top_k_accuracy", Metric(_top_k_stats, _ratio, "max", ("multiclass",)),
            ("top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy"))


def _per_row_stats(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """A value loss as a metric: its per-row values summed, and the rows. `pred` is already the
    head's output, which the loss then reads as is (a linear head)."""
    def stats(pred, target):
        per_row = LOSSES[loss](pred, target, "linear")
        return torch.stack([per_row.sum().double(), _count(per_row)])
    return stats


def _r2_stats(pred, target):
    # Per output column: several outputs average their R^2, as scikit-learn's r2_score does.
    p, t = _flat(pred, target)
    t64 = t.double()
    n = t64.new_full(t64.shape[1:], t.shape[0])
    return torch.stack([((p - t) ** 2).sum(0).double(), t64.sum(0), (t64 ** 2).sum(0), n])  # (4, outputs)


def _r2_finish(s):
    total = s[2] - s[1] ** 2 / s[3].clamp_min(1)
    return (1 - s[0] / total.clamp_min(1e-12)).mean()


METRICS.add("mae", Metric(_per_row_stats("mae"), _ratio, "min", VALUE_TASKS), ("mean_absolute_error",))
METRICS.add("mse", Metric(_per_row_stats("mse"), _ratio, "min", VALUE_TASKS), ("mean_squared_error",))
METRICS.add("rmse", Metric(_per_row_stats("mse"), lambda s: _ratio(s).sqrt(), "min", VALUE_TASKS),
            ("root_mean_squared_error",))
METRICS.add("r2", Metric(_r2_stats, _r2_finish, "max", VALUE_TASKS), ("r2_score",))
METRICS.add("mape", Metric(_per_row_stats("mape"), _ratio, "min", VALUE_TASKS), ("mean_absolute_percentage_error",))
METRICS.add("msle", Metric(_per_row_stats("msle"), _ratio, "min", VALUE_TASKS), ("mean_squared_logarithmic_error",))

DEFAULT_METRICS = {"binary": ["accuracy"], "multiclass": ["accuracy"], "regression": ["mae"]}


def metric_mode(name: str) -> str | None:
    """'min' or 'max' for a monitored quantity such as 'val_loss' or 'accuracy'; None for one
    with no better direction (lr, a gradient norm)."""
    base = name.removeprefix("val_").split("/")[-1]
    if base == "loss" or base.endswith("_loss"):
        return "min"
    if base in METRICS:
        return METRICS[base].mode
    # Several outputs log "<output>_<metric>" (val_species_accuracy): the longest metric name wins.
    suffix = next((m for m in sorted(METRICS.names(), key=len, reverse=True) if base.endswith(f"_{m}")), None)
    return METRICS[suffix].mode if suffix else None

"""Test-set metrics and plot data per output, by task (scikit-learn as the reference
implementation of every metric)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from densepipe.metrics import class_average
from densepipe.registry import Registry

EVALUATORS: Registry = Registry("task")


def predicted_labels(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    if prob.ndim == 1 or prob.shape[1] == 1:
        return (prob.reshape(-1) > threshold).astype(int)  # strict, as Keras and scikit-learn
    return prob.argmax(axis=1)


def _positive_prob(prob: np.ndarray) -> np.ndarray:
    return prob.reshape(-1) if prob.ndim == 1 or prob.shape[1] == 1 else prob[:, 1]


def _classification(prob: np.ndarray, y: np.ndarray, classes: list, threshold: float, binary: bool):
    pred = predicted_labels(prob, threshold)
    labels = list(range(len(classes)))
    out = {
        "accuracy": skm.accuracy_score(y, pred),
        "precision_macro": skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0),
        "f1_macro": skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
    }
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    # The names the training metrics log, averaged over classes as they are (binary for two
    # classes, macro for more), so train, val and test values compare like for like.
    out.update(precision=class_average(p), recall=class_average(r), f1=class_average(f))
    out["per_class"] = {str(c): {"precision": p[i], "recall": r[i], "f1": f[i], "support": int(support[i])}
                        for i, c in enumerate(classes)}
    plots = {"confusion": pd.DataFrame({"actual": np.asarray(classes, dtype=object)[y].astype(str),
                                        "predicted": np.asarray(classes, dtype=object)[pred].astype(str)})}
    if binary:
        score = _positive_prob(prob)
        full = np.stack([1 - score, score], axis=1)
        if len(np.unique(y)) == 2:
            out["roc_auc"] = skm.roc_auc_score(y, score)
            fpr, tpr, thr = skm.roc_curve(y, score)
            plots["roc"] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})
    else:
        full = prob / prob.sum(axis=1, keepdims=True)
        if len(np.unique(y)) == len(classes):
            out["roc_auc"] = skm.roc_auc_score(y, full, multi_class="ovr", average="macro", labels=labels)
            # Micro-averaged one-vs-rest ROC: every (sample, class) pair as one binary decision.
            onehot = np.eye(len(classes))[y]
            fpr, tpr, thr = skm.roc_curve(onehot.ravel(), full.ravel())
            plots["roc"] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})
    out["log_loss"] = skm.log_loss(y, np.clip(full, 1e-7, 1 - 1e-7), labels=labels)
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    out["classes"] = [str(c) for c in classes]  # the matrix's row / column order (JSON keys get sorted)
    return out, plots


@EVALUATORS.register("binary")
def evaluate_binary(prob, y, spec, threshold):
    return _classification(prob, y, spec["classes"], threshold, binary=True)


@EVALUATORS.register("multiclass")
def evaluate_multiclass(prob, y, spec, threshold):
    return _classification(prob, y, spec["classes"], threshold, binary=False)


def _regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    mse = skm.mean_squared_error(y, pred)
    return {"mae": skm.mean_absolute_error(y, pred), "mse": mse, "rmse": float(np.sqrt(mse)),
            "r2": skm.r2_score(y, pred)}


@EVALUATORS.register("regression")
def evaluate_regression(pred, y, spec, threshold):
    """pred, y in the target's original units."""
    out = _regression_metrics(pred, y)
    p, t = pred.reshape(-1), y.reshape(-1)
    return out, {"residuals": pd.DataFrame({"actual": t, "predicted": p, "residual": t - p})}


@EVALUATORS.register("reconstruction")
def evaluate_reconstruction(pred, y, spec, threshold):
    err = ((pred - y) ** 2).mean(axis=1)
    out = _regression_metrics(pred, y)
    out["per_row_mse_p95"] = float(np.percentile(err, 95))
    return out, {"reconstruction_error": pd.DataFrame({"row": np.arange(len(err)), "mse": err})}


def evaluate_output(task: str, pred: np.ndarray, y: np.ndarray, spec: dict, threshold: float = 0.5):
    metrics, plots = EVALUATORS[task](pred, y, spec, threshold)
    return _plain(metrics), plots


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v

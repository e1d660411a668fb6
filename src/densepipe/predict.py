"""Predictions on raw feature rows: preprocessing, the model, decoding of labels.
Used by `densepipe predict`, the evaluate stage and the MLflow model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from densepipe.checkpoint import LoadedModel
from densepipe.data.arrays import input_columns
from densepipe.data.preprocess import RECONSTRUCTION
from densepipe.evaluate import predicted_labels


def model_outputs(loaded: LoadedModel, features: np.ndarray) -> dict[str, np.ndarray]:
    """Head outputs (probabilities / scaled values) for preprocessed features, by output name."""
    X = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    inputs = {name: X[:, idx] for name, idx in input_columns(loaded.preprocessor, loaded.config.model).items()}
    device = next(loaded.model.parameters()).device
    outs = loaded.model.predict({k: v.to(device) for k, v in inputs.items()})
    return {k: v.float().cpu().numpy() for k, v in outs.items()}


def predict_frame(loaded: LoadedModel, frame: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """One row per input row: the decoded prediction per output, and class probabilities."""
    pre = loaded.preprocessor
    threshold = loaded.config.evaluate.threshold if threshold is None else threshold
    outs = model_outputs(loaded, pre.transform(frame))
    result = pd.DataFrame(index=frame.index)
    many = len(outs) > 1
    for name, out in outs.items():
        head = loaded.model.heads[name]
        spec = pre.targets[head.target]
        col = f"{name}_prediction" if many else "prediction"
        if spec["task"] in ("binary", "multiclass"):
            result[col] = pre.decode(head.target, predicted_labels(out, threshold))
            probs = out if out.shape[1] > 1 else np.concatenate([1 - out, out], axis=1)
            for i, c in enumerate(spec["classes"]):
                result[f"{name}_proba_{c}" if many else f"proba_{c}"] = probs[:, i]
        elif spec["task"] == RECONSTRUCTION:
            for i, f in enumerate(pre.feature_names):
                result[f"{col}_{f}"] = out[:, i]
        else:
            values = pre.decode(head.target, out)
            if values.shape[1] == 1:
                result[col] = values[:, 0]
            else:
                for i in range(values.shape[1]):
                    result[f"{col}_{i}"] = values[:, i]
    return result

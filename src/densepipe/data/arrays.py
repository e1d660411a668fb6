"""Processed arrays on disk (.npz, no pickle) and their conversion to the
trainer's Split: model inputs selected by raw column, targets by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from densepipe.data.preprocess import Preprocessor
from densepipe.io import read_or_explain, write_with
from densepipe.nn.model import DataSpec, TargetSpec
from densepipe.train.loop import Split

DEFAULT_INPUT = "features"


def save_arrays(path: str | Path, features: np.ndarray, targets: dict[str, np.ndarray]) -> None:
    arrays = {"X": features, **{f"y:{k}": v for k, v in targets.items()}}
    write_with(path, lambda p: _savez(p, arrays))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # An open file, not the path: np.savez would append ".npz" to the temp name. Closed
    # here so every byte is on disk before the rename.
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_arrays(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    def read(p):
        with np.load(p, allow_pickle=False) as z:
            return z["X"], {k[2:]: z[k] for k in z.files if k.startswith("y:")}
    return read_or_explain(path, read, "the scale stage's arrays", "run the scale stage again")


def input_columns(pre: Preprocessor, model_cfg) -> dict[str, list[int]]:
    """Feature indices per model input; `rest` takes the columns no other input claimed."""
    if not model_cfg.inputs:
        return {DEFAULT_INPUT: list(range(len(pre.feature_names)))}
    out, claimed = {}, set()
    for name, icfg in model_cfg.inputs.items():
        if isinstance(icfg.columns, list):
            out[name] = pre.column_indices(icfg.columns)
            claimed.update(out[name])
    for name, icfg in model_cfg.inputs.items():
        if icfg.columns == "all":
            out[name] = list(range(len(pre.feature_names)))
        elif icfg.columns == "rest":
            out[name] = [i for i in range(len(pre.feature_names)) if i not in claimed]
    empty = [n for n, idx in out.items() if not idx]
    if empty:
        raise ValueError(f"model.inputs {empty} select no feature columns")
    return {n: out[n] for n in model_cfg.inputs}


def data_spec(pre: Preprocessor, model_cfg) -> DataSpec:
    inputs = {k: len(v) for k, v in input_columns(pre, model_cfg).items()}
    targets = {name: TargetSpec(t["task"], t["width"] if t["task"] != "regression" else t.get("width", 1),
                                t.get("classes")) for name, t in pre.targets.items()}
    return DataSpec(inputs, targets)


def to_split(features: np.ndarray, targets: dict[str, np.ndarray], pre: Preprocessor, model_cfg) -> Split:
    X = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    inputs = {name: X[:, idx].contiguous() if len(idx) != X.shape[1] else X
              for name, idx in input_columns(pre, model_cfg).items()}
    ys = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in targets.items()}
    return Split(inputs, ys)

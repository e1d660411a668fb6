"""The fitted preprocessor: imputation, categorical encoding and scaling of
features, label encoding / scaling of targets. Fitted on the training rows only
and stored as JSON (no pickle), so it loads safely anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from densepipe.data.sources import DataError, shown
from densepipe.io import read_or_explain, write_text

RECONSTRUCTION = "reconstruction"  # the target name of autoencoders: the features themselves
_SMOOTHING = 10.0  # target encoding: weight of the global mean, in rows


def _center_scale(values: np.ndarray, how: str) -> tuple[float, float]:
    if how == "standard":
        c, s = float(np.mean(values)), float(np.std(values))
    elif how == "minmax":
        c, s = float(np.min(values)), float(np.max(values) - np.min(values))
    elif how == "robust":
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        c, s = float(med), float(q3 - q1)
    else:
        c, s = 0.0, 1.0
    return c, (s if s > 1e-12 else 1.0)  # a constant column stays finite


def _impute_value(values: pd.Series, how: str, setting: str | None = None) -> float | str | None:
    """The fill value for `values` by strategy `how`; `setting` is the scale.impute the user
    wrote, when it differs (categorical columns use most_frequent for any strategy)."""
    present = values.dropna()
    if how == "none":
        return None
    if present.empty:  # nothing to compute a fill value from: say so now, not as "missing values" later
        raise DataError(f"column '{values.name}' has no values: all {len(values)} training row(s) are "
                        f"missing, so scale.impute '{setting or how}' has nothing to impute from; drop the column "
                        "(list it in data.drop) or fill it in the data")
    if how == "median" and pd.api.types.is_numeric_dtype(present):
        return float(present.median())
    if how == "mean" and pd.api.types.is_numeric_dtype(present):
        return float(present.mean())
    mode = present.mode().iloc[0]
    return mode.item() if hasattr(mode, "item") else mode


class Preprocessor:
    def __init__(self, state: dict):
        self.state = state

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, train: pd.DataFrame, targets: list[str], tasks: dict[str, str], scale_cfg,
            categorical="auto", reconstruction: bool = False) -> Preprocessor:
        features = [c for c in train.columns if c not in targets]
        if categorical == "auto":
            cats = [c for c in features if not (pd.api.types.is_numeric_dtype(train[c])
                                                or pd.api.types.is_bool_dtype(train[c]))]
        else:
            unknown = [c for c in categorical if c not in features]
            if unknown:
                raise DataError(f"data.categorical: column(s) {unknown} are not feature columns")
            cats = list(categorical)
        enc_target = targets[0] if targets else None
        columns, names = {}, []
        for col in features:
            spec = (cls._fit_categorical(train, col, scale_cfg, enc_target, tasks)
                    if col in cats else cls._fit_numeric(train[col], scale_cfg))
            spec["index"] = list(range(len(names), len(names) + len(spec["names"])))
            names += spec["names"]
            columns[col] = spec
        state = {"features": columns, "feature_names": names, "impute": scale_cfg.impute,
                 "targets": {t: cls._fit_target(train[t], tasks[t], scale_cfg) for t in targets}}
        if reconstruction:
            state["targets"] = {RECONSTRUCTION: {"task": RECONSTRUCTION, "width": len(names)}}
        return cls(state)

    @staticmethod
    def _fit_numeric(col: pd.Series, cfg) -> dict:
        values = col.astype(float)
        fill = _impute_value(values, cfg.impute)
        filled = values.fillna(fill if fill is not None else 0.0).to_numpy()
        center, scale = _center_scale(filled, cfg.numeric)
        return {"kind": "numeric", "fill": fill, "center": center, "scale": scale, "names": [col.name]}

    @staticmethod
    def _fit_categorical(frame: pd.DataFrame, name: str, cfg, target: str | None, tasks) -> dict:
        col = frame[name].astype("string")
        fill = _impute_value(col, "most_frequent" if cfg.impute != "none" else "none", cfg.impute)
        cats = sorted(col.dropna().unique().tolist())
        spec = {"kind": "categorical", "encoding": cfg.categorical, "fill": fill, "categories": cats}
        if cfg.categorical == "onehot":
            spec["names"] = [f"{name}={c}" for c in cats]
        elif cfg.categorical == "ordinal":
            spec["names"] = [name]
        else:  # target encoding: smoothed mean of the target (per class for multiclass)
            if target is None:
                raise DataError("scale.categorical: target encoding needs a target column")
            y = frame[target]
            if tasks[target] == "multiclass":
                classes = sorted(y.unique().tolist(), key=str)
                cols = pd.DataFrame({str(k): (y == k).astype(float) for k in classes})
            else:
                yy = y.astype(float) if tasks[target] == "regression" else (y == sorted(y.unique())[-1]).astype(float)
                cols = pd.DataFrame({"mean": yy})
            prior = cols.mean()
            filled = col.fillna(fill if fill is not None else "")
            grouped = cols.groupby(filled.to_numpy())
            counts, means = grouped.size(), grouped.mean()
            enc = (means.mul(counts, axis=0) + prior * _SMOOTHING).div(counts + _SMOOTHING, axis=0)
            spec["table"] = {str(k): [float(v) for v in row] for k, row in enc.iterrows()}
            spec["prior"] = [float(v) for v in prior]
            spec["names"] = [f"{name}:{c}" for c in cols.columns]
        return spec

    @staticmethod
    def _fit_target(y: pd.Series, task: str, cfg) -> dict:
        if task in ("binary", "multiclass"):
            classes = sorted(y.unique().tolist(), key=lambda v: (str(type(v)), v))
            classes = [c.item() if hasattr(c, "item") else c for c in classes]
            return {"task": task, "classes": classes, "width": 1 if task == "binary" else len(classes)}
        values = y.astype(float).to_numpy()
        center, scale = _center_scale(values, cfg.target)
        return {"task": "regression", "center": center, "scale": scale, "width": 1}

    # -------------------------------------------------------------- transforms
    @property
    def feature_names(self) -> list[str]:
        return self.state["feature_names"]

    @property
    def targets(self) -> dict[str, dict]:
        return self.state["targets"]

    def column_indices(self, raw_columns: list[str]) -> list[int]:
        unknown = [c for c in raw_columns if c not in self.state["features"]]
        if unknown:
            raise DataError(f"model.inputs: column(s) {unknown} are not feature columns; features: "
                            f"{', '.join(self.state['features'])}")
        return [i for c in raw_columns for i in self.state["features"][c]["index"]]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.state["features"] if c not in frame.columns]
        if missing:
            raise DataError(f"the input lacks feature column(s) {missing}")
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float32)
        for name, spec in self.state["features"].items():
            out[:, spec["index"]] = self._transform_column(frame[name], name, spec)
        return out

    def _fill(self, col: pd.Series, name: str, spec: dict) -> pd.Series:
        n_missing = int(col.isna().sum())
        if n_missing:
            if spec["fill"] is None:
                raise DataError(f"column '{name}' has {n_missing} missing value(s) and scale.impute is "
                                "'none'; set scale.impute to mean, median or most_frequent")
            col = col.fillna(spec["fill"])
        return col

    def _transform_column(self, col: pd.Series, name: str, spec: dict) -> np.ndarray:
        if spec["kind"] == "numeric":
            try:
                values = pd.to_numeric(col, errors="raise").astype(float)
            except (ValueError, TypeError) as err:
                raise DataError(f"column '{name}' must be numeric: {err}") from None
            values = self._fill(values, name, spec).to_numpy()
            return ((values - spec["center"]) / spec["scale"]).reshape(-1, 1)
        col = self._fill(col.astype("string"), name, spec).astype(str).to_numpy()
        cats = spec["categories"]
        if spec["encoding"] == "onehot":  # unseen categories: all zeros
            return (col[:, None] == np.asarray(cats, dtype=object)[None, :]).astype(np.float32)
        if spec["encoding"] == "ordinal":  # unseen categories: -1
            lookup = {c: i for i, c in enumerate(cats)}
            return np.array([lookup.get(v, -1) for v in col], dtype=np.float32).reshape(-1, 1)
        table, prior = spec["table"], spec["prior"]
        return np.array([table.get(v, prior) for v in col], dtype=np.float32)

    def transform_targets(self, frame: pd.DataFrame, features: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, spec in self.targets.items():
            if spec["task"] == RECONSTRUCTION:
                out[name] = features
                continue
            if name not in frame.columns:
                raise DataError(f"the data lacks target column '{name}'")
            y = frame[name]
            if spec["task"] in ("binary", "multiclass"):
                lookup = {str(c): i for i, c in enumerate(spec["classes"])}
                codes = np.array([lookup.get(str(v), -1) for v in y.tolist()], dtype=np.int64)
                if (codes < 0).any():
                    bad = y.tolist()[int(np.argmax(codes < 0))]
                    raise DataError(f"target '{name}' holds {shown(bad)}, a class not seen in training; "
                                    f"classes: {spec['classes']}")
                out[name] = codes
            else:
                out[name] = ((y.astype(float).to_numpy() - spec["center"]) / spec["scale"]
                             ).astype(np.float32).reshape(-1, 1)
        return out

    def decode(self, name: str, pred: np.ndarray) -> np.ndarray:
        """Model outputs (class ids or scaled values) back to the user's labels / units."""
        spec = self.targets[name]
        if spec["task"] in ("binary", "multiclass"):
            return np.asarray(spec["classes"], dtype=object)[pred.astype(int)]
        if spec["task"] == RECONSTRUCTION:
            return pred
        return pred * spec["scale"] + spec["center"]

    def unscale(self, name: str, values: np.ndarray) -> np.ndarray:
        spec = self.targets[name]
        return values * spec.get("scale", 1.0) + spec.get("center", 0.0)

    # --------------------------------------------------------------- storage
    def to_json(self) -> str:
        return json.dumps(self.state, indent=1, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        return cls(json.loads(text))

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        return read_or_explain(path, lambda p: cls.from_json(p.read_text()), "the scale stage's preprocessor",
                               "run the scale stage again")


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in the preprocessor")

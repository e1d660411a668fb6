"""Checks a raw table and splits it into train / val / test (stratified, seeded)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from densepipe.data.sources import DataError, shown

MAX_CLASSES_FOR_INT_TARGET = 20  # integer targets with at most this many values are classes


def detect_task(series: pd.Series, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    values = series.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "binary" if values.nunique() == 2 else "multiclass"
    integral = np.all(np.equal(np.mod(values.to_numpy(dtype=float), 1), 0))
    if integral and values.nunique() <= MAX_CLASSES_FOR_INT_TARGET:
        return "binary" if values.nunique() == 2 else "multiclass"
    return "regression"


def _numeric_junk(col: pd.Series) -> str | None:
    """A column that is mostly numbers but holds some text is junk, not a category."""
    if pd.api.types.is_numeric_dtype(col):
        return None
    present = col.dropna()
    parsed = pd.to_numeric(present, errors="coerce")
    bad = parsed.isna()
    if len(present) and bad.mean() < 0.5 and bad.any():
        row = present.index[bad.to_numpy()][0]
        return f"column '{col.name}' is numeric but row {row} holds {present[row]!r}"
    return None


def check_table(frame: pd.DataFrame, targets: list[str], task: str) -> dict[str, str]:
    """Raises DataError for data that cannot be trained on; returns the task per target."""
    if frame.empty:
        raise DataError("the data has no rows")
    features = [c for c in frame.columns if c not in targets]
    if not features:
        raise DataError("the data has no feature columns besides the target(s)")
    for col in frame.columns:
        junk = _numeric_junk(frame[col])
        if junk:
            raise DataError(f"non-numeric value: {junk}; fix the file or list the column in data.drop")
        if pd.api.types.is_numeric_dtype(frame[col]) and np.isinf(frame[col].to_numpy(dtype=float)).any():
            raise DataError(f"column '{col}' holds inf values; replace them or drop the column")
    tasks = {}
    for t in targets:
        if frame[t].isna().any():
            raise DataError(f"target column '{t}' has {int(frame[t].isna().sum())} missing value(s); "
                            "rows without a target cannot be trained on")
        tasks[t] = detect_task(frame[t], "regression" if task == "reconstruction" else task)
        _check_task(frame[t], tasks[t], declared=task)
    return tasks


def _check_task(target: pd.Series, task: str, declared: str) -> None:
    """A target whose values its task (`declared`: data.task as written) cannot read: named here,
    before the split, with what to set."""
    name, distinct = target.name, target.nunique()
    if task in ("binary", "multiclass") and distinct < 2:
        raise DataError(f"target column '{name}' has a single class ({shown(target.iloc[0])}); "
                        "classification needs at least two")
    if task == "binary" and distinct > 2:
        raise DataError(f"target column '{name}' has {distinct} distinct values but data.task is 'binary', "
                        f"which needs exactly two; use data.task: "
                        f"{'multiclass' if distinct <= MAX_CLASSES_FOR_INT_TARGET else 'regression'} or auto")
    text = target[pd.to_numeric(target, errors="coerce").isna()] if task == "regression" else ()
    if len(text):
        raise DataError(f"target column '{name}' holds text ({shown(text.iloc[0])}) but data.task is "
                        f"'{declared}', which needs numbers; use data.task: "
                        f"{'binary' if distinct == 2 else 'multiclass'} or auto")


def split_frame(frame: pd.DataFrame, targets: list[str], tasks: dict[str, str], cfg, seed: int):
    """cfg: config.SplitConfig. Returns (train, val, test) frames."""
    n = len(frame)
    strat_col = next((t for t in targets if tasks[t] in ("binary", "multiclass")), None)
    labels = frame[strat_col] if (cfg.stratify and strat_col and cfg.shuffle) else None
    n_test = int(np.ceil(cfg.test_size * n))
    n_classes = labels.nunique() if labels is not None else 1
    need = 3 if cfg.val_size > 0 or cfg.folds else 2
    if n < need or n - n_test < need - 1 or (labels is not None and n_test < n_classes):
        raise DataError(f"too few rows to split: {n} row(s) with test_size={cfg.test_size}, "
                        f"val_size={cfg.val_size}" + (f" and {n_classes} classes" if labels is not None else "")
                        + "; add rows or change split.test_size / split.val_size")
    if labels is not None and labels.value_counts().min() < 2:
        rare = labels.value_counts().idxmin()
        raise DataError(f"class {shown(rare)} of '{strat_col}' has a single row; stratified splitting needs "
                        "at least two per class (or set split.stratify: false)")
    try:
        rest, test = train_test_split(frame, test_size=cfg.test_size, random_state=seed,
                                      shuffle=cfg.shuffle, stratify=labels)
        if cfg.folds:
            rest_labels = rest[strat_col] if labels is not None else None
            splitter = (StratifiedKFold if rest_labels is not None else KFold)(
                n_splits=cfg.folds, shuffle=cfg.shuffle, random_state=seed if cfg.shuffle else None)
            train_idx, val_idx = list(splitter.split(rest, rest_labels))[cfg.fold]
            return rest.iloc[train_idx], rest.iloc[val_idx], test
        if cfg.val_size == 0:
            return rest, rest.iloc[:0], test
        val_frac = cfg.val_size / (1 - cfg.test_size)
        rest_labels = rest[strat_col] if labels is not None else None
        train, val = train_test_split(rest, test_size=val_frac, random_state=seed, shuffle=cfg.shuffle,
                                      stratify=rest_labels)
    except ValueError as err:
        raise DataError(f"cannot split the data: {err}") from None
    return train, val, test

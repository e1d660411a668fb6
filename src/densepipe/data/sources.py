"""Data sources by name: scikit-learn's bundled sets, its generators, logic-gate
truth tables, and the user's CSV / Parquet file. Each returns one DataFrame
and the names of its target columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from densepipe.registry import Registry

SOURCES: Registry = Registry("data source")


class DataError(ValueError):
    """A problem with the data itself, phrased for the user."""


def shown(value) -> str:
    """A data value as the user would write it in a message: 1 and 'yes', not
    numpy's np.int64(1) or np.str_('yes')."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _bundled(loader_name: str, label_names: bool):
    def load(cfg):
        from sklearn import datasets  # imported on use: stages that read no source skip its import time

        bunch = getattr(datasets, loader_name)(as_frame=True)
        frame = bunch.frame.copy()
        if label_names and hasattr(bunch, "target_names"):
            names = np.asarray(bunch.target_names)
            frame["target"] = names[frame["target"].to_numpy()]
        return frame, ["target"]
    return load


_BUNDLED = {  # name -> (scikit-learn loader, labels as class names)
    "digits": ("load_digits", False),
    "iris": ("load_iris", True),
    "wine": ("load_wine", True),
    "breast_cancer": ("load_breast_cancer", True),
    "diabetes": ("load_diabetes", False),
}


def _generator(name: str, defaults: dict):
    def load(cfg):
        from sklearn import datasets as ds

        fn = getattr(ds, name)
        kwargs = {**defaults, **cfg.options}
        try:
            X, y = fn(**kwargs)
        except TypeError as err:
            raise DataError(f"data.options for {name}: {err}") from None
        frame = pd.DataFrame(np.asarray(X, dtype=np.float64),
                             columns=[f"x{i}" for i in range(np.asarray(X).shape[1])])
        y = np.asarray(y)
        targets = ["target"] if y.ndim == 1 else [f"target{i}" for i in range(y.shape[1])]
        frame[targets] = y.reshape(len(y), -1)
        return frame, targets
    return load


_GENERATORS = {  # name -> defaults (seeded for reproducibility)
    "make_classification": {"n_samples": 1000, "n_features": 20, "random_state": 0},
    "make_regression": {"n_samples": 1000, "n_features": 10, "noise": 10.0, "random_state": 0},
    "make_moons": {"n_samples": 1000, "noise": 0.2, "random_state": 0},
    "make_circles": {"n_samples": 1000, "noise": 0.1, "factor": 0.5, "random_state": 0},
    "make_blobs": {"n_samples": 1000, "centers": 3, "random_state": 0},
    "make_friedman1": {"n_samples": 1000, "noise": 1.0, "random_state": 0},
    "make_gaussian_quantiles": {"n_samples": 1000, "n_classes": 3, "random_state": 0},
}

_GATES = {"and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
          "nand": lambda a, b: 1 - (a & b), "nor": lambda a, b: 1 - (a | b)}


def _logic_gate(cfg):
    """The four rows of a two-input truth table, repeated so the set can be split;
    optional Gaussian jitter on the inputs."""
    opts = {"gate": "and", "repeat": 25, "noise": 0.0, "random_state": 0, **cfg.options}
    gate = str(opts["gate"]).lower()
    if gate not in _GATES:
        raise DataError(f"data.options.gate '{gate}' is not a logic gate; allowed: {', '.join(_GATES)}")
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    reps = int(opts["repeat"])
    a, b = np.tile(a, reps), np.tile(b, reps)
    rng = np.random.default_rng(opts["random_state"])
    jitter = rng.normal(0, float(opts["noise"]), size=(2, len(a)))
    frame = pd.DataFrame({"x1": a + jitter[0], "x2": b + jitter[1], "target": _GATES[gate](a, b)})
    return frame, ["target"]


def _file_reader(kind: str):
    def load(cfg):
        path = Path(cfg.path)
        if not path.exists():
            raise DataError(f"data.path: file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"data.path: file is empty: {path}")
        try:
            frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, ValueError) as err:
            raise DataError(f"data.path: cannot read {path} as {kind}: {err}") from None
        if frame.empty:
            raise DataError(f"data.path: {path} has no data rows")
        if cfg.target is None:
            raise DataError(f"data.target: name the target column(s) of {path}; columns: "
                            f"{', '.join(map(str, frame.columns))}")
        targets = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target)
        return frame, targets
    return load


for _name, (_loader, _labels) in _BUNDLED.items():
    SOURCES.add(_name, _bundled(_loader, _labels))
for _name, _defaults in _GENERATORS.items():
    SOURCES.add(_name, _generator(_name, _defaults))
SOURCES.add("logic_gate", _logic_gate)
SOURCES.add("csv", _file_reader("csv"))
SOURCES.add("parquet", _file_reader("parquet"))


def load_source(cfg) -> tuple[pd.DataFrame, list[str]]:
    """cfg: config.DataConfig. Returns (frame, target columns) with drop applied."""
    frame, targets = SOURCES[cfg.source](cfg)
    if cfg.target is not None and cfg.source not in ("csv", "parquet"):
        targets = [cfg.target] if isinstance(cfg.target, str) else list(cfg.target)
    missing = [t for t in targets if t not in frame.columns]
    if missing:
        raise DataError(f"data.target: column(s) {missing} not in the data; columns: "
                        f"{', '.join(map(str, frame.columns))}")
    unknown = [c for c in cfg.drop if c not in frame.columns]
    if unknown:
        raise DataError(f"data.drop: column(s) {unknown} not in the data")
    frame = frame.drop(columns=list(cfg.drop))
    frame.columns = [str(c) for c in frame.columns]
    return frame, [str(t) for t in targets]

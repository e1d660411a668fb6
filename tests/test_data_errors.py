"""Bad data and bad params: a specific message, a non-zero exit, and the previous
outputs left exactly as they were."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import densepipe

MODEL = {"layers": [{"type": "dense", "units": 8, "activation": "relu"},
                    {"type": "dense", "units": "auto", "activation": "auto"}]}


def _csv_project(tmp_path, frame: pd.DataFrame | None, **overrides):
    if frame is not None:
        frame.to_csv(tmp_path / "data.csv", index=False)
    params = {"data": {"source": "csv", "path": "data.csv", "target": "y"}, "model": MODEL,
              "train": {"epochs": 1, "progress": "quiet"}, "mlflow": {"enabled": False}}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        params.setdefault(section, {})[name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _good_frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.choice(["u", "v"], n),
                         "y": rng.choice(["yes", "no"], n)})


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*"))}


def _fails(tmp_path, stage, *extra, message):
    proc = densepipe(stage, "--params", "params.yaml", *extra, cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def _prepared(tmp_path_factory):
    path = _csv_project(tmp_path_factory.mktemp("good"), _good_frame())
    densepipe("split", "--params", "params.yaml", cwd=path)
    densepipe("scale", "--params", "params.yaml", cwd=path)
    return path


@pytest.fixture
def good_split(_prepared, tmp_path):
    """A copy of a project whose split and scale stages already ran on good data."""
    path = tmp_path / "proj"
    shutil.copytree(_prepared, path)
    return path, _digest(path / "data/split"), _digest(path / "data/processed")


BAD_DATA = {
    "missing file": (lambda p: (p / "data.csv").unlink(), "file not found"),
    "empty file": (lambda p: (p / "data.csv").write_text(""), "file is empty"),
    "header only": (lambda p: (p / "data.csv").write_text("a,b,c,y\n"), "has no data rows"),
    "missing target": (lambda p: _good_frame().drop(columns=["y"]).to_csv(p / "data.csv", index=False),
                       "column(s) ['y'] not in the data"),
    "non-numeric junk": (lambda p: _good_frame().astype({"a": object}).assign(
        a=lambda f: f["a"].where(f.index != 5, "abc")).to_csv(p / "data.csv", index=False),
        "column 'a' is numeric but row 5 holds 'abc'"),
    "one class": (lambda p: _good_frame().assign(y="yes").to_csv(p / "data.csv", index=False),
                  "has a single class ('yes')"),
    "one numeric class": (lambda p: _good_frame().assign(y=1).to_csv(p / "data.csv", index=False),
                          "target column 'y' has a single class (1); classification needs at least two"),
    "a class with one row": (lambda p: _good_frame().assign(y=[0, 1] * 30).assign(
        y=lambda f: f["y"].where(f.index != 7, 2)).to_csv(p / "data.csv", index=False),
        "class 2 of 'y' has a single row; stratified splitting needs at least two per class "
        "(or set split.stratify: false)"),
    "too few rows": (lambda p: _good_frame(4).assign(y=["yes", "no"] * 2).to_csv(p / "data.csv", index=False),
                     "too few rows to split"),
    "inf values": (lambda p: _good_frame().assign(b=np.inf).to_csv(p / "data.csv", index=False),
                   "column 'b' holds inf values"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_split_and_keeps_outputs(good_split, case):
    path, split_before, _ = good_split
    corrupt, message = BAD_DATA[case]
    corrupt(path)
    _fails(path, "split", message=message)
    assert _digest(path / "data/split") == split_before


def test_missing_values_without_imputation(good_split):
    path, _, processed_before = good_split
    frame = _good_frame()
    frame.loc[3, "a"] = np.nan
    frame.to_csv(path / "data.csv", index=False)
    densepipe("split", "--params", "params.yaml", cwd=path)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["scale"] = {"impute": "none"}
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(path, "scale", message="column 'a' has 1 missing value(s) and scale.impute is 'none'")
    assert _digest(path / "data/processed") == processed_before


def test_a_column_without_any_value_cannot_be_imputed(good_split):
    path, _, processed_before = good_split
    _good_frame().assign(a=np.nan).to_csv(path / "data.csv", index=False)
    densepipe("split", "--params", "params.yaml", cwd=path)
    n_train = len(pd.read_parquet(path / "data/split/train.parquet"))
    _fails(path, "scale", message=f"column 'a' has no values: all {n_train} training row(s) are missing, "
           "so scale.impute 'mean' has nothing to impute from; drop the column (list it in data.drop) "
           "or fill it in the data")
    assert _digest(path / "data/processed") == processed_before
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["data"]["drop"] = ["a"]
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    densepipe("split", "--params", "params.yaml", cwd=path)
    densepipe("scale", "--params", "params.yaml", cwd=path)


def test_missing_values_are_imputed_by_default(tmp_path):
    frame = _good_frame()
    frame.loc[[2, 9], "a"] = np.nan
    frame.loc[4, "c"] = None
    _csv_project(tmp_path, frame)
    densepipe("split", "--params", "params.yaml", cwd=tmp_path)
    densepipe("scale", "--params", "params.yaml", cwd=tmp_path)
    with np.load(tmp_path / "data/processed/train.npz") as z:
        assert np.isfinite(z["X"]).all()


@pytest.mark.parametrize("params_patch, message", [
    ({"split": {"test_sise": 0.2}}, "split.test_sise: unknown key (did you mean 'test_size'?)"),
    ({"split": {"test_size": 1.5}}, "split.test_size: Input should be less than 1"),
    ({"data": {"source": "digitz"}}, "unknown data source 'digitz' (did you mean 'digits'?)"),
    ({"train": {"optimizer": {"name": "adamm"}}}, "unknown optimizer 'adamm' (did you mean 'adam'?)"),
])
def test_bad_params_fail_before_any_work(good_split, params_patch, message):
    path, split_before, _ = good_split
    params = yaml.safe_load((path / "params.yaml").read_text())
    for section, values in params_patch.items():
        params.setdefault(section, {}).update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(path, "split", message=message)
    assert _digest(path / "data/split") == split_before


def test_layer_widths_that_do_not_fit(good_split):
    path, _, _ = good_split
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["model"] = {"layers": [{"type": "dense", "units": 8, "name": "a"},
                                  {"type": "dense", "units": 4, "name": "b"},
                                  {"type": "add", "inputs": ["a", "b"]},
                                  {"type": "dense", "units": "auto", "activation": "auto"}]}
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(path, "train", message="an add layer needs inputs of one width, got [8, 4]")
    assert not (path / "models/model.pt").exists()


def test_string_labels_round_trip_through_predict(good_split):
    path, _, _ = good_split
    densepipe("train", "--params", "params.yaml", cwd=path)
    rows = _good_frame(10, seed=3).drop(columns=["y"])
    rows.to_csv(path / "new.csv", index=False)
    densepipe("predict", "--input", "new.csv", "--output", "pred.csv", cwd=path)
    pred = pd.read_csv(path / "pred.csv")
    assert set(pred["prediction"]) <= {"yes", "no"}
    assert {"proba_no", "proba_yes"} <= set(pred.columns)


def test_predict_missing_input_file(good_split):
    path, _, _ = good_split
    proc = densepipe("predict", "--input", "nope.csv", cwd=path, check=False)
    assert proc.returncode != 0 and "file not found: nope.csv" in proc.stderr


@pytest.mark.parametrize("task, target, message", [
    ("regression", ["high", "low", "mid"] * 20,
     "target column 'y' holds text ('high') but data.task is 'regression', which needs numbers; "
     "use data.task: multiclass or auto"),
    ("reconstruction", ["yes", "no"] * 30,
     "target column 'y' holds text ('yes') but data.task is 'reconstruction', which needs numbers; "
     "use data.task: binary or auto"),
    ("binary", np.linspace(0, 1, 60),
     "target column 'y' has 60 distinct values but data.task is 'binary', which needs exactly two; "
     "use data.task: regression or auto"),
    ("binary", [0, 1, 2] * 20,
     "target column 'y' has 3 distinct values but data.task is 'binary', which needs exactly two; "
     "use data.task: multiclass or auto"),
])
def test_a_target_its_declared_task_cannot_read_is_named(task, target, message):
    from densepipe.data.sources import DataError
    from densepipe.data.split import check_table

    frame = _good_frame().assign(y=target)
    with pytest.raises(DataError) as err:
        check_table(frame, ["y"], task)
    assert str(err.value) == message
    assert check_table(frame, ["y"], "auto")["y"] in ("binary", "multiclass", "regression")

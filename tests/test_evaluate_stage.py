"""The evaluate stage takes its `evaluate` section from the current params (DVC re-runs
only this stage when it changes), while the model itself comes from the model file;
and model files are byte-for-byte the same for the same model."""

from __future__ import annotations

import argparse
import hashlib
import json

import pandas as pd
import pytest
import torch
import yaml

from densepipe import checkpoint as ckpt
from densepipe.stages import evaluate as evaluate_stage
from densepipe.stages import scale as scale_stage
from densepipe.stages import split as split_stage
from densepipe.stages import train as train_stage

PARAMS = {
    "seed": 0,
    "data": {"source": "breast_cancer"},
    "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu", "name": "hidden"},
                         {"type": "dense", "units": "auto", "activation": "auto"}]},
    "train": {"epochs": 3, "batch_size": 64, "progress": "quiet"},
    "mlflow": {"enabled": False},
}
POSITIVE = "malignant"  # the second of the sorted classes: the one the threshold decides


def _namespace(root, **kw):
    return argparse.Namespace(params=str(root / "params.yaml"), set=kw.pop("set", []), **kw)


def _train(root, run: str):
    out = root / run
    train_stage.run(_namespace(root, data=str(root / "processed"), model=str(out / "model.pt"),
                               checkpoint=str(out / "checkpoint.pt"), metrics=str(out / "train.json"),
                               history=str(out / "history.csv"), run=str(out / "run.json")))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    split_stage.run(_namespace(root, out=str(root / "split")))
    scale_stage.run(_namespace(root, split=str(root / "split"), out=str(root / "processed")))
    return root, _train(root, "run")


def _evaluate(root, model_dir, name: str, params: dict | None = None, overrides=()):
    """Runs the evaluate stage with the given params file content and --set overrides."""
    params_file = root / f"{name}.yaml"
    params_file.write_text(yaml.safe_dump(params or PARAMS))
    out = root / name
    args = argparse.Namespace(params=str(params_file), set=list(overrides), model=str(model_dir / "model.pt"),
                              data=str(root / "processed"), split=str(root / "split"),
                              metrics=str(out / "test.json"), plots=str(out / "plots"),
                              predictions=str(out / "predictions.csv"), run=str(model_dir / "run.json"))
    evaluate_stage.run(args)
    return json.loads((out / "test.json").read_text()), pd.read_csv(out / "predictions.csv"), out


def _with_evaluate(**settings) -> dict:
    return {**PARAMS, "evaluate": settings}


def _check_decisions(metrics: dict, predictions: pd.DataFrame, threshold: float) -> float:
    """Predictions and metrics both follow `threshold`; returns the share predicted positive."""
    positive = predictions[f"proba_{POSITIVE}"] >= threshold
    assert (predictions["prediction"] == POSITIVE).tolist() == positive.tolist()
    accuracy = (predictions["prediction"] == predictions["target"]).mean()
    assert metrics["accuracy"] == pytest.approx(accuracy)
    return float(positive.mean())


def test_threshold_from_the_current_params_decides_the_binary_metrics(trained, capsys):
    root, model_dir = trained
    saved = ckpt.load_model(model_dir / "model.pt").config.evaluate.threshold
    assert saved == 0.5
    default_metrics, default_pred, _ = _evaluate(root, model_dir, "t050")
    low_metrics, low_pred, _ = _evaluate(root, model_dir, "t005", _with_evaluate(threshold=0.05))
    high_metrics, high_pred, _ = _evaluate(root, model_dir, "t095", overrides=["evaluate.threshold=0.95"])
    default_share = _check_decisions(default_metrics, default_pred, 0.5)
    low_share = _check_decisions(low_metrics, low_pred, 0.05)
    high_share = _check_decisions(high_metrics, high_pred, 0.95)
    assert low_share > default_share > high_share
    assert low_share > 0.5  # a low threshold calls most rows positive
    recall = {name: m["per_class"][POSITIVE]["recall"]
              for name, m in (("low", low_metrics), ("default", default_metrics), ("high", high_metrics))}
    assert recall["low"] >= recall["default"] >= recall["high"] and recall["low"] > recall["high"]
    capsys.readouterr()


def test_embedding_layer_from_the_current_params_writes_the_embedding(trained, capsys):
    root, model_dir = trained
    assert ckpt.load_model(model_dir / "model.pt").config.evaluate.embedding_layer is None
    _, predictions, out = _evaluate(root, model_dir, "embedding", _with_evaluate(embedding_layer="hidden"))
    table = pd.read_csv(out / "plots" / "embedding.csv")
    assert [c for c in table.columns if c.startswith("dim")] == [f"dim{i}" for i in range(8)]
    assert len(table) == len(predictions)
    _, _, plain = _evaluate(root, model_dir, "no_embedding")
    assert not (plain / "plots" / "embedding.csv").exists()
    capsys.readouterr()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_model_saved_twice_gives_the_same_bytes(trained, tmp_path):
    loaded = ckpt.load_model(trained[1] / "model.pt")
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "other.pt"
    for path in (first, second):
        ckpt.save_model(path, loaded.model, loaded.config, loaded.preprocessor, loaded.spec, loaded.epoch)
    assert first.read_bytes() == second.read_bytes()
    blob = torch.load(second, weights_only=True)
    assert blob["format"] == ckpt.MODEL_FORMAT
    again = ckpt.load_model(second)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value)


def test_the_same_resume_state_saved_twice_gives_the_same_bytes(tmp_path):
    state = {"epoch": 2, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": "[]"}
    first, second = tmp_path / "one.pt", tmp_path / "two" / "checkpoint.pt"
    ckpt.save_resume(first, state, "key")
    ckpt.save_resume(second, state, "key")
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(ckpt.load_resume(second, "key")["model"]["w"], state["model"]["w"])


def test_two_identical_training_runs_write_the_same_model_file(trained, capsys):
    root, model_dir = trained
    again = _train(root, "again")
    assert _sha(again / "model.pt") == _sha(model_dir / "model.pt")
    assert _sha(again / "checkpoint.pt") == _sha(model_dir / "checkpoint.pt")  # the finished-run mark
    capsys.readouterr()


def test_confusion_matrix_axes_follow_the_matrix_order():
    # The metrics file sorts its keys as text (10 before 2): the axes must not take their order from there.
    import numpy as np

    from densepipe.evaluate import evaluate_output
    from densepipe.report.figures import confusion

    y = np.array([0, 0, 1, 2, 2, 2])                    # classes 2, 10, 11 by index
    prob = np.eye(3)[[0, 1, 1, 2, 2, 0]]
    metrics, _ = evaluate_output("multiclass", prob, y, {"classes": [2, 10, 11]})
    stored = json.loads(json.dumps(metrics, sort_keys=True, default=float))
    assert list(stored["per_class"]) == ["10", "11", "2"]
    ax = confusion({"metrics_full": {"target": stored}})[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "10", "11"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "10", "11"]
    assert stored["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


@pytest.mark.parametrize("classes, kind", [([0, 1, 2], "micro-average AUC"), ([0, 1], "AUC")])
def test_roc_figure_names_the_average_it_plots(classes, kind):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from densepipe.evaluate import evaluate_output
    from densepipe.report.figures import roc

    rng = np.random.default_rng(0)
    y = np.arange(60) % len(classes)
    prob = rng.dirichlet(np.ones(len(classes)), 60) + 0.6 * np.eye(len(classes))[y]
    prob = prob / prob.sum(1, keepdims=True)
    task = "binary" if len(classes) == 2 else "multiclass"
    metrics, plots = evaluate_output(task, prob[:, 1:] if task == "binary" else prob, y, {"classes": classes})
    ax = roc({"metrics_full": {"target": metrics}, "plots": plots})[0].axes[0]
    label = ax.get_legend().get_texts()[0].get_text()
    onehot = np.eye(len(classes))[y]
    area = roc_auc_score(onehot.ravel(), prob.ravel(), average="micro") if task == "multiclass" else \
        metrics["roc_auc"]
    assert label == f"model ({kind} {area:.3f})"

"""The real `dvc repro` of the default pipeline in a temporary git repo, with the
real MLflow store: full run, no-op re-run, partial re-run, experiments, predict."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import densepipe, run_cmd

pytestmark = pytest.mark.slow

FAST = {"train.epochs": 6, "train.progress": "quiet"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from conftest import make_project
    path = make_project(tmp_path_factory.mktemp("pipeline") / "proj", FAST)
    first = run_cmd(["dvc", "repro"], cwd=path)
    return path, first


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_full_run_writes_every_output(project):
    path, first = project
    assert _ran(first.stdout) == {"split", "scale", "train", "evaluate", "report"}
    for rel in ("data/split/train.parquet", "data/processed/preprocessor.json", "models/model.pt",
                "metrics/train.json", "plots/history.csv", "plots/eval/confusion.csv", "plots/eval/roc.csv",
                "predictions/test.csv", "reports/report.html", "reports/figures/model_graph.png"):
        assert (path / rel).exists(), rel
    test = json.loads((path / "metrics/test.json").read_text())
    assert test["accuracy"] > 0.9
    history = pd.read_csv(path / "plots/history.csv")
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "lr"} <= set(history.columns)
    html = (path / "reports/report.html").read_text()
    for section in ("Diagnostics", "Test metrics", "confusion matrix", "gradient norms", "weight histograms",
                    "model graph", "Parameters (resolved)"):
        assert section.lower() in html.lower(), section


def test_nothing_changed_runs_nothing(project):
    path, _ = project
    again = run_cmd(["dvc", "repro"], cwd=path)
    assert _ran(again.stdout) == set()


def test_train_param_change_reruns_only_downstream(project):
    path, _ = project
    run_cmd(["dvc", "repro", "-q"], cwd=path)
    proc = run_cmd(["dvc", "repro", "-f", "-s", "split", "--dry"], cwd=path)  # sanity: stage names exist
    assert "split" in proc.stdout
    params = (path / "params.yaml").read_text().replace("epochs: 6", "epochs: 4")
    (path / "params.yaml").write_text(params)
    changed = run_cmd(["dvc", "repro"], cwd=path)
    assert _ran(changed.stdout) == {"train", "evaluate", "report"}
    assert json.loads((path / "metrics/train.json").read_text())["epochs_run"] <= 4


def test_metrics_and_plots_commands(project):
    path, _ = project
    shown = run_cmd(["dvc", "metrics", "show", "--json"], cwd=path)
    assert "accuracy" in shown.stdout
    out = path / "dvc_plots"
    run_cmd(["dvc", "plots", "show", "-o", str(out)], cwd=path)
    assert (out / "index.html").exists()


def test_mlflow_holds_one_run_per_execution(project):
    import mlflow
    from mlflow.tracking import MlflowClient

    path, _ = project
    info = json.loads((path / "models/run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{path / 'mlflow.db'}"
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.name"] == "adam"
    assert "test_accuracy" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == int(run.data.metrics["final_epochs_run"])
    assert "git_commit" in run.data.tags
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report", "evaluation"} <= names
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.html" in report
    mlflow.set_tracking_uri(info["tracking_uri"])
    models = mlflow.search_logged_models(experiment_ids=[info["experiment_id"]], output_format="list",
                                         filter_string=f"source_run_id = '{info['run_id']}'")
    assert len(models) == 1
    loaded = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    raw = pd.read_parquet(path / "data/split/test.parquet").drop(columns=["target"]).head(4)
    pred = loaded.predict(raw.astype("float64"))
    assert len(pred) == 4 and pred["prediction"].isin(range(10)).all()
    # Each pipeline execution is one run: runs so far = executions of the train stage.
    runs = client.search_runs([info["experiment_id"]])
    assert all(r.info.status in ("FINISHED", "RUNNING") for r in runs)


def test_experiment_run_with_set_param(project):
    path, _ = project
    run_cmd(["git", "add", "-A"], cwd=path)
    run_cmd(["git", "commit", "-qm", "baseline"], cwd=path)
    run_cmd(["dvc", "exp", "run", "-S", "train.optimizer.lr=0.003", "-n", "lr3"], cwd=path)
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], cwd=path).stdout)
    text = json.dumps(shown)
    assert "lr3" in text and "0.003" in text and "accuracy" in text


def test_temp_experiment_logs_to_the_project_store(project):
    from mlflow.tracking import MlflowClient

    path, _ = project
    run_cmd(["git", "add", "-A"], cwd=path)
    run_cmd(["git", "commit", "-qm", "before temp", "--allow-empty"], cwd=path)
    run_cmd(["dvc", "exp", "run", "--temp", "-S", "train.epochs=2", "-n", "tmp2"], cwd=path)
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("densepipe-digits")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.dvc_experiment = 'tmp2'")
    assert len(runs) == 1, "the temp workspace's run must land in the project's store"
    assert runs[0].data.metrics["final_epochs_run"] == 2
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert "report" in artifacts  # stored under the project root, not the deleted temp copy
    assert not list((path / ".dvc" / "tmp").rglob("mlflow.db"))


def test_predict_command_decodes_labels(project, tmp_path):
    path, _ = project
    rows = pd.read_parquet(path / "data/split/test.parquet").drop(columns=["target"]).head(7)
    rows.to_csv(tmp_path / "new.csv", index=False)
    densepipe("predict", "--model", str(path / "models/model.pt"), "--input", str(tmp_path / "new.csv"),
              "--output", str(tmp_path / "pred.csv"), cwd=path)
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 7
    assert set(pred["prediction"]) <= set(range(10))
    probs = pred[[f"proba_{i}" for i in range(10)]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-4


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(project):
    """The real MLflow UI server over the project's store, as `make ui` starts it."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    path, _ = project
    port = _free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "ui",
                               "--backend-store-uri", f"sqlite:///{path / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not start")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _rendered_text(url: str, profile) -> str:
    """The page's DOM after its scripts ran, in headless Chromium."""
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    proc = run_cmd([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
                   cwd=profile.parent, timeout=180)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", proc.stdout))


def test_mlflow_ui_shows_run_metrics_and_report(project, mlflow_ui, tmp_path):
    path, _ = project
    info = json.loads((path / "models/run.json").read_text())
    base = f"{mlflow_ui}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    overview = _rendered_text(base, tmp_path / "profile1")
    assert info["run_id"] in overview
    for metric in ("val_loss", "val_accuracy", "test_accuracy", "grad_norm/dense_1"):
        assert metric in overview, metric
    artifacts = _rendered_text(f"{base}/artifacts/report/report.html", tmp_path / "profile2")
    assert "report.html" in artifacts and "evaluation" in artifacts


def test_an_evaluate_setting_changed_after_training_updates_the_run(project):
    # MLflow params cannot change, so the evaluate settings are tags of the run, which a re-run of
    # evaluate alone updates along with the test metrics.
    import yaml
    from mlflow.tracking import MlflowClient

    path, _ = project
    run_cmd(["dvc", "repro", "-q"], cwd=path)
    info = json.loads((path / "models/run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert not any(k.startswith(("evaluate.", "report.")) for k in run.data.params)
    params = yaml.safe_load((path / "params.yaml").read_text())
    assert run.data.tags["evaluate.threshold"] == str(params["evaluate"]["threshold"])
    params["evaluate"]["threshold"] = 0.7
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run_cmd(["dvc", "repro"], cwd=path)
    assert "evaluate" in _ran(changed.stdout) and "train" not in _ran(changed.stdout)
    assert json.loads((path / "models/run.json").read_text())["run_id"] == info["run_id"]
    assert client.get_run(info["run_id"]).data.tags["evaluate.threshold"] == "0.7"

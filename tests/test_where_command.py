"""`densepipe where` points at the report of the pipeline it is run in (a gallery pipeline
keeps its outputs in its own folder) and at the project's MLflow store."""

from __future__ import annotations

import json

from densepipe.cli import main


def _project(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    gallery = tmp_path / "pipelines" / "iris"
    (gallery / "reports").mkdir(parents=True)
    (gallery / "metrics").mkdir()
    (gallery / "dvc.yaml").write_text("stages: {}\n")
    (gallery / "reports" / "report.html").write_text("<html></html>")
    (gallery / "metrics" / "test.json").write_text(json.dumps({"accuracy": 0.9666}))
    return tmp_path, gallery


def test_where_in_a_gallery_pipeline_names_its_own_report(tmp_path, monkeypatch, capsys):
    root, gallery = _project(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(gallery / "reports")  # below the pipeline's folder: found upwards
    assert main(["where"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy: 0.9666" in out
    assert f"report:       {gallery / 'reports' / 'report.html'}  (open it in a browser)" in out
    assert f"sqlite:///{root / 'mlflow.db'}" in out


def test_where_at_the_root_and_with_a_folder(tmp_path, monkeypatch, capsys):
    root, gallery = _project(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(root)
    assert main(["where"]) == 0
    out = capsys.readouterr().out
    assert f"report:       {root / 'reports' / 'report.html'}  (not built yet: run dvc repro)" in out
    assert "test accuracy" not in out
    assert main(["where", "pipelines/iris"]) == 0
    assert f"report:       {gallery / 'reports' / 'report.html'}  (open it in a browser)" in capsys.readouterr().out

"""Every gallery pipeline, run stage by stage from its own dvc.yaml commands (fewer
epochs), meets its headline metric; one also runs through the real `dvc repro`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_project, run_cmd
from densepipe.cli import main

pytestmark = pytest.mark.slow
GALLERY = ROOT / "pipelines"

# name -> (extra --set overrides, check on metrics/test.json)
HEADLINES = {
    "perceptron_and": ([], lambda m: m["accuracy"] == 1.0),
    "xor_mlp": ([], lambda m: m["accuracy"] == 1.0),
    "digits_classifier": (["train.epochs=15"], lambda m: m["accuracy"] > 0.93),
    "breast_cancer": (["train.epochs=25"], lambda m: m["roc_auc"] > 0.95 and m["accuracy"] > 0.9),
    "diabetes_regression": (["train.epochs=40"], lambda m: m["r2"] > 0.3),
    "iris_two_heads": (["train.epochs=80"], lambda m: m["species"]["accuracy"] > 0.85 and m["width"]["mae"] < 0.35),
    "digits_autoencoder": (["train.epochs=25"], lambda m: m["mse"] < 0.05),
    "digits_denoising_autoencoder": (["train.epochs=25"], lambda m: m["mse"] < 0.06),
    "csv_template": (["train.epochs=25"], lambda m: m["roc_auc"] > 0.7),
}


# name -> what its report must show besides the figures
REPORT_SHOWS = {"iris_two_heads": "<h3>Per class (species)</h3>", "digits_classifier": "<h3>Per class</h3>"}


def test_every_gallery_folder_is_listed():
    folders = {p.name for p in GALLERY.iterdir() if (p / "dvc.yaml").exists()}
    assert folders == set(HEADLINES) | {"init_comparison", "sweep"}
    for name in folders:
        assert (GALLERY / name / "README.md").exists() and (GALLERY / name / "params.yaml").exists()


def run_pipeline(folder: Path, overrides: list[str]) -> None:
    """Runs each stage's `cmd` from dvc.yaml, in order, inside the pipeline's folder."""
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for name, stage in stages.items():
            argv = shlex.split(stage["cmd"])
            assert argv[0] == "densepipe", stage["cmd"]
            sets = [a for o in overrides for a in ("--set", o)]
            assert main(argv[1:] + sets) == 0, f"stage {name} failed"
    finally:
        os.chdir(cwd)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("name", list(HEADLINES))
def test_gallery_pipeline_meets_its_headline(name, tmp_path, mlflow_store):
    folder = tmp_path / name
    shutil.copytree(GALLERY / name, folder, ignore=shutil.ignore_patterns(
        "data", "models", "metrics", "plots", "predictions", "reports", "dvc.lock") if name != "csv_template"
        else shutil.ignore_patterns("models", "metrics", "plots", "predictions", "reports", "dvc.lock"))
    overrides, check = HEADLINES[name]
    run_pipeline(folder, overrides + ["train.progress=quiet"])
    metrics = json.loads((folder / "metrics/test.json").read_text())
    assert check(metrics), metrics
    assert REPORT_SHOWS.get(name, "<h2>Test metrics</h2>") in (folder / "reports/report.html").read_text()


def test_xor_defeats_the_perceptron(tmp_path, mlflow_store):
    folder = tmp_path / "perceptron_xor"
    shutil.copytree(GALLERY / "perceptron_and", folder, ignore=shutil.ignore_patterns("data", "models"))
    run_pipeline(folder, ["data.options.gate=xor", "train.epochs=30", "train.progress=quiet"])
    assert json.loads((folder / "metrics/test.json").read_text())["accuracy"] <= 0.75


def test_autoencoder_saves_embedding_and_shows_reconstructions(tmp_path, mlflow_store):
    folder = tmp_path / "ae"
    shutil.copytree(GALLERY / "digits_autoencoder", folder, ignore=shutil.ignore_patterns("data", "models"))
    run_pipeline(folder, ["train.epochs=3", "train.progress=quiet"])
    embedding = (folder / "plots/eval/embedding.csv").read_text().splitlines()
    assert embedding[0].startswith("dim0,dim1") and embedding[0].endswith("target")
    assert len(embedding) - 1 == 360  # one row per test image
    html = (folder / "reports/report.html").read_text()
    assert 'alt="reconstructions"' in html and 'alt="embedding"' in html


def test_gallery_pipeline_runs_under_dvc_repro(tmp_path):
    """`dvc repro pipelines/<name>/dvc.yaml` from the project root, as the READMEs say."""
    proj = make_project(tmp_path / "proj")
    shutil.copytree(GALLERY / "xor_mlp", proj / "pipelines" / "xor_mlp",
                    ignore=shutil.ignore_patterns("data", "models", "metrics", "plots", "reports", "dvc.lock"))
    params = proj / "pipelines/xor_mlp/params.yaml"
    params.write_text(params.read_text().replace("epochs: 60", "epochs: 40"))
    run_cmd(["dvc", "repro", "pipelines/xor_mlp/dvc.yaml"], cwd=proj)
    metrics = json.loads((proj / "pipelines/xor_mlp/metrics/test.json").read_text())
    assert metrics["accuracy"] == 1.0
    assert (proj / "mlflow.db").exists()  # the store sits at the project root, not in the folder
    again = run_cmd(["dvc", "repro", "pipelines/xor_mlp/dvc.yaml"], cwd=proj)
    assert "Running stage" not in again.stdout

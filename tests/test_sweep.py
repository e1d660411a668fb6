"""Sweeps and the initialization comparison, end to end through DVC and MLflow."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import ROOT, make_project, run_cmd
from densepipe.config import ConfigError
from densepipe.sweep import SweepSpec, grid_trials, load_spec, random_trials
from densepipe.threads import available_cores

pytestmark = pytest.mark.slow


def _project_with(tmp_path, name: str, epochs: int):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "pipelines" / name, proj / "pipelines" / name,
                    ignore=shutil.ignore_patterns("data", "models", "metrics", "plots", "reports", "dvc.lock"))
    params = proj / "pipelines" / name / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace(next(line for line in text.splitlines() if line.strip().startswith("epochs:")),
                                   f"  epochs: {epochs}"))
    return make_project(proj)


def test_grid_sweep_runs_every_trial_from_one_command(tmp_path):
    from mlflow.tracking import MlflowClient

    proj = _project_with(tmp_path, "sweep", epochs=2)
    # Two learning rates instead of the example's three: a 2 x 2 grid still gives each worker
    # two trials, at two thirds of the time.
    spec = proj / "pipelines" / "sweep" / "sweep.yaml"
    spec.write_text(spec.read_text().replace("[0.0003, 0.001, 0.003]", "[0.001, 0.003]"))
    # A baseline whose split and scale are in the DVC cache: trials restore them instead of re-running.
    run_cmd(["dvc", "repro", "pipelines/sweep/dvc.yaml:scale"], cwd=proj)
    run_cmd(["git", "add", "-A"], cwd=proj)
    run_cmd(["git", "commit", "-qm", "baseline data"], cwd=proj)
    out = run_cmd(["densepipe", "sweep", "pipelines/sweep/sweep.yaml", "--pipeline", "pipelines/sweep"],
                  cwd=proj, timeout=900)
    assert "sweep: 4 trials" in out.stdout
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gallery-sweep")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`densepipe.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert all("test_accuracy" in c.data.metrics for c in children)
    # The trials of the two workers share the cores rather than each taking all of them.
    threads = os.environ.get("OMP_NUM_THREADS", "").strip() or str(max(1, available_cores() // 2))
    assert {c.data.tags["densepipe.threads"] for c in children} == {threads}
    assert {c.data.params["train.optimizer.lr"] for c in children} == {"0.001", "0.003"}
    assert {c.data.params["model.layers.0.units"] for c in children} == {"32", "128"}
    best = max(c.data.metrics["test_accuracy"] for c in children)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best)
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/trials.png"} <= summary
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], cwd=proj / "pipelines" / "sweep").stdout)
    text = json.dumps(shown)
    assert text.count('"lr-units-') >= 4
    assert "test.json" in text and "units" in text


def test_sweep_spec_errors_and_samplers(tmp_path):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("method: grid\nparameters:\n  train.optimizer.lr: {low: 0.001, high: 0.1}\nmetrc: x\n")
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    assert "metrc: unknown key (did you mean 'metric'?)" in str(err.value)
    with pytest.raises(ConfigError, match="is a folder, not a sweep file"):
        load_spec(tmp_path)
    spec = SweepSpec(parameters={"a": [1, 2, 3], "b": ["x", "y"]})
    assert len(grid_trials(spec)) == 6
    spec = SweepSpec(method="random", trials=50, seed=3,
                     parameters={"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "u": [8, 16]})
    trials = random_trials(spec)
    assert len(trials) == 50 and all(1e-4 <= t["lr"] <= 1e-1 and t["u"] in (8, 16) for t in trials)
    assert trials == random_trials(spec)  # seeded
    small = sum(t["lr"] < 1e-2 for t in trials)
    assert small > 25  # log-uniform: two of three decades lie below 1e-2


def test_init_comparison_shows_the_symmetry_failure_of_zeros(tmp_path):
    proj = _project_with(tmp_path, "init_comparison", epochs=3)
    run_cmd(["dvc", "repro", "pipelines/init_comparison/dvc.yaml"], cwd=proj, timeout=900)
    folder = proj / "pipelines" / "init_comparison"
    table = json.loads((folder / "metrics/comparison.json").read_text())
    assert set(table) == {"zeros", "random_normal", "xavier_uniform", "he_normal", "orthogonal", "lecun_normal"}
    assert table["zeros"]["max_grad_norm/dense_1"] == 0.0
    assert table["zeros"]["val_accuracy"] < 0.2
    for name in ("xavier_uniform", "he_normal", "orthogonal", "lecun_normal"):
        assert table[name]["val_accuracy"] > 0.8, (name, table[name])
    html = (folder / "reports/init_comparison.html").read_text()
    assert "symmetry is never broken" in html and "zeros" in html

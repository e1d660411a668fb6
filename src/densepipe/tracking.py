"""The one place that talks to MLflow.

One run spans a pipeline execution: the train stage creates it and records its
id in a small JSON file (a DVC output); evaluate and report reopen it. The
tracking store defaults to SQLite at the project root, which stays the same
under `dvc exp run --temp` and queued experiments (they run in a copy below
.dvc/tmp), so every experiment lands in one store.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from densepipe.io import write_json

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def project_root(start: str | Path | None = None) -> Path:
    """The DVC project's root; for experiments running in a temp copy, the original's."""
    p = Path(start or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    if ".dvc" in p.parts:  # .../repo/.dvc/tmp/exps/<tmp>: the store belongs to repo
        return Path(*p.parts[: p.parts.index(".dvc")])
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return p


def tracking_uri(mlflow_cfg=None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if mlflow_cfg is not None and mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.environ.get("DVC_ROOT") or os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(parent_run_id: str | None = None) -> dict[str, str]:
    tags = {"densepipe.stage_runner": "dvc" if os.environ.get("DVC_ROOT") else "cli"}
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if parent_run_id:  # the MLflow UI nests the run under its parent
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow keys: model.layers.0.units = 256 (lists of sections by index)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def param_key(dvc_key: str) -> str:
    """DVC's -S key (model.layers[0].units) as the MLflow param name (model.layers.0.units)."""
    return dvc_key.replace("[", ".").replace("]", "")


class Tracker:
    """A handle on the pipeline's MLflow run, or a no-op when tracking is off."""

    def __init__(self, run_id: str | None, uri: str | None):
        self.run_id, self.uri = run_id, uri

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=self.uri)

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._client().log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.log_history([], static=metrics)

    def log_history(self, records: list[dict], static: dict | None = None) -> None:
        """Per-epoch values with step = epoch; `static` values without a step."""
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(r["epoch"])) for r in records
                 for k, v in r.items() if k != "epoch" and _finite(v)]
        items += [Metric(k, float(v), now, 0) for k, v in (static or {}).items() if _finite(v)]
        client = self._client()
        for i in range(0, len(items), 900):
            client.log_batch(self.run_id, metrics=items[i:i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            client = self._client()
            for k, v in tags.items():
                client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client().set_terminated(self.run_id, status)

    @contextmanager
    def active(self):
        """Makes the run mlflow's active run (for APIs such as log_model)."""
        import mlflow
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            yield mlflow


def _finite(v) -> bool:
    try:
        return float(v) == float(v) and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def _artifact_root(uri: str) -> str | None:
    """Local stores keep artifacts beside them at the project root (not in the working
    directory, which is a temp copy for `dvc exp run --temp`); servers choose their own."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (project_root() / "mlartifacts").as_uri()
    return None


def _create_run(mlflow_cfg, name: str | None, tags: dict[str, str]) -> tuple[str, str, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    uri = tracking_uri(mlflow_cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(mlflow_cfg.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(mlflow_cfg.experiment, artifact_location=_artifact_root(uri))
        except MlflowException:  # created meanwhile by a parallel trial
            exp_id = client.get_experiment_by_name(mlflow_cfg.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=name, tags=tags)
    return run.info.run_id, exp_id, uri


def start_run(mlflow_cfg, run_file: str | Path) -> Tracker:
    """Creates the pipeline's run and records it in run_file."""
    if not mlflow_cfg.enabled:
        write_json(run_file, {"run_id": None, "tracking_uri": None})
        return Tracker(None, None)
    name = mlflow_cfg.run_name or os.environ.get("DVC_EXP_NAME")
    run_id, exp_id, uri = _create_run(mlflow_cfg, name, run_tags(mlflow_cfg.parent_run_id))
    write_json(run_file, {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri})
    return Tracker(run_id, uri)


def start_parent_run(mlflow_cfg, name: str, params: dict) -> Tracker:
    """A run that groups others (a sweep's trials) in the MLflow UI."""
    run_id, _, uri = _create_run(mlflow_cfg, name, {**run_tags(), "densepipe.kind": "sweep"})
    tracker = Tracker(run_id, uri)
    tracker.log_params(params)
    return tracker


def open_run(run_file: str | Path) -> Tracker:
    """Reopens the run the train stage created."""
    path = Path(run_file)
    if not path.exists():
        return Tracker(None, None)
    info = json.loads(path.read_text())
    if not info.get("run_id"):
        return Tracker(None, None)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or info["tracking_uri"]
    return Tracker(info["run_id"], uri)

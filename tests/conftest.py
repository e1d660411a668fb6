"""Shared test set-up: no telemetry, the venv's commands on PATH, small helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="CUDA device not available")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


@pytest.fixture(autouse=True)
def _no_tracking_uri_leak():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; unset, a later test's
    subprocesses would log into this test's store instead of their own project's."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and puts the old one back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def run_cmd(args, cwd, check=True, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs a command, returning its result; on an unexpected exit shows its output."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def fresh_python(code: str) -> str:
    """What code prints, run in a new interpreter: what it imports is all that is loaded there."""
    return run_cmd([sys.executable, "-c", code], cwd=ROOT).stdout.strip()


def densepipe(*args, cwd, check=True) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "densepipe", *args], cwd=cwd, check=check)


def make_project(path: Path, params: dict | None = None, pipeline: Path | None = None) -> Path:
    """A git + DVC project holding a pipeline's dvc.yaml and params.yaml (params overridable)."""
    import yaml

    src = pipeline or ROOT
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "dvc.yaml", path / "dvc.yaml")
    # dvc.yaml lists our sources as deps (code changes re-run stages): copy them in.
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(ROOT / "src", path / "src", ignore=skip)
    shutil.copytree(ROOT / "csrc", path / "csrc", ignore=skip)
    base = yaml.safe_load((src / "params.yaml").read_text())
    for key, value in (params or {}).items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (path / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    run_cmd(["git", "init", "-q"], cwd=path)
    run_cmd(["git", "config", "user.email", "test@example.com"], cwd=path)
    run_cmd(["git", "config", "user.name", "test"], cwd=path)
    run_cmd(["dvc", "init", "-q"], cwd=path)
    (path / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmlruns/\n")
    run_cmd(["git", "add", "-A"], cwd=path)
    run_cmd(["git", "commit", "-qm", "pipeline"], cwd=path)
    return path


@pytest.fixture
def tmp_project(tmp_path):
    return lambda params=None, pipeline=None: make_project(tmp_path / "proj", params, pipeline)

"""Data-parallel training (DDP under torchrun): the sharding of each epoch, ranks without
rows in a step, two CPU processes (gloo) against one process with the same global batch
through `train.distributed.nproc` and through an external torchrun, and a killed rank."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from conftest import run_cmd
from densepipe import config
from densepipe.metrics import METRICS
from densepipe.nn.losses import LOSSES
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.stages import scale as scale_stage
from densepipe.stages import split as split_stage
from densepipe.stages import train as train_stage
from densepipe.train import distributed
from densepipe.train.history import History

# Two processes add the same terms as one in another order (and DDP averages gradients), so
# results agree to rounding, not bit for bit.
LOSS_RTOL = 1e-4     # losses: relative
WEIGHT_ATOL = 1e-5   # final weights: absolute (values are O(0.1))
TIMING = ("epoch_seconds", "samples_per_sec")


# ------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n, batch, world", [(1257, 157, 2), (10, 4, 2), (7, 8, 3), (100, 10, 4), (5, 3, 4)])
def test_shards_see_each_row_once_and_split_the_single_process_batches(n, batch, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard(n, batch, rank, world) for rank in range(world)]
    mine = [perm[s.positions] for s in shards]  # each rank's rows of the epoch, step after step
    assert sorted(torch.cat(mine).tolist()) == list(range(n))
    one = distributed.shard(n, batch)  # one process: step s is perm[s*batch:(s+1)*batch]
    assert torch.equal(perm[one.positions], perm)
    for step, start in enumerate(range(0, n, batch)):
        single = perm[start:start + batch]
        assert one.bounds[step] == (start, start + single.numel())
        parts = [rows[slice(*s.bounds[step])] for rows, s in zip(mine, shards, strict=True)]
        assert sorted(torch.cat(parts).tolist()) == sorted(single.tolist())
        assert all(s.step_rows[step] == single.numel() for s in shards)
        sizes = [p.numel() for p in parts]
        assert max(sizes) - min(sizes) <= 1   # ranks get equal shares, up to one row


@pytest.mark.parametrize("n, world", [(180, 2), (10, 3), (2, 4)])
def test_validation_blocks_cover_the_rows_in_order(n, world):
    blocks = [distributed.block(n, rank, world) for rank in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_a_rank_without_rows_contributes_zero_loss_gradient_and_statistics():
    cfg = config.parse({"model": {"layers": [{"type": "dense", "units": 8, "activation": "relu"},
                                             {"type": "dense", "units": "auto"}]}})
    spec = DataSpec({"features": 4}, {"target": TargetSpec("regression", 2)})
    model = build_model(cfg.model, cfg.train, spec)
    raw = model({"features": torch.empty(0, 4)})["target"]            # (0, 2): fused dense kernels
    target = torch.empty(0, 2)
    total = sum(LOSSES[name](raw, target).sum() for name in ("mse", "mae", "huber", "log_cosh"))
    assert total == 0
    total.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    labels = torch.empty(0, dtype=torch.long)
    assert LOSSES["sparse_categorical_crossentropy"](torch.empty(0, 3), labels, "softmax").sum() == 0
    assert LOSSES["binary_crossentropy"](torch.empty(0, 1), labels, "sigmoid").sum() == 0
    for name in ("mae", "mse", "rmse", "r2"):
        assert not METRICS[name].stats(raw.detach(), target).any()
    for name in ("accuracy", "precision", "recall", "f1"):
        assert not METRICS[name].stats(torch.empty(0, 1), labels).any()


# ------------------------------------------------------------- through the stage
PARAMS = {
    "seed": 5,
    "data": {"source": "digits"},
    # No dropout or batchnorm: with them, per-rank batches draw other masks / statistics.
    "model": {"layers": [{"type": "dense", "units": 32, "activation": "relu"},
                         {"type": "dense", "units": "auto", "activation": "auto"}]},
    # 1257 training rows = 8 steps of 157 (79 + 78 rows per rank) + 1 row, so rank 1 has
    # no rows in the last step and the shares are uneven in the others.
    "train": {"epochs": 8, "batch_size": 157, "progress": "quiet",
              "optimizer": {"name": "momentum", "lr": 0.05},
              # stops once val_loss improves by less than 0.2 (after 4 epochs): all ranks must stop together
              "callbacks": [{"type": "early_stopping", "monitor": "val_loss", "min_delta": 0.2, "patience": 0,
                             "restore_best_weights": True}],
              "distributed": {"nproc": 2}},
    "mlflow": {"experiment": "ddp"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    params = str(root / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    split_stage.run(argparse.Namespace(params=params, set=[], out=str(root / "split")))
    scale_stage.run(argparse.Namespace(params=params, set=[], split=str(root / "split"),
                                       out=str(root / "processed")))
    return root


@pytest.fixture
def env(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def stage_args(root: Path, run: str, *overrides: str) -> argparse.Namespace:
    out = root / run
    return argparse.Namespace(params=str(root / "params.yaml"), set=list(overrides),
                              data=str(root / "processed"),
                              model=str(out / "model.pt"), checkpoint=str(out / "checkpoint.pt"),
                              metrics=str(out / "train.json"), history=str(out / "history.csv"),
                              run=str(out / "run.json"))


def results(args):
    metrics = json.loads(Path(args.metrics).read_text())
    weights = torch.load(args.model, weights_only=True)["state_dict"]
    return metrics, weights, History.from_csv(args.history).records


def assert_same_training(got, want, n_train, n_val):
    (m1, w1, h1), (m2, w2, h2) = got, want
    assert m1["stopped_early"] and m2["stopped_early"]
    assert len(h1) == len(h2) < PARAMS["train"]["epochs"]
    for key in ("loss", "val_loss"):
        assert m1[key] == pytest.approx(m2[key], rel=LOSS_RTOL), key
    assert abs(m1["accuracy"] - m2["accuracy"]) <= 1 / n_train + 1e-12   # at most one sample apart
    assert abs(m1["val_accuracy"] - m2["val_accuracy"]) <= 1 / n_val + 1e-12
    for r1, r2 in zip(h1, h2, strict=True):                               # every epoch, not only the last
        assert r1["loss"] == pytest.approx(r2["loss"], rel=LOSS_RTOL) and r1["lr"] == r2["lr"]
    for k in w2:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=WEIGHT_ATOL)


def test_two_processes_match_one_with_the_same_global_batch(project, env):
    from mlflow.tracking import MlflowClient
    n_train, n_val = (len(pd.read_parquet(project / "split" / f"{s}.parquet")) for s in ("train", "val"))
    one = stage_args(project, "one", "train.distributed.nproc=1")   # the reference: one process
    train_stage.run(one)

    # train.distributed.nproc: 2 -> the stage starts itself through torchrun
    launched = stage_args(project, "launched")
    proc = run_cmd([sys.executable, "-m", "densepipe", "train", *distributed.argv(launched)], cwd=project,
                   env=env, timeout=240)
    assert "train: 2 processes" in proc.stdout
    assert_same_training(results(launched), results(one), n_train, n_val)

    # an external torchrun: the stage sees the launcher's variables and does not start itself again
    external = stage_args(project, "external")
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "densepipe", "--", "train", *distributed.argv(external)], cwd=project, env=env,
                   timeout=240)
    assert "train: 2 processes" not in proc.stdout
    assert_same_training(results(external), results(one), n_train, n_val)

    # rank 0 alone talks to MLflow: one run per training job
    runs = {json.loads(Path(a.run).read_text())["run_id"] for a in (one, launched, external)}
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(PARAMS["mlflow"]["experiment"])
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == runs and len(runs) == 3


def rank_of(p: psutil.Process) -> str | None:
    try:
        return p.environ().get("RANK")
    except psutil.Error:
        return None


def test_a_killed_rank_fails_the_job_and_its_last_checkpoint_resumes(project, env):
    args = stage_args(project, "killed", "train.epochs=60", "train.callbacks=[]")
    cmd = [sys.executable, "-m", "densepipe", "train", *distributed.argv(args)]
    checkpoint = Path(args.checkpoint)
    job = subprocess.Popen(cmd, cwd=project, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():    # rank 0 has finished an epoch: the workers are training
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.02)
        victim = next(p for p in psutil.Process(job.pid).children(recursive=True) if rank_of(p) == "1")
        os.kill(victim.pid, signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert f"rank 1 (pid {victim.pid}) was killed by SIGKILL" in err
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] < 60                        # killed mid-training
    assert [r["epoch"] for r in state["history"]] == list(range(1, state["epoch"] + 1))
    assert f"The last checkpoint, {checkpoint} (after epoch {state['epoch']}), loads with" in err

    proc = run_cmd(cmd, cwd=project, env=env, timeout=240)
    assert f"resuming from {checkpoint} after epoch {state['epoch']}" in proc.stdout
    history = History.from_csv(args.history).records
    assert [r["epoch"] for r in history] == list(range(1, 61))
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in state["history"]]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in history[:state["epoch"]]] == strip
    assert math.isfinite(json.loads(Path(args.metrics).read_text())["loss"])

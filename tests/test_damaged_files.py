"""Inputs that exist but are damaged, outputs that cannot be written, an interrupted command
and a training that diverges at once: a message naming the file and the stage that rewrites
it, a non-zero exit, and the files already written left as they were."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml

from densepipe import checkpoint as ckpt
from densepipe.cli import main

PARAMS = {
    "seed": 0,
    "data": {"source": "iris"},
    "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu"},
                         {"type": "dense", "units": "auto", "activation": "auto"}]},
    "train": {"epochs": 2, "batch_size": 32, "progress": "quiet"},
    "mlflow": {"enabled": False},
}


def _train_argv(root, name="run", *extra):
    out = root / name
    return ["train", "--params", str(root / "params.yaml"), "--data", str(root / "processed"),
            "--model", str(out / "model.pt"), "--checkpoint", str(out / "ckpt.pt"),
            "--metrics", str(out / "train.json"), "--history", str(out / "history.csv"),
            "--run", str(out / "run.json"), *extra]


def _evaluate_argv(root):
    out = root / "eval"
    return ["evaluate", "--params", str(root / "params.yaml"), "--model", str(root / "run" / "model.pt"),
            "--data", str(root / "processed"), "--split", str(root / "split"), "--metrics", str(out / "test.json"),
            "--plots", str(out / "plots"), "--predictions", str(out / "pred.csv"),
            "--run", str(root / "run" / "run.json")]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    p = str(tmp_path / "params.yaml")
    assert main(["split", "--params", p, "--out", str(tmp_path / "split")]) == 0
    assert main(["scale", "--params", p, "--split", str(tmp_path / "split"), "--out", str(tmp_path / "processed")]) == 0
    assert main(_train_argv(tmp_path)) == 0
    return tmp_path


def _fails(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    return err


REMEDY_TRAIN = "; run the train stage again (dvc repro, or densepipe train)"
REMEDY_SCALE = "; run the scale stage again"


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), " cannot be read as a densepipe model file ("),
    (lambda p: p.write_text("hello"), " cannot be read as a densepipe model file ("),
    (lambda p: p.write_bytes(b""), " cannot be read as a densepipe model file ("),
    # a finished run's resume file in place of the model
    (lambda p: p.write_bytes((p.parent / "ckpt.pt").read_bytes()), " is a resume checkpoint, not a densepipe "
                                                                    "model file" + REMEDY_TRAIN),
])
def test_a_damaged_model_file_is_named(project, capsys, damage, message):
    model = project / "run" / "model.pt"
    damage(model)
    damaged = model.read_bytes()
    assert main(_evaluate_argv(project)) == 1
    err = capsys.readouterr().err
    assert f"densepipe evaluate: error: {model}{message}" in err and err.rstrip().endswith(REMEDY_TRAIN), err
    assert "Traceback" not in err
    assert model.read_bytes() == damaged and not (project / "eval" / "test.json").exists()


@pytest.mark.parametrize("name, damage, what", [
    ("train.npz", lambda p: p.write_bytes(p.read_bytes()[:200]), "the scale stage's arrays"),
    ("train.npz", lambda p: p.write_bytes(b""), "the scale stage's arrays"),
    ("preprocessor.json", lambda p: p.write_text(p.read_text()[:50]), "the scale stage's preprocessor"),
])
def test_damaged_scale_outputs_are_named(project, capsys, name, damage, what):
    damage(project / "processed" / name)
    before = (project / "run" / "model.pt").read_bytes()
    assert main(_train_argv(project)) == 1
    err = capsys.readouterr().err
    assert f"densepipe train: error: {project / 'processed' / name} cannot be read as {what} (" in err, err
    assert err.rstrip().endswith(REMEDY_SCALE) and "Traceback" not in err
    assert (project / "run" / "model.pt").read_bytes() == before


def test_an_output_that_cannot_be_written_is_an_error_not_a_traceback(project, capsys):
    argv = _train_argv(project)
    argv[argv.index("--metrics") + 1] = str(project / "params.yaml" / "train.json")  # a file as a folder
    _fails(capsys, argv, "densepipe train: error: [Errno")
    assert yaml.safe_load((project / "params.yaml").read_text()) == PARAMS


def test_outputs_get_the_usual_file_mode(project):
    # mkstemp's 0600 would hide the report and metrics from other users of the machine.
    mask = os.umask(0)
    os.umask(mask)
    for f in (project / "run" / "train.json", project / "processed" / "train.npz"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_divergence_in_the_first_epoch_keeps_the_existing_model_file(project, capsys):
    model = project / "run" / "model.pt"
    before = model.read_bytes()
    err = _fails(capsys, _train_argv(project, "run", "--set", "train.optimizer={name: sgd, lr: 1e12}",
                               "--set", "train.epochs=3"), "training diverged")
    assert model.read_bytes() == before
    assert "no epoch finished, so there are no trained weights to keep" in err and f"{model} was not written" in err


@pytest.mark.parametrize("checkpoint", [False, True])
def test_divergence_after_good_epochs_keeps_a_good_model_file_and_says_which(project, capsys, checkpoint):
    # The learning rate grows a thousandfold per epoch: the first epochs are good, a later one diverges.
    # With the checkpoint, the best epoch is that of the least lr: the first, whatever epoch diverges.
    callbacks = "{type: exponential_decay, gamma: 1000}" + (
        ", {type: model_checkpoint, monitor: lr, mode: min, save_best_only: true}" if checkpoint else "")
    settings = ["--set", "train.optimizer={name: sgd, lr: 0.001}", "--set", f"train.callbacks=[{callbacks}]"]
    assert main(_train_argv(project, "div", *settings, "--set", "train.epochs=30")) == 1
    err = capsys.readouterr().err
    m = re.search(r"at epoch (\d+), batch \d+; the weights after epoch (\d+), the last good one, were restored", err)
    assert m, err
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1 >= 1
    model = project / "div" / "model.pt"
    loaded = ckpt.load_model(model)
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values())
    if checkpoint:  # the callback's pick stays, and is named: the first epoch's weights, not the last good ones
        assert good >= 2
        assert f"{model} holds epoch 1, which model_checkpoint wrote" in err
        assert loaded.epoch == 1
        assert main(_train_argv(project, "one", *settings, "--set", "train.epochs=1")) == 0
        first = ckpt.load_model(project / "one" / "model.pt").model.state_dict()
        assert all(torch.equal(v, first[k]) for k, v in loaded.model.state_dict().items())
    else:
        assert f"{model} holds those weights (epoch {good})" in err
        assert loaded.epoch == good


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_stopped_training_says_so_in_one_line_and_leaves_no_temp_files(project, sig, code, said):
    # A checkpoint every epoch: the signal likely lands while one is being written.
    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 100000, "checkpoint_every": 1}}
    (project / "long.yaml").write_text(yaml.safe_dump(params))
    argv = _train_argv(project, "long")
    argv[2] = str(project / "long.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "densepipe", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(8)  # well into training
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == f"densepipe train: {said}"
    assert "Traceback" not in err
    assert not list((project / "long").glob(".*.tmp"))
    assert (project / "long" / "ckpt.pt").exists()  # the last complete checkpoint: the next run resumes

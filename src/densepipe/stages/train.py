"""train: processed arrays -> model file, per-epoch history, train metrics, MLflow run.

A resume checkpoint is written every `train.checkpoint_every` epochs; when the
stage runs again with the same params and data it continues from there, and
the result equals an uninterrupted run.

With `train.distributed.nproc` > 1 the stage starts itself in that many processes
through torchrun; under torchrun (ours or the user's) every rank trains and rank 0
alone writes the outputs and talks to MLflow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from densepipe import checkpoint as ckpt
from densepipe import config as config_mod
from densepipe import tracking
from densepipe.data.arrays import data_spec, load_arrays, to_split
from densepipe.data.preprocess import Preprocessor
from densepipe.io import write_json
from densepipe.nn.model import UNSCALED_LOSSES, build_model
from densepipe.stages.common import as_config_error, load_params, seed_everything, use_deterministic_algorithms
from densepipe.train import distributed
from densepipe.train.loop import WALL_CLOCK, DivergenceError, Trainer

_DONE = {"format": ckpt.RESUME_FORMAT, "key": "completed"}  # a finished run leaves nothing to resume


def add_arguments(p) -> None:
    p.add_argument("--data", default="data/processed")
    p.add_argument("--model", default="models/model.pt")
    p.add_argument("--checkpoint", default="models/checkpoint.pt", help="resume checkpoint")
    p.add_argument("--metrics", default="metrics/train.json")
    p.add_argument("--history", default="plots/history.csv")
    p.add_argument("--run", default="models/run.json", help="where the MLflow run id is recorded")


def class_weights(cfg, pre: Preprocessor, targets: dict) -> dict[str, torch.Tensor]:
    """Per-class loss weights for each classification target ('balanced' as scikit-learn)."""
    spec = cfg.train.class_weight
    if spec is None:
        return {}
    out = {}
    classified = {n: t for n, t in pre.targets.items() if t["task"] in ("binary", "multiclass")}
    if not classified:
        tasks = ", ".join(f"'{n}' ({t['task']})" for n, t in pre.targets.items())
        raise config_mod.ConfigError(f"train.class_weight: weights classes, but no target has classes: "
                                     f"{tasks}; remove train.class_weight")
    for name, t in classified.items():
        k = len(t["classes"])
        if spec == "balanced":
            counts = torch.bincount(torch.as_tensor(targets[name]).reshape(-1), minlength=k).double()
            out[name] = (counts.sum() / (k * counts.clamp_min(1))).float()
        else:
            labels = [str(c) for c in t["classes"]]
            unknown = [c for c in spec if str(c) not in labels]
            if unknown:
                raise config_mod.ConfigError(f"train.class_weight: {unknown} are not classes of '{name}'; "
                                             f"classes: {labels}")
            out[name] = torch.tensor([float(spec.get(c, 1.0)) for c in labels])
    return out


_SET_AFTER_TRAINING = ("evaluate", "report")  # params sections read by the stages after train

# train settings that do not change what training computes, left out of the resume key: a job
# killed on N processes may resume on M, and a run restarted with another progress display or
# checkpoint interval picks up where it stopped.
_NOT_IN_RESUME_KEY = ("distributed", "progress", "checkpoint_every")


def target_units(pre: Preprocessor) -> dict[str, tuple[float, float]]:
    """(center, scale) of each scaled regression target: the trainer's metrics undo it."""
    return {name: (spec["center"], spec["scale"]) for name, spec in pre.targets.items()
            if spec["task"] == "regression" and (spec["center"], spec["scale"]) != (0.0, 1.0)}


def _check_losses_fit_scaling(model, units: dict) -> None:
    for head in model.heads.values():
        if head.loss in UNSCALED_LOSSES and head.target in units:
            raise config_mod.ConfigError(
                f"output '{head.node}': loss '{head.loss}' reads target '{head.target}' in its own units, but "
                f"scale.target scales it; set scale.target: none")


def _resume_key(cfg, data_dir: Path) -> str:
    defaults = config_mod.TrainConfig()
    one = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={k: getattr(defaults, k) for k in _NOT_IN_RESUME_KEY})})
    h = hashlib.sha256(ckpt.config_hash(one, "seed", "model", "train").encode())
    for name in ("preprocessor.json", "train.npz", "val.npz"):
        h.update((data_dir / name).read_bytes())
    return h.hexdigest()[:16]


def final_metrics(history, stopped: str | None, held_epoch: int | None = None) -> dict:
    """The metrics of the weights the model file holds: those of epoch `held_epoch` (counted
    from 0; the last epoch when None)."""
    chosen = [r for r in history.records if held_epoch is not None and r["epoch"] == held_epoch + 1]
    last = dict(chosen[0] if chosen else history.records[-1]) if history.records else {}
    # Wall-clock speed stays in the history and MLflow: in a metrics file it would make every run
    # differ from an identical one for `dvc metrics diff`.
    out = {k: v for k, v in last.items() if not k.startswith(("grad_norm/", *WALL_CLOCK))}
    out["epochs_run"] = len(history)
    if stopped:
        out["stopped_early"] = True
    return out


def run(args) -> None:
    cfg = load_params(args)
    nproc = cfg.train.distributed.nproc
    if distributed.should_launch(nproc):
        _launch(args, cfg, nproc)
        return
    with distributed.process_group(cfg.train.device) as ctx:
        _train(args, cfg, ctx)


def _launch(args, cfg, nproc: int) -> None:
    """This same command in nproc processes through torchrun; waits for the job."""
    print(f"train: {nproc} processes (torchrun --standalone --nproc-per-node {nproc})")
    try:
        distributed.launch(["train", *distributed.argv(args)], nproc)
    except distributed.WorkerFailure as err:
        path = Path(args.checkpoint)
        state = ckpt.load_resume(path, _resume_key(cfg, Path(args.data)))
        note = (f"The last checkpoint, {path} (after epoch {state['epoch']}), loads with "
                f"torch.load(..., weights_only=True); run the stage again to resume from it"
                if state is not None else f"No checkpoint was written yet ({path}); the next run starts over")
        raise distributed.WorkerFailure(f"{err}. {note}") from None


def _train(args, cfg, ctx: distributed.Context) -> None:
    seed_everything(cfg.seed)
    use_deterministic_algorithms(cfg.train.deterministic)
    data_dir = Path(args.data)
    pre = Preprocessor.load(data_dir / "preprocessor.json")
    spec = as_config_error(data_spec, pre, cfg.model)
    arrays = {s: load_arrays(data_dir / f"{s}.npz") for s in ("train", "val")}
    train, val = (as_config_error(to_split, *arrays[s], pre, cfg.model) for s in ("train", "val"))
    model = as_config_error(build_model, cfg.model, cfg.train, spec, cfg.seed)
    _check_losses_fit_scaling(model, target_units(pre))
    resume_path, model_path = Path(args.checkpoint), Path(args.model)
    key = _resume_key(cfg, data_dir)
    state = distributed.from_main(ckpt.load_resume(resume_path, key) if ctx.main else None)

    def save_model(epoch: int) -> None:
        ckpt.save_model(model_path, trainer.model, cfg, pre, spec, epoch)

    def save_checkpoint(st: dict) -> None:
        ckpt.save_resume(resume_path, {**st, "mlflow_run": tracker.run_id or ""}, key)

    trainer = Trainer(model, cfg.train, seed=cfg.seed,
                      class_weights=class_weights(cfg, pre, arrays["train"][1]),
                      target_units=target_units(pre),
                      save_model=save_model if ctx.main else None,
                      save_checkpoint=save_checkpoint if ctx.main else None)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.log(f"resuming from {resume_path} after epoch {trainer.start_epoch}")
    tracker = _open_tracker(cfg, args.run, state) if ctx.main else tracking.Tracker(None, None)
    if state is None:
        # Not the evaluate and report sections: they change after training without a new run, and
        # MLflow params cannot change; the evaluate stage tags the run with the settings it used.
        params = config_mod.with_named_mappings(config_mod.resolved(cfg))
        tracker.log_params({k: v for k, v in params.items() if k not in _SET_AFTER_TRAINING})
    try:
        history = trainer.fit(train, val)
    except DivergenceError as err:
        # The last good weights go to the model file, for inspection, unless no epoch finished (they
        # would be the untrained ones) or a checkpoint callback already wrote a good epoch there.
        if trainer.saved_epoch is not None:
            where = f"{model_path} holds epoch {trainer.saved_epoch + 1}, which model_checkpoint wrote."
        elif len(trainer.history):
            where = f"{model_path} holds those weights (epoch {len(trainer.history)})."
            if ctx.main:
                save_model(len(trainer.history))
        else:
            where = f"{model_path} was not written."
        tracker.log_history(trainer.history.records)
        tracker.finish("FAILED")
        distributed.barrier()  # the launcher stops the job at the first failed rank: rank 0 writes first
        raise DivergenceError(f"{err} {where}") from None
    if not ctx.main:
        return  # rank 0 writes the outputs
    held = trainer.saved_epoch  # a checkpoint callback's pick (its best epoch, or the last)
    if held is None:  # no callback wrote the model file: the final (or restored) weights go there
        held = trainer.restored_epoch if trainer.restored_epoch is not None else len(history) - 1
        save_model(held + 1)
    elif not model_path.exists():
        # Resumed after the callback's last write, and the file is gone (dvc repro removes a stage's
        # outputs before running it): written again from the weights the resume state kept.
        trainer.load_weights(trainer.saved_weights)
        save_model(held + 1)
    history.save_csv(args.history)
    metrics = final_metrics(history, trainer.stop_reason, held)
    write_json(args.metrics, metrics)
    tracker.log_history(history.records[trainer.start_epoch:] if state is not None else history.records)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
    # The threads it trained with: samples/s compare across runs only alongside them.
    tracker.set_tags({"model_summary": _summary_text(model), "densepipe.threads": str(torch.get_num_threads())})
    _mark_done(resume_path)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"train: {len(history)} epoch(s); {shown}")


def _mark_done(path: Path) -> None:
    ckpt.save_blob(path, _DONE)


def _open_tracker(cfg, run_file: str, state: dict | None) -> tracking.Tracker:
    previous = (state or {}).get("mlflow_run")
    if previous and cfg.mlflow.enabled:  # a resumed run keeps logging to the run it started
        write_json(run_file, {"run_id": previous, "tracking_uri": tracking.tracking_uri(cfg.mlflow)})
        return tracking.open_run(run_file)
    return tracking.start_run(cfg.mlflow, run_file)


def _summary_text(model) -> str:
    rows = model.summary()
    return "\n".join(f"{r['layer']:<16} {r['type']:<12} {r['output_shape']:<14} {r['params']:>9,}"
                     for r in rows)

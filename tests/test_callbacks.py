"""Callbacks on scripted log sequences (fed to a real, tiny Trainer) and in real
training: early stopping, model checkpoints, learning-rate schedules against
torch.optim.lr_scheduler, reduce-on-plateau, divergence and terminate_on_nan."""

import copy
import math
import random
import re

import pytest
import torch
from torch.optim import lr_scheduler

from densepipe import config
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.train.loop import DivergenceError, Split, Trainer

BASE_LR = 0.1
SPEC = DataSpec({"features": 3}, {"target": TargetSpec("regression", 1)})


def make_trainer(callbacks=(), *, epochs=10, lr=BASE_LR, layers=None, saved=None, messages=None, **train):
    cfg = config.parse({
        "model": {"layers": layers or [{"type": "dense", "units": "auto"}]},
        "train": {"epochs": epochs, "optimizer": {"name": "sgd", "lr": lr}, "callbacks": list(callbacks),
                  "progress": "quiet", "batch_size": 16, **train},
    })
    model = build_model(cfg.model, cfg.train, SPEC, seed=0)
    log = messages.append if messages is not None else (lambda msg: None)
    return Trainer(model, cfg.train, seed=0, log=log,
                   save_model=saved.append if saved is not None else None)


def regression_data(n=96, seed=0, noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 + noise * torch.randn(n, generator=gen)
    return Split({"features": x}, {"target": y})


def script(trainer, values, monitor="val_loss", on_epoch=None):
    """Feeds one monitored value per epoch to the callbacks, as fit() does.
    Returns the epoch at which a stop was requested, or None."""
    for cb in trainer.callbacks:
        cb.on_train_begin(trainer)
    stopped = None
    for epoch, value in enumerate(values):
        if on_epoch is not None:
            on_epoch(epoch)
        for cb in trainer.callbacks:
            cb.on_epoch_end(trainer, epoch, {monitor: value, "loss": 1.0})
        if trainer.stop:
            stopped = epoch
            break
    for cb in trainer.callbacks:
        cb.on_train_end(trainer)
    return stopped


def early(**args):
    return make_trainer([{"type": "early_stopping", **args}])


# ------------------------------------------------------------- early stopping
@pytest.mark.parametrize("args,values,stop", [
    # best 0.8 at epoch 1; epochs 2 and 3 do not improve -> patience 2 runs out at epoch 3
    ({"patience": 2}, [1.0, 0.8, 0.85, 0.9, 0.7], 3),
    ({"patience": 3}, [1.0, 0.8, 0.85, 0.9, 0.7, 0.75], None),
    # patience 0: the first epoch that does not improve stops
    ({"patience": 0}, [1.0, 0.9, 0.95, 0.5], 2),
    # min_delta: 0.95 is not 0.1 better than 1.0
    ({"patience": 1, "min_delta": 0.1}, [1.0, 0.95, 0.92, 0.85], 1),
    ({"patience": 1}, [1.0, 0.95, 0.92, 0.85], None),
    # mode max, explicit and inferred from the monitored name
    ({"patience": 1, "mode": "max"}, [0.5, 0.6, 0.55, 0.7], 2),
    ({"patience": 1, "mode": "min"}, [0.5, 0.6, 0.55, 0.7], 1),
    # baseline: improvements that do not beat it do not restart the patience count
    ({"patience": 2, "baseline": 0.5}, [0.9, 0.8, 0.85], 2),
    ({"patience": 2}, [0.9, 0.8, 0.85], None),
    # start_from_epoch: the first two epochs are not monitored
    ({"patience": 1, "start_from_epoch": 2}, [0.5, 0.6, 0.7, 0.8, 0.9], 3),
    ({"patience": 1}, [0.5, 0.6, 0.7, 0.8, 0.9], 1),
])
def test_early_stopping_scripted(args, values, stop):
    assert script(early(**args), values) == stop


@pytest.mark.parametrize("monitor", ["val_accuracy", "val_species_accuracy", "val_width_r2"])
def test_early_stopping_mode_auto_reads_the_metric(monitor):
    trainer = early(monitor=monitor, patience=1)      # higher is better for all three
    assert script(trainer, [0.5, 0.6, 0.55, 0.7], monitor=monitor) == 2


def test_early_stopping_restores_the_best_weights():
    trainer = early(patience=2, restore_best_weights=True)
    weight = trainer.model.layers["dense_1"].weight

    def set_weights(epoch):
        with torch.no_grad():
            weight.fill_(float(epoch))  # epoch e trains the weights to e

    assert script(trainer, [1.0, 0.6, 0.7, 0.9, 0.2], on_epoch=set_weights) == 3
    assert torch.all(weight == 1.0)         # epoch 1 had the best val_loss


def test_early_stopping_reports_a_missing_monitor():
    with pytest.raises(KeyError, match=r"'val_auc'.*available: loss, val_loss"):
        script(early(monitor="val_auc"), [1.0])


def test_early_stopping_in_training_keeps_the_best_epoch():
    trainer = make_trainer([{"type": "early_stopping", "patience": 2, "restore_best_weights": True}],
                           epochs=25, lr=0.2)
    history = trainer.fit(regression_data(seed=0), regression_data(seed=1))
    best = min(history.series("val_loss"))
    val_loss, _ = trainer.evaluate(regression_data(seed=1))
    assert val_loss[0].item() == pytest.approx(best, rel=1e-6)


# ------------------------------------------------------------ model checkpoint
# The model file is written with the epoch its weights come from, counted from 1 as in the history.
@pytest.mark.parametrize("args,expected", [
    ({"save_best_only": True}, [1, 2, 4]),
    ({"save_best_only": False}, [1, 2, 3, 4, 5]),
    ({}, [1, 2, 3, 4, 5]),  # Keras' default: every epoch
    # only values better than the threshold count, as Keras' initial_value_threshold
    ({"save_best_only": True, "initial_value_threshold": 0.85}, [2, 4]),
    ({"save_best_only": True, "initial_value_threshold": 0.5}, []),
])
def test_model_checkpoint(args, expected):
    saved = []
    trainer = make_trainer([{"type": "model_checkpoint", **args}], saved=saved)
    script(trainer, [1.0, 0.8, 0.9, 0.7, 0.75])
    assert saved == expected


def test_model_checkpoint_max_mode():
    saved = []
    trainer = make_trainer([{"type": "model_checkpoint", "monitor": "val_accuracy", "save_best_only": True}],
                           saved=saved)
    script(trainer, [0.5, 0.4, 0.6, 0.6, 0.9], monitor="val_accuracy")
    assert saved == [1, 3, 5]


# ----------------------------------------------------------------- lr schedules
def torch_lrs(make_scheduler, epochs):
    """The lr each epoch trains with under a torch scheduler stepped once per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = make_scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def fitted_lrs(callbacks, epochs):
    trainer = make_trainer(callbacks, epochs=epochs, lr=BASE_LR)
    return trainer.fit(regression_data(n=32)).series("lr")


def keras_scheduler_example(hold: int):
    """Keras' LearningRateScheduler example (lr kept for `hold` epochs, then lr * exp(-0.1) at each
    epoch's start) as a factor on the base lr per epoch, stepping the lr as Keras does."""
    def factor(epoch: int) -> float:
        lr = 1.0
        for e in range(epoch + 1):
            lr = lr if e < hold else lr * math.exp(-0.1)
        return lr
    return factor


def keras_cosine_restarts(epoch: int, first: int, t_mul: float, m_mul: float, alpha: float) -> float:
    """Keras' CosineDecayRestarts (keras/src/optimizers/schedules), written out: the factor on the
    initial lr after `epoch` steps of one epoch each."""
    completed = epoch / first
    if t_mul == 1.0:
        i_restart = math.floor(completed)
        completed -= i_restart
    else:
        i_restart = math.floor(math.log(1.0 - completed * (1.0 - t_mul)) / math.log(t_mul))
        sum_r = (1.0 - t_mul ** i_restart) / (1.0 - t_mul)
        completed = (completed - sum_r) / t_mul ** i_restart
    cosine = 0.5 * m_mul ** i_restart * (1.0 + math.cos(math.pi * completed))
    return (1 - alpha) * cosine + alpha


SCHEDULES = [
    ({"type": "step_decay", "step_size": 3, "gamma": 0.5}, lambda e: 0.5 ** (e // 3),
     lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ({"type": "exponential_decay", "gamma": 0.8}, lambda e: 0.8 ** e,
     lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8)),
    ({"type": "multistep", "milestones": [2, 5, 6], "gamma": 0.5},
     lambda e: 0.5 ** sum(e >= m for m in (2, 5, 6)),
     lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5, 6], gamma=0.5)),
    # Keras' LearningRateScheduler example: the lr held for ten epochs, then times exp(-0.1) each epoch.
    ({"type": "exponential_decay", "gamma": math.exp(-0.1), "hold_epochs": 4},
     lambda e: math.exp(-0.1) ** max(0, e - 3),
     lambda o: lr_scheduler.LambdaLR(o, keras_scheduler_example(hold=4))),
    ({"type": "cosine", "t_max": 10, "min_factor": 0.1},
     lambda e: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * e / 10)),
     lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.1 * BASE_LR)),
    ({"type": "warmup", "warmup_epochs": 4, "start_factor": 0.25}, lambda e: 0.25 + 0.75 * min(e, 4) / 4,
     lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=4)),
    ({"type": "cosine_restarts", "first_epochs": 2, "t_mul": 2},
     lambda e: keras_cosine_restarts(e, first=2, t_mul=2.0, m_mul=1.0, alpha=0.0),
     lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2)),
    ({"type": "cosine_restarts", "first_epochs": 3, "t_mul": 1, "min_factor": 0.2},
     lambda e: keras_cosine_restarts(e, first=3, t_mul=1.0, m_mul=1.0, alpha=0.2),
     lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=0.2 * BASE_LR)),
    ({"type": "polynomial_decay", "decay_epochs": 8, "power": 2.0},
     lambda e: (1 - min(e, 8) / 8) ** 2,
     lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0)),
    ({"type": "inverse_time_decay", "decay_rate": 0.5, "decay_epochs": 2},
     lambda e: 1 / (1 + 0.5 * e / 2),
     lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + 0.5 * e / 2))),
    ({"type": "cosine_restarts", "first_epochs": 2, "t_mul": 1.5, "m_mul": 0.5, "min_factor": 0.1},
     lambda e: keras_cosine_restarts(e, first=2, t_mul=1.5, m_mul=0.5, alpha=0.1),
     lambda o: lr_scheduler.LambdaLR(o, lambda e: keras_cosine_restarts(e, 2, 1.5, 0.5, 0.1))),
    ({"type": "inverse_time_decay", "decay_rate": 2.0, "decay_epochs": 3, "staircase": True},
     lambda e: 1 / (1 + 2.0 * (e // 3)),
     lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + 2.0 * (e // 3)))),
    # values halving at each boundary: torch's MultiStepLR is the same schedule.
    ({"type": "piecewise_constant", "boundaries": [3, 7], "values": [BASE_LR, BASE_LR / 2, BASE_LR / 4]},
     lambda e: 1.0 if e < 3 else 0.5 if e < 7 else 0.25,
     lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, 7], gamma=0.5)),
]


@pytest.mark.parametrize("callback,formula,reference", SCHEDULES, ids=[
    "-".join(map(str, s[0].values())) for s in SCHEDULES])
def test_lr_schedules_match_formula_and_torch(callback, formula, reference):
    epochs = 11
    trainer = make_trainer([callback], epochs=epochs)
    cb = trainer.callbacks[0]
    cb.on_train_begin(trainer)
    ours = [BASE_LR * cb.lr_factor(e) for e in range(epochs)]
    assert ours == pytest.approx([BASE_LR * formula(e) for e in range(epochs)], rel=1e-12)
    assert ours == pytest.approx(torch_lrs(reference, epochs), rel=1e-9)
    assert fitted_lrs([callback], epochs) == pytest.approx(ours, rel=1e-12)   # what training used


def test_cosine_defaults_to_all_epochs():
    epochs = 9
    assert fitted_lrs([{"type": "cosine"}], epochs) == pytest.approx(
        torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=epochs), epochs), rel=1e-9)


def test_warmup_then_cosine_composes_like_sequential_lr():
    epochs, warm = 12, 3
    ours = fitted_lrs([{"type": "warmup", "warmup_epochs": warm, "start_factor": 0.1},
                       {"type": "cosine", "warmup_epochs": warm}], epochs)
    reference = torch_lrs(lambda o: lr_scheduler.SequentialLR(o, [
        lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=warm),
        lr_scheduler.CosineAnnealingLR(o, T_max=epochs - warm)], milestones=[warm]), epochs)
    assert ours == pytest.approx(reference, rel=1e-9)


# ------------------------------------------------------------ reduce on plateau
def plateau_sequence(seed, n=60):
    """A loss that improves, stalls and wobbles: every branch of the plateau logic."""
    rng = random.Random(seed)
    value, out = 1.0, []
    for _ in range(n):
        value *= rng.choice([0.9, 0.99, 1.0, 1.0, 1.02, 1.05, 0.9999])
        out.append(value)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("patience,cooldown,min_lr", [(1, 0, 0.0), (2, 0, 0.0), (3, 2, 0.0), (2, 3, 2e-3),
                                                      (0, 1, 0.0)])
def test_reduce_on_plateau_matches_torch(seed, patience, cooldown, min_lr):
    values = plateau_sequence(seed)
    factor, min_delta = 0.5, 1e-3
    trainer = make_trainer([{"type": "reduce_on_plateau", "factor": factor, "patience": patience,
                             "cooldown": cooldown, "min_lr": min_lr, "min_delta": min_delta}])
    cb = trainer.callbacks[0]
    ours = []
    for epoch, v in enumerate(values):
        ours.append(BASE_LR * cb.lr_factor(epoch))
        cb.on_epoch_end(trainer, epoch, {"val_loss": v})
    # Keras counts the epoch that reaches `patience` bad epochs and the epoch that ends a
    # cooldown; torch reduces after more than `patience` bad epochs and skips `cooldown` whole
    # epochs. Keras (patience p, cooldown c) is torch (p - 1, c - 1) with an absolute threshold.
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=max(patience - 1, 0),
                                           cooldown=max(cooldown - 1, 0), min_lr=min_lr,
                                           threshold=min_delta, threshold_mode="abs",
                                           eps=0.0)  # torch's eps ignores reductions below 1e-8
    theirs = []
    for v in values:
        theirs.append(opt.param_groups[0]["lr"])
        sched.step(v)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert min(ours) < BASE_LR                    # the sequence did reduce


def test_reduce_on_plateau_in_training_uses_the_reduced_lr():
    messages = []
    trainer = make_trainer([{"type": "reduce_on_plateau", "monitor": "loss", "patience": 1, "factor": 0.5,
                             "min_delta": 10.0}], epochs=4, messages=messages)
    history = trainer.fit(regression_data(n=32))
    # min_delta 10 makes every epoch after the first a non-improvement: halve after each
    assert history.series("lr") == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert sum("reduce on plateau" in m for m in messages) == 3


def test_reduce_on_plateau_floor_and_message_count_other_schedules():
    messages = []
    trainer = make_trainer([{"type": "step_decay", "step_size": 2, "gamma": 0.5},
                            {"type": "reduce_on_plateau", "monitor": "loss", "patience": 0, "factor": 0.5,
                             "min_delta": 100.0, "min_lr": 2e-4}], epochs=8, lr=1e-3, messages=messages)
    history = trainer.fit(regression_data(n=32))
    # Plateau factors 1, 1, 0.5, then 0.4 (not 0.25: with the step's 0.5 that would be 1.25e-4 < min_lr);
    # from epoch 5 the step decay alone takes the lr lower, as another schedule may.
    assert history.series("lr") == pytest.approx([1e-3, 1e-3, 2.5e-4, 2e-4, 1e-4, 1e-4, 5e-5, 5e-5])
    assert [m for m in messages if "plateau" in m] == ["reduce on plateau: lr -> 0.0005",
                                                        "reduce on plateau: lr -> 0.0002"]


def test_reduce_on_plateau_after_another_schedule_reached_zero():
    # The cosine's factor is 0 from epoch t_max on: the floor min_lr / 0 must not be taken.
    trainer = make_trainer([{"type": "cosine", "t_max": 3},
                            {"type": "reduce_on_plateau", "monitor": "loss", "patience": 0, "factor": 0.5,
                             "min_delta": 100.0}], epochs=6)
    history = trainer.fit(regression_data(n=32))
    assert history.series("lr")[3:] == [0.0, 0.0, 0.0]
    assert trainer.callbacks[1].factor == pytest.approx(0.5 ** 5)


@pytest.mark.parametrize("callback", ["early_stopping", "model_checkpoint", "reduce_on_plateau"])
@pytest.mark.parametrize("monitor", ["lr", "grad_norm/dense_1"])
def test_mode_auto_on_a_value_without_a_better_direction_is_refused(callback, monitor):
    # As Keras: it cannot know whether a larger lr or gradient norm is better.
    trainer = make_trainer([{"type": callback, "monitor": monitor}], epochs=2)
    with pytest.raises(config.ConfigError, match=re.escape(
            f"train.callbacks[0].mode: 'auto' cannot tell whether '{monitor}' should go down or up; "
            "set mode: min or mode: max")):
        trainer.fit(regression_data(n=32))
    assert len(trainer.history) == 0
    trainer = make_trainer([{"type": callback, "monitor": monitor, "mode": "min"}], epochs=2)
    assert len(trainer.fit(regression_data(n=32))) == 2


# ----------------------------------------------------------- divergence / NaN
DIVERGING = dict(epochs=8, lr=1e-3,
                 callbacks=[{"type": "exponential_decay", "gamma": 1e3}])  # lr x1000 per epoch


def diverging_trainer(extra=(), **kw):
    return make_trainer([*DIVERGING["callbacks"], *extra], epochs=DIVERGING["epochs"], lr=DIVERGING["lr"],
                        **kw)


def first_bad_batch_of_next_epoch(trainer, data, epoch: int) -> int:
    """Steps a copy of a trainer's model through the next epoch batch by batch, in the
    order its shuffle generator gives, and returns the first batch (1-based) whose loss
    is not finite: what the divergence guard must name."""
    model, gen = copy.deepcopy(trainer.model), copy.deepcopy(trainer.shuffle_gen)
    lr = DIVERGING["lr"] * DIVERGING["callbacks"][0]["gamma"] ** epoch
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.randperm(data.n, generator=gen)
    for b, start in enumerate(range(0, data.n, 16), start=1):
        idx = order[start:start + 16]
        raw = model({k: v[idx] for k, v in data.inputs.items()})
        total, _ = trainer._loss_sums(raw, {k: v[idx] for k, v in data.targets.items()})
        if not torch.isfinite(total):
            return b
        opt.zero_grad()
        (total / len(idx)).backward()
        opt.step()
    raise AssertionError("no non-finite loss in the next epoch")


def test_divergence_raises_naming_epoch_and_batch_and_keeps_good_weights():
    trainer = diverging_trainer()
    with pytest.raises(DivergenceError) as err:
        trainer.fit(regression_data())
    msg = str(err.value)
    m = re.search(r"epoch (\d+), batch (\d+)", msg)
    assert m, msg
    epoch, batch = int(m.group(1)), int(m.group(2))
    good = len(trainer.history)
    assert epoch == good + 1 and good >= 1
    assert "learning rate" in msg and "clip" in msg
    # The weights are those after the last good epoch: an identical run stopped there.
    reference = make_trainer(DIVERGING["callbacks"], epochs=good, lr=DIVERGING["lr"])
    reference.fit(regression_data())
    assert batch == first_bad_batch_of_next_epoch(reference, regression_data(), epoch=good)
    expected = reference.model.state_dict()
    for k, a in trainer.model.state_dict().items():
        assert torch.isfinite(a).all(), k
        assert torch.equal(a, expected[k]), k


def test_terminate_on_nan_stops_quietly_with_good_weights():
    messages = []
    trainer = diverging_trainer([{"type": "terminate_on_nan"}], messages=messages)
    history = trainer.fit(regression_data())
    raising = diverging_trainer()
    with pytest.raises(DivergenceError, match=r"epoch (\d+), batch (\d+)") as err:
        raising.fit(regression_data())
    assert len(history) == len(raising.history)       # stops at the same epoch, quietly
    assert re.search(r"epoch \d+, batch \d+", str(err.value)).group(0) in trainer.stop_reason
    assert "diverged" in trainer.stop_reason and any("diverged" in m for m in messages)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(v) for r in history.records for v in r.values())


def test_terminate_on_nan_in_the_first_epoch_is_an_error():
    # No epoch finished: there are no good weights to keep, and a quiet stop would leave the untrained model.
    trainer = make_trainer([{"type": "terminate_on_nan"}], epochs=3, lr=1e12)
    with pytest.raises(DivergenceError, match=r"at epoch 1, batch \d+"):
        trainer.fit(regression_data())
    assert len(trainer.history) == 0


def test_callback_state_round_trips():
    trainer = make_trainer([{"type": "early_stopping", "patience": 5, "restore_best_weights": True},
                            {"type": "reduce_on_plateau", "patience": 1}])
    script(trainer, [1.0, 0.9, 0.95, 0.97])
    states = [cb.state_dict() for cb in trainer.callbacks]
    fresh = make_trainer([{"type": "early_stopping", "patience": 5, "restore_best_weights": True},
                          {"type": "reduce_on_plateau", "patience": 1}])
    for cb, s in zip(fresh.callbacks, states, strict=True):
        cb.load_state_dict(s)
    for a, b in zip(trainer.callbacks, fresh.callbacks, strict=True):
        assert a.mon.best == b.mon.best and a.wait == b.wait
    assert fresh.callbacks[1].lr_factor(4) == trainer.callbacks[1].lr_factor(4) < 1

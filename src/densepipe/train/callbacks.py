"""Callbacks declared in YAML (Keras names and semantics).

Each callback has a pydantic model of its arguments (checked when params.yaml
is validated) and hooks the trainer calls once per epoch. Learning-rate
schedules are callbacks that contribute a multiplicative factor to the base lr,
so several compose (warm-up then cosine) and their state is a few numbers that
a resume checkpoint can carry.
"""

from __future__ import annotations

import abc
import bisect
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from densepipe.config import error_message
from densepipe.metrics import metric_mode
from densepipe.registry import Registry

CALLBACKS: Registry[tuple[type[BaseModel], type]] = Registry("callback")


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Callback:
    """Hooks; `trainer` exposes .model, .stop, .epochs, .base_lr, .scheduled_lr(epoch), .save_model(epoch),
    .log(msg)."""

    def __init__(self, args: Args):
        self.args = args

    def on_train_begin(self, trainer) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...

    def lr_factor(self, epoch: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class _Monitor:
    """Tracks the best value of a monitored log entry ('val_loss', 'val_accuracy', ...)."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0, initial: float | None = None):
        self.monitor = monitor
        # None: 'auto' on a value with no better direction (lr, a gradient norm), which the trainer
        # refuses before training, as Keras does.
        self.mode = metric_mode(monitor) if mode == "auto" else mode
        self.min_delta = abs(min_delta)
        self.best = initial if initial is not None else math.inf if self.mode == "min" else -math.inf

    def value(self, logs: dict) -> float:
        if self.monitor not in logs:
            raise KeyError(f"callback monitors '{self.monitor}', which the training logs do not have; "
                           f"available: {', '.join(sorted(logs))}")
        return logs[self.monitor]

    def improved(self, value: float, reference: float | None = None) -> bool:
        ref = self.best if reference is None else reference
        if self.mode == "min":
            return value < ref - self.min_delta
        return value > ref + self.min_delta


def register(name: str, *aliases: str):
    def deco(cls):
        CALLBACKS.add(name, (cls.Args, cls), aliases)
        return cls
    return deco


@register("early_stopping", "earlystopping")
class EarlyStopping(Callback):
    class Args(Args):
        monitor: str = "val_loss"
        min_delta: float = 0.0
        patience: int = Field(0, ge=0)
        mode: Literal["auto", "min", "max"] = "auto"
        baseline: float | None = None
        restore_best_weights: bool = False
        start_from_epoch: int = Field(0, ge=0)

    def __init__(self, args):
        super().__init__(args)
        self.mon = _Monitor(args.monitor, args.mode, args.min_delta)
        self.wait, self.best_epoch, self.stopped_epoch = 0, -1, -1
        self.best_weights = None

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch < self.args.start_from_epoch:
            return
        value = self.mon.value(logs)
        if self.best_weights is None and self.args.restore_best_weights:
            # The first monitored epoch is the first best, even when its value cannot be compared (NaN).
            self.best_weights, self.best_epoch = trainer.weights_copy(), epoch
        self.wait += 1
        if self.mon.improved(value):
            self.mon.best, self.best_epoch = value, epoch
            if self.args.restore_best_weights:
                self.best_weights = trainer.weights_copy()
            # Only a value that beats the baseline too restarts the patience count.
            if self.args.baseline is None or self.mon.improved(value, self.args.baseline):
                self.wait = 0
            return
        if self.wait >= self.args.patience and epoch > 0:
            self.stopped_epoch = epoch
            trainer.request_stop(f"early stopping: '{self.args.monitor}' did not improve for {self.wait} "
                                 f"epoch(s); best {self.mon.best:.6g} at epoch {self.best_epoch + 1}")

    def on_train_end(self, trainer):
        if self.args.restore_best_weights and self.best_weights is not None:
            trainer.load_weights(self.best_weights)
            trainer.restored_epoch = self.best_epoch
            trainer.log(f"restored the weights of epoch {self.best_epoch + 1} (best '{self.args.monitor}')")

    def state_dict(self):
        return {"wait": self.wait, "best_epoch": self.best_epoch, "best": self.mon.best,
                "best_weights": self.best_weights}

    def load_state_dict(self, state):
        self.wait, self.best_epoch, self.mon.best = state["wait"], state["best_epoch"], state["best"]
        self.best_weights = state["best_weights"]


@register("model_checkpoint", "modelcheckpoint", "checkpoint")
class ModelCheckpoint(Callback):
    """Saves the model file after an epoch: every epoch (Keras' default), or only when `monitor`
    improves on the best so far (and on initial_value_threshold, when given)."""

    class Args(Args):
        monitor: str = "val_loss"
        mode: Literal["auto", "min", "max"] = "auto"
        save_best_only: bool = False
        initial_value_threshold: float | None = None

    def __init__(self, args):
        super().__init__(args)
        self.mon = _Monitor(args.monitor, args.mode, initial=args.initial_value_threshold)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.args.save_best_only:
            value = self.mon.value(logs)
            if not self.mon.improved(value):
                return
            self.mon.best = value
        trainer.save_model(epoch)

    def state_dict(self):
        return {"best": self.mon.best}

    def load_state_dict(self, state):
        self.mon.best = state["best"]


@register("terminate_on_nan", "terminateonnan")
class TerminateOnNaN(Callback):
    """With it, a non-finite loss ends training quietly with the last good weights
    (Keras' TerminateOnNaN); without it, divergence is an error."""

    class Args(Args):
        pass


# ------------------------------------------------------------------- lr schedules
def _increasing_epochs(name: str, epochs: list[int]) -> list[int]:
    """A schedule's epochs at which something changes: from epoch 1 on, each after the last."""
    if epochs[0] < 1 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"{name} must be increasing epochs of at least 1")
    return epochs


def _cosine_factor(done: float, floor: float, height: float = 1.0) -> float:
    """A half-cosine from floor + (1 - floor) * height down to floor, `done` (0 to 1) of the way."""
    return floor + (1 - floor) * height * 0.5 * (1 + math.cos(math.pi * done))


class _Schedule(Callback, abc.ABC):
    @abc.abstractmethod
    def lr_factor(self, epoch: int) -> float:
        """The factor on the base learning rate for this epoch."""


@register("step_decay", "step_lr", "step")
class StepDecay(_Schedule):
    class Args(Args):
        step_size: int = Field(10, ge=1)   # epochs between decays
        gamma: float = Field(0.1, gt=0)    # factor per decay

    def lr_factor(self, epoch):
        return self.args.gamma ** (epoch // self.args.step_size)


@register("multistep", "multistep_lr", "multi_step")
class MultiStep(_Schedule):
    class Args(Args):
        milestones: list[int] = Field(min_length=1)  # epochs (0-based, as torch's MultiStepLR) that decay
        gamma: float = Field(0.1, gt=0)              # factor per milestone passed

        _increasing = field_validator("milestones")(lambda v: _increasing_epochs("milestones", v))

    def lr_factor(self, epoch):
        return self.args.gamma ** bisect.bisect_right(self.args.milestones, epoch)


@register("exponential_decay", "exponential", "exponential_lr")
class ExponentialDecay(_Schedule):
    class Args(Args):
        gamma: float = Field(0.95, gt=0)   # factor per epoch
        # Epochs at the base lr before the decay: 1, the first epoch only, as torch's ExponentialLR;
        # 10 is Keras' LearningRateScheduler example (ten epochs held, then lr * exp(-0.1) per epoch).
        hold_epochs: int = Field(1, ge=0)

    def lr_factor(self, epoch):
        return self.args.gamma ** max(0, epoch - self.args.hold_epochs + 1)


@register("cosine", "cosine_decay", "cosine_annealing")
class CosineDecay(_Schedule):
    class Args(Args):
        t_max: int | None = Field(None, ge=1)  # epochs of one half-cosine (default: all epochs)
        min_factor: float = Field(0.0, ge=0, le=1)  # floor, as a fraction of the base lr
        warmup_epochs: int = Field(0, ge=0)    # the cosine starts after these

    def on_train_begin(self, trainer):
        self.t_max = self.args.t_max or max(1, trainer.epochs - self.args.warmup_epochs)

    def lr_factor(self, epoch):
        t = min(max(epoch - self.args.warmup_epochs, 0), self.t_max)
        return _cosine_factor(t / self.t_max, self.args.min_factor)

    def state_dict(self):
        return {}


@register("cosine_restarts", "cosine_decay_restarts", "cosine_annealing_warm_restarts", "sgdr")
class CosineRestarts(_Schedule):
    """Keras' CosineDecayRestarts, by epoch (torch's CosineAnnealingWarmRestarts where m_mul is 1):
    half-cosines from the base lr down to min_factor of it, the i-th lasting first_epochs * t_mul^i
    epochs, its height above the floor m_mul^i times the first's."""

    class Args(Args):
        first_epochs: int = Field(10, ge=1)        # length of the first period (torch's T_0)
        t_mul: float = Field(2.0, ge=1)            # each period this many times the one before
        m_mul: float = Field(1.0, gt=0, le=1)      # each restart's peak, relative to the one before
        min_factor: float = Field(0.0, ge=0, le=1)  # floor, as a fraction of the base lr (Keras' alpha)

    def lr_factor(self, epoch):
        a = self.args
        start, length, restart = 0.0, float(a.first_epochs), 0
        while epoch >= start + length:  # find the period that holds this epoch
            start, length, restart = start + length, length * a.t_mul, restart + 1
        # Each restart's height above the floor is m_mul times the last; the floor stays (Keras').
        return _cosine_factor((epoch - start) / length, a.min_factor, a.m_mul ** restart)


@register("polynomial_decay", "polynomial", "polynomial_lr")
class PolynomialDecay(_Schedule):
    """Keras' PolynomialDecay by epoch, as a factor: (1 - end) * (1 - t / decay_epochs)^power + end;
    with end_factor 0, torch's PolynomialLR."""

    class Args(Args):
        decay_epochs: int | None = Field(None, ge=1)  # epochs to reach the end (default: all epochs)
        power: float = Field(1.0, gt=0)              # 1: linear
        end_factor: float = Field(0.0, ge=0, le=1)   # the final lr, as a fraction of the base

    def on_train_begin(self, trainer):
        self.decay_epochs = self.args.decay_epochs or trainer.epochs

    def lr_factor(self, epoch):
        end = self.args.end_factor
        return (1 - end) * (1 - min(epoch, self.decay_epochs) / self.decay_epochs) ** self.args.power + end


@register("inverse_time_decay", "inverse_time")
class InverseTimeDecay(_Schedule):
    """Keras' InverseTimeDecay by epoch: 1 / (1 + decay_rate * t / decay_epochs), t floored to whole
    periods under staircase."""

    class Args(Args):
        decay_rate: float = Field(0.5, gt=0)
        decay_epochs: int = Field(1, ge=1)
        staircase: bool = False

    def lr_factor(self, epoch):
        t = epoch / self.args.decay_epochs
        return 1 / (1 + self.args.decay_rate * (math.floor(t) if self.args.staircase else t))


@register("piecewise_constant", "piecewise_constant_decay")
class PiecewiseConstant(_Schedule):
    """Keras' PiecewiseConstantDecay by epoch: the lr is values[i] from epoch boundaries[i - 1]
    (0-based, as multistep's milestones) until the next boundary; values are learning rates."""

    class Args(Args):
        boundaries: list[int] = Field(min_length=1)   # epochs at which the next value starts
        values: list[float] = Field(min_length=2)     # one more than boundaries: the lr before, between, after

        @field_validator("values")
        @classmethod
        def _positive(cls, v):
            if any(x < 0 for x in v):
                raise ValueError("values are learning rates and cannot be negative")
            return v

        _increasing = field_validator("boundaries")(lambda v: _increasing_epochs("boundaries", v))

        @model_validator(mode="after")
        def _one_value_more(self):
            if len(self.values) != len(self.boundaries) + 1:
                raise ValueError(f"values needs one entry more than boundaries ({len(self.boundaries) + 1}), "
                                 f"got {len(self.values)}")
            return self

    def on_train_begin(self, trainer):
        self.base_lr = trainer.base_lr

    def lr_factor(self, epoch):
        value = self.args.values[bisect.bisect_right(self.args.boundaries, epoch)]
        # The schedule's values are learning rates; other schedules still multiply them.
        return value / self.base_lr if self.base_lr else 0.0


@register("warmup", "linear_warmup")
class LinearWarmup(_Schedule):
    class Args(Args):
        warmup_epochs: int = Field(5, ge=1)
        start_factor: float = Field(0.1, gt=0, le=1)

    def lr_factor(self, epoch):
        frac = min(1.0, epoch / self.args.warmup_epochs)
        return self.args.start_factor + (1 - self.args.start_factor) * frac


@register("reduce_on_plateau", "reducelronplateau", "reduce_lr_on_plateau")
class ReduceOnPlateau(_Schedule):
    class Args(Args):
        monitor: str = "val_loss"
        factor: float = Field(0.1, gt=0, lt=1)
        patience: int = Field(10, ge=0)
        mode: Literal["auto", "min", "max"] = "auto"
        min_delta: float = Field(1e-4, ge=0)
        cooldown: int = Field(0, ge=0)
        min_lr: float = Field(0.0, ge=0)

    def __init__(self, args):
        super().__init__(args)
        self.mon = _Monitor(args.monitor, args.mode, args.min_delta)
        self.wait, self.cooldown_left, self.factor = 0, 0, 1.0

    def on_epoch_end(self, trainer, epoch, logs):
        value = self.mon.value(logs)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self.mon.improved(value):
            self.mon.best, self.wait = value, 0
        elif self.cooldown_left == 0:
            self.wait += 1
            if self.wait >= self.args.patience:
                # Other schedules' factors count too: a reduction never takes the lr itself
                # below min_lr, and the message gives the lr with this epoch's other factors.
                others = trainer.scheduled_lr(epoch, leave_out=self)
                # others is 0 where another schedule has taken the lr to 0: no floor can lift it.
                floor = self.args.min_lr / others if others > 0 else 0.0
                new = max(self.factor * self.args.factor, floor)
                if new < self.factor:
                    self.factor = new
                    trainer.log(f"reduce on plateau: lr -> {others * new:.3g}")
                self.cooldown_left, self.wait = self.args.cooldown, 0

    def lr_factor(self, epoch):
        return self.factor

    def state_dict(self):
        return {"wait": self.wait, "cooldown_left": self.cooldown_left, "factor": self.factor,
                "best": self.mon.best}

    def load_state_dict(self, state):
        self.wait, self.cooldown_left = state["wait"], state["cooldown_left"]
        self.factor, self.mon.best = state["factor"], state["best"]


# ---------------------------------------------------------------------- helpers
def check_callback_args(name: str, args: dict) -> None:
    """Validates a callback's arguments; raises ValueError naming the bad one."""
    model, _ = CALLBACKS[name]
    try:
        model.model_validate(args)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                from densepipe.registry import did_you_mean
                allowed = list(model.model_fields)
                parts.append(f"unknown argument '{key}'{did_you_mean(key, allowed)}; "
                             f"allowed: {', '.join(allowed) or '(none)'}")
            elif key:
                parts.append(f"{key}: {error_message(e)} (got {e.get('input')!r})")
            else:  # a check across arguments: its message names them
                parts.append(error_message(e))
        raise ValueError(f"callback {name}: " + "; ".join(parts)) from None


def build_callbacks(configs) -> list[Callback]:
    out = []
    for cfg in configs:
        model, cls = CALLBACKS[cfg.type]
        out.append(cls(model.model_validate(cfg.model_extra or {})))
    return out

"""Optimizers by name, built from the `train.optimizer` section on our fused
optimizer-step kernels (densepipe.optim, torch.optim-compatible)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from densepipe.registry import Registry

OPTIMIZERS: Registry[Callable] = Registry("optimizer")


def _optim():
    import densepipe.optim as optim  # fused kernels
    return optim


def _eps(cfg, default: float) -> float:
    return default if cfg.eps is None else cfg.eps


def _wd(cfg, default: float = 0.0) -> float:
    return default if cfg.weight_decay is None else cfg.weight_decay


@OPTIMIZERS.register("sgd")
def sgd(params, cfg):
    return _optim().SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                        nesterov=cfg.nesterov, weight_decay=_wd(cfg))


@OPTIMIZERS.register("momentum")
def momentum(params, cfg):
    return _optim().SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.9, dampening=cfg.dampening,
                        weight_decay=_wd(cfg))


@OPTIMIZERS.register("nesterov")
def nesterov(params, cfg):
    return _optim().SGD(params, lr=cfg.lr, momentum=cfg.momentum or 0.9, nesterov=True,
                        weight_decay=_wd(cfg))


@OPTIMIZERS.register("adagrad")
def adagrad(params, cfg):
    return _optim().Adagrad(params, lr=cfg.lr, lr_decay=cfg.lr_decay, weight_decay=_wd(cfg),
                            initial_accumulator_value=cfg.initial_accumulator_value, eps=_eps(cfg, 1e-10))


@OPTIMIZERS.register("rmsprop")
def rmsprop(params, cfg):
    return _optim().RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=_eps(cfg, 1e-8), centered=cfg.centered,
                            momentum=cfg.momentum, weight_decay=_wd(cfg))


def _adam_family(cls_name: str, params, cfg, weight_decay: float = 0.0, **extra):
    """The Adam-style optimizers share lr, betas, eps (default 1e-8) and weight_decay."""
    return getattr(_optim(), cls_name)(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=_eps(cfg, 1e-8),
                                       weight_decay=_wd(cfg, weight_decay), **extra)


@OPTIMIZERS.register("adam")
def adam(params, cfg):
    return _adam_family("Adam", params, cfg, amsgrad=cfg.amsgrad)


@OPTIMIZERS.register("adamw")
def adamw(params, cfg):
    return _adam_family("AdamW", params, cfg, 1e-2, amsgrad=cfg.amsgrad)


@OPTIMIZERS.register("nadam")
def nadam(params, cfg):
    return _adam_family("NAdam", params, cfg, momentum_decay=cfg.momentum_decay)


@OPTIMIZERS.register("adamax")
def adamax(params, cfg):
    return _adam_family("Adamax", params, cfg)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](params, cfg)

"""Weight initializers by name (Keras and PyTorch vocabularies).

Every variance-based scheme is one `variance_scaling` call (as Keras defines it):
std = sqrt(scale / n) with n = fan_in, fan_out or their mean. Keras' *_normal
variants draw from a normal truncated at 2 std, rescaled so the variance still
equals the formula; the torch names (xavier_*, kaiming_*) draw from a plain normal.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from densepipe.registry import Registry, split_named

INITIALIZERS: Registry = Registry("initializer")

_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def _fans(w: Tensor) -> tuple[int, int]:
    if w.dim() == 2:
        return w.shape[1], w.shape[0]  # weight (out, in): fan_in = in, fan_out = out
    return w.numel(), w.numel()        # a bias: both fans are its length, as in Keras


@torch.no_grad()
def variance_scaling(w: Tensor, scale: float = 1.0, mode: str = "fan_in",
                     distribution: str = "truncated_normal", generator=None) -> Tensor:
    fan_in, fan_out = _fans(w)
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    var = scale / max(1.0, n)
    if distribution == "uniform":
        limit = math.sqrt(3.0 * var)
        return w.uniform_(-limit, limit, generator=generator)
    if distribution == "untruncated_normal":
        return w.normal_(0.0, math.sqrt(var), generator=generator)
    # "normal" is Keras' older name of the truncated normal, and means it there too.
    std = math.sqrt(var) / _TRUNC_STD
    return nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=generator)


def _register_scaling(name: str, aliases: tuple[str, ...], **kw) -> None:
    INITIALIZERS.add(name, partial(variance_scaling, **kw), aliases)


# Keras names (truncated normals) ...
_register_scaling("glorot_uniform", (), scale=1.0, mode="fan_avg", distribution="uniform")
_register_scaling("glorot_normal", (), scale=1.0, mode="fan_avg", distribution="truncated_normal")
_register_scaling("he_uniform", (), scale=2.0, mode="fan_in", distribution="uniform")
_register_scaling("he_normal", (), scale=2.0, mode="fan_in", distribution="truncated_normal")
_register_scaling("lecun_uniform", (), scale=1.0, mode="fan_in", distribution="uniform")
_register_scaling("lecun_normal", (), scale=1.0, mode="fan_in", distribution="truncated_normal")
# ... and torch names (plain normals), same variances.
_register_scaling("xavier_uniform", (), scale=1.0, mode="fan_avg", distribution="uniform")
_register_scaling("xavier_normal", (), scale=1.0, mode="fan_avg", distribution="untruncated_normal")
_register_scaling("kaiming_uniform", (), scale=2.0, mode="fan_in", distribution="uniform")
_register_scaling("kaiming_normal", (), scale=2.0, mode="fan_in", distribution="untruncated_normal")
INITIALIZERS.add("variance_scaling", variance_scaling)


@INITIALIZERS.register("zeros", "zero")
@torch.no_grad()
def zeros(w: Tensor, generator=None) -> Tensor:
    return w.zero_()


@INITIALIZERS.register("ones", "one")
@torch.no_grad()
def ones(w: Tensor, generator=None) -> Tensor:
    return w.fill_(1.0)


@INITIALIZERS.register("constant")
@torch.no_grad()
def constant(w: Tensor, value: float = 0.0, generator=None) -> Tensor:
    return w.fill_(value)


@INITIALIZERS.register("random_normal", "normal")
@torch.no_grad()
def random_normal(w: Tensor, mean: float = 0.0, stddev: float = 0.05, generator=None) -> Tensor:
    return w.normal_(mean, stddev, generator=generator)  # Keras' default stddev


@INITIALIZERS.register("random_uniform", "uniform")
@torch.no_grad()
def random_uniform(w: Tensor, minval: float = -0.05, maxval: float = 0.05, generator=None) -> Tensor:
    return w.uniform_(minval, maxval, generator=generator)


@INITIALIZERS.register("truncated_normal")
@torch.no_grad()
def truncated_normal(w: Tensor, mean: float = 0.0, stddev: float = 0.05, generator=None) -> Tensor:
    return nn.init.trunc_normal_(w, mean, stddev, mean - 2 * stddev, mean + 2 * stddev, generator=generator)


@INITIALIZERS.register("orthogonal")
@torch.no_grad()
def orthogonal(w: Tensor, gain: float = 1.0, generator=None) -> Tensor:
    return nn.init.orthogonal_(w, gain=gain, generator=generator)


@INITIALIZERS.register("sparse")
@torch.no_grad()
def sparse(w: Tensor, sparsity: float = 0.1, stddev: float = 0.01, generator=None) -> Tensor:
    # As torch.nn.init.sparse_ (per column, a `sparsity` fraction of rows is zero, the rest
    # N(0, std)), but every draw comes from `generator`: torch's picks the rows unseeded.
    if w.dim() != 2:
        raise ValueError(f"initializer sparse needs a 2-D weight, got shape {tuple(w.shape)}")
    w.normal_(0.0, stddev, generator=generator)
    n_zero = math.ceil(sparsity * w.shape[0])
    rows = torch.rand(w.shape, generator=generator, device=w.device).argsort(dim=0)[:n_zero]  # (n_zero, cols)
    return w.scatter_(0, rows, 0.0)


def initialize(w: Tensor, spec: str | dict | None, generator=None) -> Tensor:
    """Applies an initializer given as a name or {name: ..., **kwargs}."""
    if spec is None:
        return w
    name, kwargs = split_named(spec)
    return INITIALIZERS[name](w, generator=generator, **kwargs)

"""Weight constraints by name (Keras' vocabulary): a dense layer's kernel or bias is projected
back onto the allowed set after every optimizer step, as Keras applies a constraint after
each update (not at initialization).

`axis` follows Keras, whose kernel is (in, out): axis 0 takes the norm of each unit's incoming
weights (the usual max-norm of dropout training), axis 1 that of each input's outgoing ones.
Our kernels are stored (out, in), so Keras' axis a is our dimension rank - 1 - a; a bias has
only axis 0, its whole length.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from densepipe.registry import Registry, split_named

CONSTRAINTS: Registry[Callable[..., None]] = Registry("constraint")

_EPS = 1e-7  # Keras' epsilon: a zero vector stays zero instead of dividing by zero


def _norms(w: Tensor, axis: int) -> Tensor:
    if axis not in range(w.dim()):
        raise ValueError(f"axis must be 0 or 1 for a kernel and 0 for a bias, got {axis}")
    return torch.linalg.vector_norm(w, dim=w.dim() - 1 - axis, keepdim=True)


@CONSTRAINTS.register("max_norm", "maxnorm")
def max_norm(w: Tensor, max_value: float = 2.0, axis: int = 0) -> None:
    norms = _norms(w, axis)
    w.mul_(norms.clamp(0.0, max_value) / (norms + _EPS))


@CONSTRAINTS.register("min_max_norm", "minmaxnorm")
def min_max_norm(w: Tensor, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0,
                 axis: int = 0) -> None:
    if min_value > max_value:
        raise ValueError(f"min_value must not exceed max_value, got {min_value} > {max_value}")
    norms = _norms(w, axis)
    # rate < 1 moves the norms only part of the way into [min_value, max_value] each step.
    wanted = rate * norms.clamp(min_value, max_value) + (1.0 - rate) * norms
    w.mul_(wanted / (norms + _EPS))


@CONSTRAINTS.register("unit_norm", "unitnorm")
def unit_norm(w: Tensor, axis: int = 0) -> None:
    w.div_(_norms(w, axis) + _EPS)


@CONSTRAINTS.register("non_neg", "nonneg", "non_negative")
def non_neg(w: Tensor) -> None:
    w.clamp_(min=0.0)


def constraint(spec: str | dict) -> Callable[[Tensor], None]:
    """A name or {name: ..., **arguments} as a function that constrains a tensor in place."""
    name, args = split_named(spec)
    return partial(CONSTRAINTS[name], **args)

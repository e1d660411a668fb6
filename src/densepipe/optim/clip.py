"""Gradient clipping with fused passes, as torch.nn.utils.clip_grad_norm_ / clip_grad_value_.

By norm: one pass computes the total norm of all gradients (per device and dtype),
one pass scales them by min(max_norm / (total_norm + 1e-6), 1); the scale is read
where the gradients live, so no host round trip is needed unless
error_if_nonfinite asks for one.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from densepipe.optim._ops import ops

TensorOrTensors = Tensor | Iterable[Tensor]


def _grads(parameters: TensorOrTensors) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise RuntimeError("densepipe gradient clipping does not support sparse gradients")
    return grads


def _by_device_and_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    if not tensors:
        return []
    groups = _group_tensors_by_device_and_dtype([tensors])
    return [ts for (ts,), _ in groups.values()]


@torch.no_grad()
def get_total_norm(tensors: TensorOrTensors, norm_type: float | str = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """The norm of all tensors viewed as one vector (torch.nn.utils.get_total_norm);
    norm_type: a positive number, inf or -inf. foreach is accepted and ignored."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    norms = [ops.grad_norm(group, norm_type) for group in _by_device_and_dtype(tensors)]
    if len(norms) == 1:
        total = norms[0]
    else:  # several devices or dtypes: the norm of the per-group norms, as torch
        total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")
    return total


@torch.no_grad()
def clip_grads_with_norm_(parameters: TensorOrTensors, max_norm: float, total_norm: Tensor,
                          foreach: bool | None = None) -> None:
    """Scales gradients by min(max_norm / (total_norm + 1e-6), 1), in place."""
    _scale(_grads(parameters), max_norm, total_norm)


def _scale(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    for group in _by_device_and_dtype(grads):
        ops.clip_grads_with_norm_(group, total_norm.to(group[0].device), float(max_norm))


@torch.no_grad()
def clip_grad_norm_(parameters: TensorOrTensors, max_norm: float, norm_type: float | str = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """torch.nn.utils.clip_grad_norm_: clips the gradients' total norm to max_norm in
    place and returns the total norm before clipping."""
    grads = _grads(parameters)
    total = get_total_norm(grads, norm_type, error_if_nonfinite)
    _scale(grads, max_norm, total)
    return total


@torch.no_grad()
def clip_grad_value_(parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamps every gradient to [-clip_value, clip_value];
    foreach is accepted and ignored."""
    for group in _by_device_and_dtype(_grads(parameters)):
        ops.clip_grads_by_value_(group, float(clip_value))

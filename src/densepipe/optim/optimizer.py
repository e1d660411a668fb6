"""The base of the fused optimizers.

A FusedOptimizer is a torch.optim.Optimizer (param groups, state, state_dict,
hooks, LR schedulers all unchanged) whose step() gathers each group's parameters
that have a gradient and hands them to the subclass's `_step` hook, which makes
one fused kernel call for all of them. Parameters are bucketed only where one
call cannot serve them: different devices or dtypes, or different step counts
(a parameter that joined the group later, or state loaded from elsewhere).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from densepipe.optim._ops import ops


def _nonneg(v: Any) -> bool:
    return 0.0 <= v


def _unit_interval(v: Any) -> bool:
    return 0.0 <= v < 1.0


# Hyperparameter -> (torch's wording in "Invalid <wording>: <value>", allowed values).
CONSTRAINTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "lr": ("learning rate", _nonneg),
    "eps": ("epsilon value", _nonneg),
    "momentum": ("momentum value", _nonneg),
    "weight_decay": ("weight_decay value", _nonneg),
    "lr_decay": ("lr_decay value", _nonneg),
    "initial_accumulator_value": ("initial_accumulator_value value", _nonneg),
    "alpha": ("alpha value", _nonneg),
}


def validate_group(group: dict[str, Any]) -> None:
    """Raises ValueError with torch.optim's message for an out-of-range hyperparameter."""
    for key, (wording, ok) in CONSTRAINTS.items():
        if key in group and not ok(group[key]):
            raise ValueError(f"Invalid {wording}: {group[key]}")
    for i, beta in enumerate(group.get("betas", ())):
        if not _unit_interval(beta):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def new_step() -> Tensor:
    """A fresh step counter in torch.optim's (non-capturable) layout: a CPU scalar."""
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


REDUCED = (torch.float16, torch.bfloat16)  # parameter dtypes whose state is kept in float32


def state_like(p: Tensor, fill: float = 0.0) -> Tensor:
    """A state tensor for p: p's layout and dtype, but float32 for half/bfloat16 params
    (the kernels keep optimizer state in fp32 for reduced-precision parameters)."""
    dtype = torch.float32 if p.dtype in REDUCED else p.dtype
    return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)


def advance_steps(steps: list[Tensor]) -> list[float]:
    """Adds one to every step counter; returns the new counts as host floats."""
    return ops.advance_steps_(steps).tolist()


class FusedOptimizer(torch.optim.Optimizer, abc.ABC):
    """Subclasses define `_init_state(group, p)` (a fresh state dict with a "step"
    counter) and `_step(group, params, grads, states, step)`: one kernel call for a
    bucket whose parameters share device, dtype and step count."""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        name = type(self).__name__
        if defaults.get("differentiable"):
            raise RuntimeError(f"densepipe.optim.{name} does not support differentiable=True: its fused "
                               f"kernel updates parameters outside autograd; use torch.optim.{name}")
        if defaults.get("capturable"):
            raise RuntimeError(f"densepipe.optim.{name} does not support capturable=True: its fused "
                               "kernel takes the step count from the host")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict; afterwards, state of 16-bit parameters is
        taken again from the saved tensors as float32 (torch casts state to the
        parameter's dtype, which would round away the fp32 state the kernels keep)."""
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for index, p in zip(saved_ids, params, strict=True):
            if p.dtype in REDUCED and index in state_dict["state"]:
                for key, value in state_dict["state"][index].items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad; set_to_none, the default, is a plain loop here (called
        every training step, where torch's version adds a profiler range and dispatch checks)."""
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        """A fresh state dict for p, with its "step" counter."""

    @abc.abstractmethod
    def _step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
              states: list[dict[str, Tensor]], step: Hashable) -> None:
        """One fused kernel call updating params (one device, dtype and step count)."""

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list[dict], list[Hashable]]:
        """Creates missing state and advances step counters. Returns each parameter's
        state and bucket key (its step count: parameters with equal keys share a call)."""
        states = [self.state[p] for p in params]
        for p, s in zip(params, states, strict=True):
            if not s:
                s.update(self._init_state(group, p))
        return states, advance_steps([s["step"] for s in states])

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; closure re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _with_grads(group["params"])  # the kernels refuse sparse grads by name
            if not params:
                continue
            states, keys = self._prepare(group, params)
            for key, idx in _buckets(params, keys):
                if idx is None:
                    self._step(group, params, grads, states, key)
                else:
                    self._step(group, [params[i] for i in idx], [grads[i] for i in idx],
                               [states[i] for i in idx], key)
        return loss


def _with_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters that have a gradient, and their gradients (each .grad read once)."""
    grads = [p.grad for p in params]
    kept = [p for p, g in zip(params, grads, strict=True) if g is not None]
    return kept, grads if len(kept) == len(grads) else [g for g in grads if g is not None]


def _buckets(params: list[Tensor], keys: list[Hashable]):
    """Yields (key, indices) per bucket of one device, dtype and key; indices is None
    when the bucket is every parameter (the usual case: no copying)."""
    if keys.count(keys[0]) == len(keys):
        by_key: dict[Hashable, list[int] | None] = {keys[0]: None}
    else:
        by_key = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
    for key, idx in by_key.items():
        members = params if idx is None else [params[i] for i in idx]
        groups = _group_tensors_by_device_and_dtype([members], with_indices=True)
        if len(groups) == 1:
            yield key, idx
            continue
        for _, (_, sub) in groups.items():
            yield key, sub if idx is None else [idx[j] for j in sub]

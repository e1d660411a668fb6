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
import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype, _global_optimizer_post_hooks, _global_optimizer_pre_hooks

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
    "momentum_decay": ("momentum_decay value", _nonneg),
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


def _observed_only_when_watched(step: Callable) -> Callable:
    """torch.optim wraps every step() in profile_hook_step: a profiler range around the step
    hooks and the step. Opening that range costs about as much as a small model's whole update
    even when no profiler runs, so here torch's wrapper is used only while something watches (a
    profiler, or a registered step hook): then hooks and profiling behave exactly as torch's."""
    watched = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if (torch.autograd._profiler_enabled() or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _global_optimizer_pre_hooks
                or _global_optimizer_post_hooks):
            return watched(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # torch.optim's own mark: do not wrap this step() again
    return wrapper


# torch.optim's add_param_group without its torch.compile guard: the guard imports torch._dynamo
# on first use, about a second of start-up for every process that builds an optimizer (each
# pipeline stage validates the optimizer settings by building one), and nothing here compiles it.
_add_param_group = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__",
                           torch.optim.Optimizer.add_param_group)


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
        _add_param_group(self, param_group)
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
    @_observed_only_when_watched
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; closure re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Grad mode off by hand rather than by a no_grad() wrapper: this runs every training step,
        # where the context manager's Python costs as much as a small model's update itself.
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for group in self.param_groups:
                self._step_group(group)
        finally:
            torch._C._set_grad_enabled(enabled)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads = _with_grads(group["params"])  # the kernels refuse sparse grads by name
        if not params:
            return
        states, keys = self._prepare(group, params)
        if keys.count(keys[0]) == len(keys) and len(_by_device_and_dtype(params)) == 1:
            self._step(group, params, grads, states, keys[0])  # the usual case: one call for the group
            return
        for key, idx in _buckets(params, keys):
            self._step(group, [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], key)


def _by_device_and_dtype(params: list[Tensor]) -> dict:
    """(device, dtype) -> ([params], indices), from torch's C++ grouping (no Python wrapper per step)."""
    return torch._C._group_tensors_by_device_and_dtype([params], True)


def _with_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters that have a gradient, and their gradients (each .grad read once)."""
    grads = [p.grad for p in params]
    kept = [p for p, g in zip(params, grads, strict=True) if g is not None]
    return kept, grads if len(kept) == len(grads) else [g for g in grads if g is not None]


def _buckets(params: list[Tensor], keys: list[Hashable]):
    """Yields (key, indices) per bucket of one device, dtype and key."""
    by_key: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    for key, idx in by_key.items():
        for _, (_, sub) in _by_device_and_dtype([params[i] for i in idx]).items():
            yield key, [idx[j] for j in sub]

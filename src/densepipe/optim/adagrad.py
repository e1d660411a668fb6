"""Adagrad with lr decay, initial accumulator, weight decay and maximize (torch.optim.Adagrad)."""

from __future__ import annotations

import torch

from densepipe.optim._ops import ops
from densepipe.optim.optimizer import FusedOptimizer, new_step, state_like


class Adagrad(FusedOptimizer):
    """torch.optim.Adagrad's arguments and state ("step", "sum"); state is created for
    every parameter up front, as torch does, so state_dicts line up."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(
            lr=lr,                                                # base step size
            lr_decay=lr_decay,                                    # lr / (1 + (step - 1) * lr_decay)
            eps=eps,                                              # added to sqrt(sum)
            weight_decay=weight_decay,                            # L2 penalty added to the gradient
            initial_accumulator_value=initial_accumulator_value,  # starting value of "sum"
            foreach=foreach, maximize=maximize, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(self._init_state(group, p))

    def _init_state(self, group, p):
        return {"step": new_step(), "sum": state_like(p, group["initial_accumulator_value"])}

    def _step(self, group, params, grads, states, step):
        ops.adagrad_step_(params, grads, [s["sum"] for s in states], float(group["lr"]),
                          float(group["lr_decay"]), float(group["weight_decay"]), float(group["eps"]),
                          group["maximize"], step)

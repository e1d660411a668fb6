"""RMSprop with centering, momentum, weight decay and maximize (torch.optim.RMSprop;
torch has no fused RMSprop, this is one)."""

from __future__ import annotations

import torch

from densepipe.optim._ops import ops
from densepipe.optim.optimizer import FusedOptimizer, new_step, state_like


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop's arguments and state ("step", "square_avg", and
    "momentum_buffer" / "grad_avg" when momentum > 0 / centered)."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(
            lr=lr,                      # step size
            momentum=momentum,          # buffer decay; 0 = no buffer
            alpha=alpha,                # smoothing of the squared-gradient average
            eps=eps,                    # added to the root mean square
            centered=centered,          # divide by the gradient's variance, not its second moment
            weight_decay=weight_decay,  # L2 penalty added to the gradient
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _init_state(self, group, p):
        state = {"step": new_step(), "square_avg": state_like(p)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = state_like(p)
        if group["centered"]:
            state["grad_avg"] = state_like(p)
        return state

    def _step(self, group, params, grads, states, step):
        bufs = [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else []
        grad_avgs = [s["grad_avg"] for s in states] if group["centered"] else []
        ops.rmsprop_step_(params, grads, [s["square_avg"] for s in states], bufs, grad_avgs,
                          float(group["lr"]), float(group["alpha"]), float(group["eps"]),
                          float(group["weight_decay"]), float(group["momentum"]), group["centered"],
                          group["maximize"])

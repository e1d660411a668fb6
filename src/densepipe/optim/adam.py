"""Adam (with AMSGrad) and AdamW (decoupled weight decay), as torch.optim.Adam / AdamW."""

from __future__ import annotations

import torch

from densepipe.optim._ops import ops
from densepipe.optim.optimizer import FusedOptimizer, new_step, state_like


class Adam(FusedOptimizer):
    """torch.optim.Adam's arguments and state ("step", "exp_avg", "exp_avg_sq", and
    "max_exp_avg_sq" under amsgrad); bias corrections in double from the step count."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        defaults = dict(
            lr=lr,                                          # step size
            betas=tuple(float(b) for b in betas),           # decay of the 1st and 2nd moment averages
            eps=eps,                                        # added to the root of the 2nd moment
            weight_decay=weight_decay,                      # L2 penalty (Adam) or decay rate (AdamW)
            amsgrad=amsgrad,                                # divide by the running max of the 2nd moment
            maximize=maximize,                              # ascend instead of descend
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,  # AdamW: decay the weights, not the gradient
        )
        super().__init__(params, defaults)

    def _init_state(self, group, p):
        state = {"step": new_step(), "exp_avg": state_like(p), "exp_avg_sq": state_like(p)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = state_like(p)
        return state

    def _step(self, group, params, grads, states, step):
        beta1, beta2 = group["betas"]
        maxes = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else []
        ops.adam_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                       maxes, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                       float(group["weight_decay"]), group["amsgrad"], group["decoupled_weight_decay"],
                       group["maximize"], step)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch: loaded AdamW state stays decoupled
            group["decoupled_weight_decay"] = True

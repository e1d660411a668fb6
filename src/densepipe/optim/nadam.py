"""NAdam (Adam with Nesterov momentum) and Adamax (Adam on the infinity norm), as
torch.optim.NAdam / Adamax."""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from densepipe.optim._ops import ops
from densepipe.optim.optimizer import FusedOptimizer, new_step, state_like


def _defaults(lr, betas, eps, weight_decay, **rest) -> dict:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    return dict(
        lr=lr,                                 # step size
        betas=tuple(float(b) for b in betas),  # decay of the first moment and of the second / the norm
        eps=eps,                               # added to the denominator
        weight_decay=weight_decay,             # L2 penalty (or decay rate, NAdam's decoupled form)
        **rest,
    )


class NAdam(FusedOptimizer):
    """torch.optim.NAdam's arguments and state ("step", "mu_product", "exp_avg", "exp_avg_sq")."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False) -> None:
        super().__init__(params, _defaults(
            lr, betas, eps, weight_decay,
            momentum_decay=momentum_decay,                  # how fast mu_t rises towards beta1
            decoupled_weight_decay=decoupled_weight_decay,  # decay the weights, not the gradient
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable))

    def _init_state(self, group, p):
        # mu_product as torch keeps it: a float32 CPU scalar, so a state_dict moves either way.
        return {"step": new_step(), "mu_product": torch.tensor(1.0, dtype=_get_scalar_dtype()),
                "exp_avg": state_like(p), "exp_avg_sq": state_like(p)}

    def _prepare(self, group, params):
        """Also multiplies each parameter's mu_product by this step's mu_t, in its own float32
        as torch does; the bucket key carries the product, which the kernel's step sizes read."""
        states, steps = super()._prepare(group, params)
        beta1, decay = group["betas"][0], group["momentum_decay"]
        keys = [None] * len(states)
        for step in dict.fromkeys(steps):  # one call per distinct step count (usually one)
            idx = [i for i, s in enumerate(steps) if s == step]
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * decay))
            for i, product in zip(idx, ops.mul_scalars_([states[i]["mu_product"] for i in idx], mu).tolist(),
                                  strict=True):
                keys[i] = (step, product)
        return states, keys

    def _step(self, group, params, grads, states, key):
        step, mu_product = key
        beta1, beta2 = group["betas"]
        ops.nadam_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                        float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                        float(group["weight_decay"]), float(group["momentum_decay"]),
                        group["decoupled_weight_decay"], group["maximize"], step, mu_product)


class Adamax(FusedOptimizer):
    """torch.optim.Adamax's arguments and state ("step", "exp_avg", "exp_inf")."""

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False) -> None:
        super().__init__(params, _defaults(lr, betas, eps, weight_decay, foreach=foreach, maximize=maximize,
                                           differentiable=differentiable, capturable=capturable))

    def _init_state(self, group, p):
        return {"step": new_step(), "exp_avg": state_like(p), "exp_inf": state_like(p)}

    def _step(self, group, params, grads, states, step):
        beta1, beta2 = group["betas"]
        ops.adamax_step_(params, grads, [s["exp_avg"] for s in states], [s["exp_inf"] for s in states],
                         float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                         float(group["weight_decay"]), group["maximize"], step)

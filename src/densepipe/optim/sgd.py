"""SGD with momentum, dampening, Nesterov, weight decay and maximize (torch.optim.SGD)."""

from __future__ import annotations

import torch

from densepipe.optim._ops import ops
from densepipe.optim.optimizer import FusedOptimizer, state_like


class SGD(FusedOptimizer):
    """torch.optim.SGD's arguments and state ("momentum_buffer", made on the first step
    with momentum, as the gradient itself); one fused kernel call per group."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,                      # step size
            momentum=momentum,          # buffer decay; 0 = plain SGD
            dampening=dampening,        # buffer takes (1 - dampening) of each gradient
            weight_decay=weight_decay,  # L2 penalty added to the gradient
            nesterov=nesterov,          # look-ahead gradient + momentum * buffer
            maximize=maximize,          # ascend instead of descend
            foreach=foreach, differentiable=differentiable, fused=fused,  # torch's; always fused here
        )
        super().__init__(params, defaults)

    def _init_state(self, group, p):
        # Filled by the kernel with the first gradient (torch's first-step rule); float32
        # under half/bfloat16 params, as every other optimizer's state.
        return {"momentum_buffer": state_like(p)}

    def _prepare(self, group, params):
        # No step counter (as torch): the bucket key is whether the buffer is new.
        if group["momentum"] == 0:
            return [{}] * len(params), [False] * len(params)
        states = [self.state[p] for p in params]
        first = ["momentum_buffer" not in s for s in states]
        for p, s, new in zip(params, states, first, strict=True):
            if new:
                s.update(self._init_state(group, p))
        return states, first

    def _step(self, group, params, grads, states, first_step):
        bufs = [s["momentum_buffer"] for s in states] if group["momentum"] != 0 else []
        ops.sgd_step_(params, grads, bufs, float(group["lr"]), float(group["momentum"]),
                      float(group["dampening"]), float(group["weight_decay"]), group["nesterov"],
                      group["maximize"], first_step)

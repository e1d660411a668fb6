"""FusedDense: a drop-in for nn.Linear + activation, running the fused kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from densepipe import ops
from densepipe.nn.activations import alpha_for, resolve


class FusedDense(nn.Module):
    """y = act(x @ W^T + b). `weight` (out, in) and `bias` (out,) have nn.Linear's layout
    and names, so a state_dict moves between the two unchanged."""

    runs_fused_kernel = True  # the plain-torch twin (kernels: reference) says False

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str | None = "linear", alpha: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.act = resolve(activation)
        self.alpha = alpha_for(self.act, alpha)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # (out, in)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None  # (out,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, so an untouched FusedDense starts where nn.Linear would.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.act.fused:
            return ops.dense(x, self.weight, self.bias, self.act.name, self.alpha)
        return self.act.reference(ops.dense(x, self.weight, self.bias), self.alpha)

    @property
    def chains(self) -> bool:
        """Whether this kind of layer can run inside one dense_chain op with its neighbours:
        the fused kernel with an activation it computes itself."""
        return self.runs_fused_kernel and self.act.fused

    def chainable(self) -> bool:
        """Whether run_chain may run it now: it chains, and nothing expects its own call."""
        return self.chains and not expects_own_call(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.act.name}")


def expects_own_call(module: nn.Module) -> bool:
    """Whether something expects the module to be called as itself, so running its kernels
    directly would skip it: its forward or backward hooks, global module hooks, a compiled call
    of its own."""
    compiled = getattr(module, "_compiled_call_impl", None) is not None  # Module.compile(), torch >= 2.2
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or compiled or _global_module_hooks())


def _global_module_hooks() -> bool:
    # torch.nn.modules.register_module_*_hook: they fire on every module call, so a chained
    # layer would skip them.
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def run_chain(layers: list[FusedDense], x: Tensor) -> Tensor:
    """Chainable layers applied in turn as one dense_chain op (one autograd node): the
    result of calling them one by one, at a fraction of the per-layer overhead."""
    return ops.dense_chain(x, [m.weight for m in layers], [m.bias for m in layers],
                           [m.act.name for m in layers], [m.alpha for m in layers])

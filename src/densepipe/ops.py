"""Python side of the custom ops: loads the extension, registers fake kernels
(for torch.compile / meta tensors) and autograd, and offers typed wrappers."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from densepipe import _C  # noqa: F401  (loads the library: runs TORCH_LIBRARY registrations)
from densepipe.nn.activations import ACTIVATIONS

_ops = torch.ops.densepipe


@functools.cache
def _needs_preact(activation: str) -> bool:
    # Cached: asked twice per layer per training step, with a handful of distinct names.
    spec = ACTIVATIONS.get(activation)
    return spec is not None and spec.needs_preact


# ---------------------------------------------------------------- dense + activation
@torch.library.register_fake("densepipe::dense_forward")
def _dense_forward_fake(x, weight, bias, activation, alpha):
    torch._check(weight.dim() == 2, lambda: "densepipe dense: weight must be 2-D")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "densepipe dense: in_features mismatch")
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    preact = torch.empty_like(y) if _needs_preact(activation) else x.new_empty(0)
    return y, preact


@torch.library.register_fake("densepipe::dense_backward")
def _dense_backward_fake(grad_y, x, weight, saved, activation, alpha, output_mask):
    # Contiguous like the kernels' GEMM outputs (empty_like would copy a strided x's layout).
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
    dw = x.new_empty(weight.shape) if output_mask[1] else x.new_empty(0)
    db = x.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
    return dx, dw, db


def _dense_setup_context(ctx, inputs, output):
    x, weight, bias, activation, alpha = inputs
    y, preact = output
    # Keep only what act'(.) needs: z for gelu/silu, otherwise y itself.
    ctx.save_for_backward(x, weight, preact if _needs_preact(activation) else y)
    ctx.activation, ctx.alpha, ctx.has_bias = activation, alpha, bias is not None
    ctx.mark_non_differentiable(preact)
    # preact never gets a gradient; without this autograd would hand backward a
    # zero-filled (M, N) tensor for it on every call.
    ctx.set_materialize_grads(False)


def _dense_backward(ctx, grad_y, _grad_preact):
    x, weight, saved = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, None
    dx, dw, db = _ops.dense_backward(
        grad_y, x, weight, saved, ctx.activation, ctx.alpha, [need_x, need_w, need_b and ctx.has_bias]
    )
    return (dx if need_x else None, dw if need_w else None,
            db if need_b and ctx.has_bias else None, None, None)


torch.library.register_autograd(
    "densepipe::dense_forward", _dense_backward, setup_context=_dense_setup_context
)


def _dense_double_backward(ctx, *grads):
    # The backward kernel has no derivative of its own: say so, instead of letting
    # autograd treat it as a constant and return silently wrong second derivatives.
    raise NotImplementedError("densepipe dense: double backward (create_graph=True through the fused "
                              "layer, e.g. for a gradient penalty) is not supported")


torch.library.register_autograd(
    "densepipe::dense_backward", _dense_double_backward, setup_context=lambda ctx, inputs, output: None
)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None,
          activation: str = "linear", alpha: float = 0.0) -> Tensor:
    """y = act(x @ weight^T + bias) as one fused op; weight is (out, in) like nn.Linear."""
    y, _ = _ops.dense_forward(x, weight, bias, activation, float(alpha))
    return y

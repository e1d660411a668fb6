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


class DoubleBackwardError(RuntimeError):
    """A second derivative was asked of the fused dense layers, which define only the first
    (a RuntimeError, as torch's own once-differentiable functions raise)."""


def _dense_double_backward(ctx, *grads):
    # The backward kernel has no derivative of its own: say so, instead of letting
    # autograd treat it as a constant and return silently wrong second derivatives.
    raise DoubleBackwardError("densepipe dense: double backward (create_graph=True through the fused "
                              "layer, e.g. for a gradient penalty) is not supported")


torch.library.register_autograd(
    "densepipe::dense_backward", _dense_double_backward, setup_context=lambda ctx, inputs, output: None
)


# ------------------------------------------------------------------ chain of dense layers
def _chain_shapes(x, weights) -> list[tuple[int, ...]]:
    return [(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.register_fake("densepipe::dense_chain_forward")
def _dense_chain_forward_fake(x, weights, biases, activations, alphas):
    torch._check(len(weights) > 0, lambda: "densepipe dense_chain_forward: weights is empty")
    shapes = _chain_shapes(x, weights)
    hidden = [x.new_empty(s) for s in shapes[:-1]]
    preacts = [x.new_empty(s) if _needs_preact(a) else x.new_empty(0) for s, a in zip(shapes, activations, strict=True)]
    return x.new_empty(shapes[-1]), hidden, preacts


@torch.library.register_fake("densepipe::dense_chain_backward")
def _dense_chain_backward_fake(grad_y, x, hidden, y, weights, preacts, activations, alphas, need_dweight,
                               need_dbias, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dws = [x.new_empty(w.shape) if need else x.new_empty(0) for w, need in zip(weights, need_dweight, strict=True)]
    dbs = [x.new_empty(w.shape[0]) if need else x.new_empty(0) for w, need in zip(weights, need_dbias, strict=True)]
    return dx, dws, dbs


def _chain_save(ctx, x, weights, activations, alphas, output) -> None:
    y, hidden, preacts = output
    ctx.save_for_backward(x, y, *hidden, *weights, *preacts)
    ctx.n, ctx.activations, ctx.alphas = len(weights), list(activations), list(alphas)


def _chain_grads(ctx, grad_y, need_x: bool, need_w, need_b):
    """(dx, [dweight], [dbias]) of a chain, None where not needed."""
    n = ctx.n
    if grad_y is None:  # y did not reach the loss
        return None, [None] * n, [None] * n
    saved = ctx.saved_tensors
    x, y, hidden = saved[0], saved[1], list(saved[2:n + 1])
    weights, preacts = list(saved[n + 1:2 * n + 1]), list(saved[2 * n + 1:])
    # An empty bias standing for none does not require grad, so need_b is False there.
    need_w, need_b = list(need_w), list(need_b)
    args = (grad_y, x, hidden, y, weights, preacts, ctx.activations, ctx.alphas, need_w, need_b, need_x)
    if torch.is_grad_enabled():  # create_graph=True: through the op, whose double backward refuses
        dx, dws, dbs = _ops.dense_chain_backward(*args)
    else:
        with torch._C._AutoDispatchBelowAutograd():  # straight to the kernel: no autograd glue per step
            dx, dws, dbs = _ops.dense_chain_backward(*args)
    return (dx if need_x else None, [g if w else None for g, w in zip(dws, need_w, strict=True)],
            [g if b else None for g, b in zip(dbs, need_b, strict=True)])


def _dense_chain_setup_context(ctx, inputs, output):
    x, weights, _, activations, alphas = inputs
    _chain_save(ctx, x, weights, activations, alphas, output)
    _, hidden, preacts = output
    ctx.mark_non_differentiable(*hidden, *preacts)
    ctx.set_materialize_grads(False)  # only y's gradient is ever used


def _dense_chain_backward(ctx, grad_y, _grad_hidden, _grad_preacts):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (*_chain_grads(ctx, grad_y, need_x, need_w, need_b), None, None)


# For the op called directly (torch.ops.densepipe.dense_chain_forward): correct, but its list
# arguments cost a pytree round trip per call; dense_chain() below takes the short way.
torch.library.register_autograd(
    "densepipe::dense_chain_forward", _dense_chain_backward, setup_context=_dense_chain_setup_context
)
torch.library.register_autograd(
    "densepipe::dense_chain_backward", _dense_double_backward, setup_context=lambda ctx, inputs, output: None
)


class _DenseChain(torch.autograd.Function):
    """dense_chain_forward with its tensors as flat arguments (x, *weights, *biases) and y as
    its only output (the hidden outputs and pre-activations are saved, never returned): one
    autograd node per chain without the list packing of the generic registration."""

    @staticmethod
    def forward(ctx, x, activations, alphas, *params):
        n = len(activations)
        weights, biases = list(params[:n]), list(params[n:])
        with torch._C._AutoDispatchBelowAutograd():
            out = _ops.dense_chain_forward(x, weights, biases, activations, alphas)
        _chain_save(ctx, x, weights, activations, alphas, out)
        return out[0]

    @staticmethod
    def backward(ctx, grad_y):
        n, need = ctx.n, ctx.needs_input_grad  # need: x, activations, alphas, *weights, *biases
        dx, dws, dbs = _chain_grads(ctx, grad_y, need[0], need[3:3 + n], need[3 + n:])
        return (dx, None, None, *dws, *dbs)


def dense_chain(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], activations: list[str],
                alphas: list[float]) -> Tensor:
    """Fused dense layers applied in turn (layer i's output is layer i+1's input) as one op:
    the same result as dense() per layer, with one autograd node for the whole chain."""
    empty = x.new_empty(0)
    biases, alphas = [empty if b is None else b for b in biases], [float(a) for a in alphas]
    if torch.compiler.is_compiling():  # traced: the registered op, which the compilers know how to handle
        return _ops.dense_chain_forward(x, weights, biases, activations, alphas)[0]
    return _DenseChain.apply(x, list(activations), alphas, *weights, *biases)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None,
          activation: str = "linear", alpha: float = 0.0) -> Tensor:
    """y = act(x @ weight^T + bias) as one fused op; weight is (out, in) like nn.Linear."""
    y, _ = _ops.dense_forward(x, weight, bias, activation, float(alpha))
    return y


# ----------------------------------------------------------- softmax cross-entropy
@torch.library.register_fake("densepipe::softmax_cross_entropy")
def _softmax_cross_entropy_fake(logits, target):
    torch._check(logits.dim() == 2, lambda: "densepipe softmax_cross_entropy: logits must be 2-D")
    return logits.new_empty(logits.shape[0]), torch.empty_like(logits)


def _softmax_cross_entropy_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)  # the forward's softmax - onehot: the backward is one multiply
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)


def _softmax_cross_entropy_backward(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None
    if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no derivative of its own
        raise DoubleBackwardError("densepipe softmax_cross_entropy: double backward (create_graph=True "
                                  "through the loss) is not supported")
    (grad,) = ctx.saved_tensors
    return grad * grad_loss.unsqueeze(1), None


torch.library.register_autograd(
    "densepipe::softmax_cross_entropy", _softmax_cross_entropy_backward,
    setup_context=_softmax_cross_entropy_setup_context,
)


def softmax_cross_entropy(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row loss logsumexp(z) - z[target] of logits z (rows, classes) against int64 class ids
    (rows,), and its gradient softmax(z) - onehot(target) (differentiable through the loss)."""
    return _ops.softmax_cross_entropy(logits, target)


# ------------------------------------------------------------------ dropout noise
@torch.library.register_fake("densepipe::dropout_noise")
def _dropout_noise_fake(x, p, generator=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def dropout_noise(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """What dropout multiplies x by: 0 with probability p, else 1 / (1 - p), elementwise (CPU).
    A constant to autograd: x gives only the shape, dtype and device."""
    return _ops.dropout_noise(x.detach(), float(p), generator)

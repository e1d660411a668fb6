"""Gradients without autograd's graph, for the commonest models: a line of fused dense layer
chains, with batch normalization and dropout between them, from a single input to a single output
(an MLP), maybe behind noise on its input.

Its step is each layer's forward kernel (and each dropout's noise), the loss and its gradient,
then each layer's backward kernel (and each noise's product), last first: the calls autograd makes for
that model, with the same arguments in the same order, so the gradients are the same, bit for
bit (tests/test_direct.py). What is left out is autograd's own cost per step (recording the
graph, running its nodes, accumulating gradients), a third of a tabular MLP's step on the CPU.
Sparse categorical cross-entropy from logits, the classifier's loss, comes with its gradient from
one kernel; any other loss is differentiated by autograd on its own. Every other model, and every
model on the GPU or under torchrun, trains through autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from densepipe import ops  # noqa: F401  (loads the extension: registers torch.ops.densepipe)
from densepipe.nn.dense import FusedDense
from densepipe.nn.layers import BatchNorm
from densepipe.nn.losses import LOSSES, uses_logits
from densepipe.nn.model import DenseModel, Head

_ops = torch.ops.densepipe


def loss_and_grad(head: Head, raw: Tensor, target: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's loss and the gradient of sum(coef * loss) with respect to raw, computed as
    autograd's backward from the Trainer's loss total computes it (coef: the total's chain rule
    up to the rows, a scalar or one value per row)."""
    if head.loss == "sparse_categorical_crossentropy" and uses_logits(head.loss_params.get("from_logits")):
        # The kernel that nn/losses.py computes this loss with returns its gradient too.
        with torch._C._AutoDispatchBelowAutograd():
            loss, grad = _ops.softmax_cross_entropy(raw, target.reshape(-1).long())
        return loss, grad.mul_(coef.unsqueeze(1) if coef.dim() else coef)
    raw = raw.detach().requires_grad_()  # every other loss: autograd over the loss alone
    with torch.enable_grad():
        loss = LOSSES[head.loss](raw, target, head.activation, **head.loss_params)
        (grad,) = torch.autograd.grad(loss, raw, coef.expand_as(loss))
    return loss.detach(), grad


@dataclass
class _Chain:
    """Fused dense layers run as one dense_chain op."""
    layers: list[FusedDense]
    activations: list[str]
    alphas: list[float]

    @classmethod
    def of(cls, layers: list[FusedDense]) -> _Chain:
        return cls(layers, [m.act.name for m in layers], [float(m.alpha) for m in layers])

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for m in self.layers for p in m.parameters())


@dataclass
class _Noise:
    """A layer that multiplies its input by noise it draws (dropout): `multiplier(x)`, None for none."""
    layer: nn.Module
    trainable = False


@dataclass
class _Norm:
    """A batch normalization layer: torch's batch_norm kernels, whose backward autograd calls too."""
    layer: BatchNorm

    @property
    def trainable(self) -> bool:
        return self.layer.weight.requires_grad or self.layer.bias.requires_grad


@dataclass
class _Leading:
    """A layer without parameters or buffers ahead of every dense layer (noise on the input):
    nothing behind it trains, so it runs as it is and backpropagation never reaches it."""
    layer: nn.Module
    trainable = False


def _stateless(layer: nn.Module) -> bool:
    return next(layer.parameters(), None) is None and next(layer.buffers(), None) is None


class DirectStep:
    """The segments (leading layers, chains and noise layers, input first) and head of a model that
    qualifies."""

    def __init__(self, model: DenseModel, input_name: str, output_name: str,
                 segments: list[_Leading | _Chain | _Norm | _Noise]):
        self.model, self.input, self.output, self.segments = model, input_name, output_name, segments
        self.head = model.heads[output_name]

    @classmethod
    def build(cls, model: DenseModel, device: torch.device, world: int) -> DirectStep | None:
        """A DirectStep for the model, or None where autograd has to do the work: several
        processes (DDP's gradient hooks), a device this path has not been measured on, several
        inputs or outputs, layers other than fused dense, batchnorm and dropout (but for parameter-free
        ones ahead of them), layers that do not follow each other in one line, penalties on
        weights or activity."""
        if world > 1 or device.type != "cpu" or len(model.input_widths) != 1 or len(model.heads) != 1:
            return None
        (output, head), = model.heads.items()
        if model.penalized or model.has_activity:
            return None
        (input_name,) = model.input_widths
        source, segments = input_name, []
        for run in model.runs:
            if run[0].inputs != [source]:  # each run reads the one before it: a line
                return None
            layers = [model.layers[node.name] for node in run]
            if all(isinstance(m, FusedDense) and m.chains for m in layers):
                segments.append(_Chain.of(layers))
            elif len(layers) == 1 and callable(getattr(layers[0], "multiplier", None)):
                segments.append(_Noise(layers[0]))
            elif len(layers) == 1 and type(layers[0]) is BatchNorm:
                segments.append(_Norm(layers[0]))
            elif (len(layers) == 1 and _stateless(layers[0])
                  and not any(isinstance(seg, _Chain | _Norm) for seg in segments)):
                segments.append(_Leading(layers[0]))
            else:
                return None
            source = run[-1].name
        if source != head.node:
            return None
        return cls(model, input_name, output, segments)

    def usable(self) -> bool:
        """Whether it may run now: no layer or the model expects a call of its own (hooks)."""
        m = self.model
        hooked = m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        return not hooked and all(layer.chainable() for seg in self.segments if isinstance(seg, _Chain)
                                  for layer in seg.layers)

    def grads(self, inputs: dict[str, Tensor], target: Tensor, seed: Tensor,
              row_weight: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """Sets every trainable parameter's .grad to the gradient of seed * head weight * sum of
        row_weight * loss over the rows, as backward(seed) of the Trainer's loss total does.
        Returns the raw outputs (name -> logits) and each row's loss."""
        h = inputs[self.input]
        saved = []  # per segment: what its backward needs
        with torch._C._AutoDispatchBelowAutograd():  # the kernels themselves: no graph is recorded
            for seg in self.segments:
                if isinstance(seg, _Chain):
                    empty = h.new_empty(0)  # the op's "no bias"
                    weights = [m.weight for m in seg.layers]
                    biases = [empty if m.bias is None else m.bias for m in seg.layers]
                    y, hidden, preacts = _ops.dense_chain_forward(h, weights, biases, seg.activations, seg.alphas)
                    saved.append((h, y, hidden, preacts, weights, biases))
                elif isinstance(seg, _Norm):
                    bn = seg.layer
                    # What torch.batch_norm runs in training without running statistics.
                    y, mean, invstd = torch.ops.aten.native_batch_norm(h, bn.weight, bn.bias, None, None, True,
                                                                       0.0, bn.eps)
                    bn.track(h)
                    saved.append((h, mean, invstd))
                elif isinstance(seg, _Noise):
                    noise = seg.layer.multiplier(h)
                    saved.append(noise)
                    y = h if noise is None else h * noise
                else:
                    saved.append(None)
                    y = seg.layer(h)
                h = y
        # The total's chain rule down to the rows, in autograd's order: seed, head weight, row weight.
        coef = seed if self.head.weight == 1.0 else seed * self.head.weight
        if row_weight is not None:
            coef = coef * row_weight
        loss, g = loss_and_grad(self.head, h, target, coef)
        # A segment's input needs a gradient when some segment before it trains.
        need_dx = [any(seg.trainable for seg in self.segments[:i]) for i in range(len(self.segments))]
        for seg, kept, need_x in reversed(list(zip(self.segments, saved, need_dx, strict=True))):
            if isinstance(seg, _Chain):
                g = _chain_backward(seg, kept, g, need_x)
            elif isinstance(seg, _Norm):
                g = _norm_backward(seg.layer, kept, g, need_x)
            elif kept is not None and need_x:
                g = g * kept
            if not need_x:
                break
        return {self.output: h}, loss


def _chain_backward(seg: _Chain, kept, g: Tensor, need_x: bool) -> Tensor | None:
    """Sets the gradients of a chain's trainable parameters from g, the gradient of its output;
    returns the gradient of its input (None unless need_x)."""
    x, y, hidden, preacts, weights, biases = kept
    need_w = [w.requires_grad for w in weights]
    need_b = [b.requires_grad for b in biases]  # False for the empty stand-in of no bias
    if not (need_x or any(need_w) or any(need_b)):
        return None
    with torch._C._AutoDispatchBelowAutograd():
        dx, dws, dbs = _ops.dense_chain_backward(g, x, hidden, y, weights, preacts, seg.activations, seg.alphas,
                                                 need_w, need_b, need_x)
    for params, ds, need in ((weights, dws, need_w), (biases, dbs, need_b)):
        for p, d, wanted in zip(params, ds, need, strict=True):
            if wanted:
                p.grad = d
    return dx if need_x else None


def _norm_backward(bn: BatchNorm, kept, g: Tensor, need_x: bool) -> Tensor | None:
    """Sets the batch normalization's gradients from g, its output's; returns its input's
    (None unless need_x)."""
    x, mean, invstd = kept
    need = [need_x, bn.weight.requires_grad, bn.bias.requires_grad]
    if not any(need):
        return None
    with torch._C._AutoDispatchBelowAutograd():
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, bn.weight, None, None, mean, invstd, True,
                                                               bn.eps, need)
    for p, d, wanted in ((bn.weight, dw, need[1]), (bn.bias, db, need[2])):
        if wanted:
            p.grad = d
    return dx if need_x else None

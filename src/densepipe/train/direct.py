"""Gradients without autograd's graph, for models whose layers form one line from a single input
to a single output (MLPs, autoencoders), maybe with L1/L2 penalties on their weights.

Its step is each layer's forward kernel (and each dropout's noise), the loss and its gradient,
then each layer's backward kernel (and each noise's product), last first: the calls autograd makes for
that model, with the same arguments in the same order, so the gradients are the same, bit for
bit (tests/test_direct.py). What is left out is autograd's own cost per step (recording the
graph, running its nodes, accumulating gradients), a third of a tabular MLP's step on the CPU.
Fused dense chains, batch normalization and dropout run their kernels directly; any other layer
(layer normalization, alpha dropout, a standalone activation, ...) is called as it is and
differentiated by autograd on its own. Sparse categorical cross-entropy from logits, the
classifier's loss, comes with its gradient from one kernel; any other loss is differentiated by
autograd on its own, and the weights' L1/L2 penalties by their formula, in autograd's arithmetic.
Models with several inputs or outputs, layers of several inputs or activity penalties, and every
model on the GPU or under torchrun, train through autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from densepipe import ops  # noqa: F401  (loads the extension: registers torch.ops.densepipe)
from densepipe.nn.dense import FusedDense, expects_own_call
from densepipe.nn.layers import BatchNorm, MultiplicativeNoise
from densepipe.nn.losses import LOSSES, uses_logits
from densepipe.nn.model import DenseModel, Head, l1_l2_grad

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


_below_autograd = torch._C._AutoDispatchBelowAutograd  # the kernels themselves: no graph is recorded


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

    def usable(self) -> bool:
        return all(m.chainable() for m in self.layers)

    def forward(self, h: Tensor, need_x: bool):
        empty = h.new_empty(0)  # the op's "no bias"
        weights = [m.weight for m in self.layers]
        biases = [empty if m.bias is None else m.bias for m in self.layers]
        with _below_autograd():
            y, hidden, preacts = _ops.dense_chain_forward(h, weights, biases, self.activations, self.alphas)
        return y, (h, y, hidden, preacts, weights, biases)

    def backward(self, kept, g: Tensor, need_x: bool) -> Tensor | None:
        x, y, hidden, preacts, weights, biases = kept
        need_w = [w.requires_grad for w in weights]
        need_b = [b.requires_grad for b in biases]  # False for the empty stand-in of no bias
        if not (need_x or any(need_w) or any(need_b)):
            return None
        with _below_autograd():
            dx, dws, dbs = _ops.dense_chain_backward(g, x, hidden, y, weights, preacts, self.activations,
                                                     self.alphas, need_w, need_b, need_x)
        _set_grads(weights + biases, dws + dbs, need_w + need_b)
        return dx if need_x else None


@dataclass
class _Norm:
    """A batch normalization layer: torch's batch_norm kernels, whose backward autograd calls too."""
    layer: BatchNorm

    @staticmethod
    def takes(layer: nn.Module) -> bool:
        return type(layer) is BatchNorm  # exactly: a subclass may train otherwise

    @property
    def trainable(self) -> bool:
        return self.layer.weight.requires_grad or self.layer.bias.requires_grad

    def usable(self) -> bool:
        return not expects_own_call(self.layer)

    def forward(self, h: Tensor, need_x: bool):
        bn = self.layer
        with _below_autograd():
            # What torch.batch_norm runs in training without running statistics.
            y, mean, invstd = torch.ops.aten.native_batch_norm(h, bn.weight, bn.bias, None, None, True, 0.0,
                                                               bn.eps)
        bn.track(h)
        return y, (h, mean, invstd)

    def backward(self, kept, g: Tensor, need_x: bool) -> Tensor | None:
        bn, (x, mean, invstd) = self.layer, kept
        need = [need_x, bn.weight.requires_grad, bn.bias.requires_grad]
        if not any(need):
            return None
        with _below_autograd():
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, bn.weight, None, None, mean, invstd,
                                                                   True, bn.eps, need)
        _set_grads([bn.weight, bn.bias], [dw, db], need[1:])
        return dx if need_x else None


@dataclass
class _Noise:
    """A layer that multiplies its input by noise it draws (dropout)."""
    layer: MultiplicativeNoise
    trainable = False

    @staticmethod
    def takes(layer: nn.Module) -> bool:
        return isinstance(layer, MultiplicativeNoise)  # forward is x * multiplier(x) in every one

    def usable(self) -> bool:
        return not expects_own_call(self.layer)

    def forward(self, h: Tensor, need_x: bool):
        with _below_autograd():
            noise = self.layer.multiplier(h)
            return (h if noise is None else h * noise), noise

    def backward(self, noise, g: Tensor, need_x: bool) -> Tensor | None:
        return None if not need_x else g if noise is None else g * noise


@dataclass
class _Local:
    """Any other layer of one input (layer normalization, alpha dropout, additive noise, a
    standalone activation, a dense layer on torch's reference ops): called as it is, its forward
    recorded by autograd on its own, and that small graph run backward. These are the nodes the
    whole model's graph would run for it, and its hooks see its call."""
    layer: nn.Module

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.layer.parameters())

    def usable(self) -> bool:
        return True

    def forward(self, h: Tensor, need_x: bool):
        x = h.detach().requires_grad_() if need_x else h
        with torch.enable_grad():
            y = self.layer(x)
        return y, (x, y)

    def backward(self, kept, g: Tensor, need_x: bool) -> Tensor | None:
        x, y = kept
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if not y.requires_grad:  # neither its input nor its parameters need a gradient
            return None
        grads = torch.autograd.grad(y, [x, *params] if need_x else params, g, materialize_grads=True)
        _set_grads(params, grads[need_x:], [True] * len(params))
        return grads[0] if need_x else None


def _set_grads(params: list[Tensor], grads: list[Tensor], wanted: list[bool]) -> None:
    for p, d, want in zip(params, grads, wanted, strict=True):
        if want:
            p.grad = d


_Segment = _Chain | _Norm | _Noise | _Local  # each: trainable, usable(), forward(h, need_x) -> (y, kept),
                                             # backward(kept, g, need_x) -> input's gradient or None


def _segment(layer: nn.Module) -> _Segment:
    """The segment running a layer of one input: one that runs its kernels without autograd where
    there is one for its kind, else a _Local."""
    return next((kind for kind in (_Noise, _Norm) if kind.takes(layer)), _Local)(layer)


class DirectStep:
    """The segments (input first) and head of a model that qualifies."""

    def __init__(self, model: DenseModel, input_name: str, output_name: str,
                 segments: list[_Segment]):
        self.model, self.input, self.output, self.segments = model, input_name, output_name, segments
        self.head = model.heads[output_name]

    @classmethod
    def build(cls, model: DenseModel, device: torch.device, world: int) -> DirectStep | None:
        """A DirectStep for the model, or None where autograd has to do the work: several
        processes (DDP's gradient hooks), a device this path has not been measured on, several
        inputs or outputs, layers that do not follow each other in one line (a layer of several
        inputs), penalties on activity."""
        if world > 1 or device.type != "cpu" or len(model.input_widths) != 1 or len(model.heads) != 1:
            return None
        (output, head), = model.heads.items()
        if model.has_activity:
            return None
        (input_name,) = model.input_widths
        source, segments = input_name, []
        for run in model.runs:
            layers = [model.layers[node.name] for node in run]
            if run[0].inputs != [source]:  # each run reads the one before it: a line
                return None
            if all(isinstance(m, FusedDense) and m.chains for m in layers):
                segments.append(_Chain.of(layers))
            else:  # a run of several is a line of layers of one input each
                segments += [_segment(m) for m in layers]
            source = run[-1].name
        if source != head.node:
            return None
        return cls(model, input_name, output, segments)

    def usable(self) -> bool:
        """Whether it may run now: nothing expects the model's own call, or the call of a layer whose
        kernels run directly (hooks)."""
        m = self.model
        hooked = m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        return not hooked and all(seg.usable() for seg in self.segments)

    def grads(self, inputs: dict[str, Tensor], target: Tensor, seed: Tensor,
              row_weight: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """Sets every trainable parameter's .grad to the gradient of seed * head weight * sum of
        row_weight * loss over the rows, as backward(seed) of the Trainer's loss total does.
        Returns the raw outputs (name -> logits) and each row's loss."""
        need_x, trains = [], False  # a segment's input needs a gradient when a segment before it trains
        for seg in self.segments:
            need_x.append(trains)
            trains = trains or seg.trainable
        h, saved = inputs[self.input], []  # saved: per segment, what its backward needs
        for seg, need in zip(self.segments, need_x, strict=True):
            h, kept = seg.forward(h, need)
            saved.append(kept)
        h = h.detach()  # the raw output, kept for the metrics; a _Local last layer recorded a graph
        # The total's chain rule down to the rows, in autograd's order: seed, head weight, row weight.
        coef = seed if self.head.weight == 1.0 else seed * self.head.weight
        if row_weight is not None:
            coef = coef * row_weight
        loss, g = loss_and_grad(self.head, h, target, coef)
        for seg, kept, need in reversed(list(zip(self.segments, saved, need_x, strict=True))):
            g = seg.backward(kept, g, need)
            if g is None:  # nothing further back trains
                break
        return {self.output: h}, loss

    def penalty_grads(self) -> Tensor | None:
        """Adds the gradient of the weights' L1/L2 penalties to their .grad, set by grads(), and
        returns the penalty (None without any). Autograd's backward of loss total + penalty sums the
        same two terms into each weight's gradient: the penalty's (its nodes were recorded later,
        so they run first) and the layer's."""
        if not self.model.penalized:
            return None
        with torch.no_grad():
            for w, l1, l2 in self.model.penalized_weights():
                if w.requires_grad:
                    g = l1_l2_grad(w, l1, l2)
                    w.grad = g if w.grad is None else w.grad + g
            return self.model.penalty()

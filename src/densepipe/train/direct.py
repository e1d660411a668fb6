"""Gradients without autograd's graph, for the commonest model: one chain of fused dense layers
from a single input to a single output.

Its step is the chain's forward kernel, the loss and its gradient, and the chain's backward
kernel: the calls autograd makes for that model, with the same arguments in the same order, so
the gradients are the same, bit for bit (tests/test_direct.py). What is left out is autograd's own
cost per step (recording the graph, running its nodes, accumulating gradients), a third of a
tabular MLP's step on the CPU. Sparse categorical cross-entropy from logits, the classifier's
loss, comes with its gradient from one kernel; any other loss is differentiated by autograd on
its own. Every other model, and every model on the GPU or under torchrun, trains through
autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densepipe import ops  # noqa: F401  (loads the extension: registers torch.ops.densepipe)
from densepipe.nn.dense import FusedDense
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


class DirectStep:
    """The chain and head of a model that qualifies (see `build`)."""

    def __init__(self, model: DenseModel, input_name: str, output_name: str, layers: list[FusedDense]):
        self.model, self.input, self.output, self.layers = model, input_name, output_name, layers
        self.head = model.heads[output_name]
        self.activations = [m.act.name for m in layers]
        self.alphas = [float(m.alpha) for m in layers]

    @classmethod
    def build(cls, model: DenseModel, device: torch.device, world: int) -> DirectStep | None:
        """A DirectStep for the model, or None where autograd has to do the work: several
        processes (DDP's gradient hooks), a device this path has not been measured on, several
        inputs or outputs, any layer outside one fused chain, penalties on weights or activity."""
        if world > 1 or device.type != "cpu" or len(model.input_widths) != 1 or len(model.heads) != 1:
            return None
        (output, head), = model.heads.items()
        if model.penalized or model.has_activity or len(model.runs) != 1:
            return None
        (run,) = model.runs
        layers = [model.layers[node.name] for node in run]
        (input_name,) = model.input_widths
        if (run[0].inputs != [input_name] or run[-1].name != head.node
                or not all(isinstance(m, FusedDense) and m.chains for m in layers)):
            return None
        return cls(model, input_name, output, layers)

    def usable(self) -> bool:
        """Whether it may run now: no layer or the model expects a call of its own (hooks)."""
        m = self.model
        hooked = m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        return not hooked and all(layer.chainable() for layer in self.layers)

    def grads(self, inputs: dict[str, Tensor], target: Tensor, seed: Tensor,
              row_weight: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """Sets every trainable parameter's .grad to the gradient of seed * head weight * sum of
        row_weight * loss over the rows, as backward(seed) of the Trainer's loss total does.
        Returns the raw outputs (name -> logits) and each row's loss."""
        weights = [m.weight for m in self.layers]
        biases = [m.bias for m in self.layers]
        need_w = [w.requires_grad for w in weights]
        need_b = [b is not None and b.requires_grad for b in biases]
        x = inputs[self.input]
        with torch._C._AutoDispatchBelowAutograd():  # the kernels themselves: no graph is recorded
            empty = x.new_empty(0)  # the op's "no bias"
            y, hidden, preacts = _ops.dense_chain_forward(x, weights, [empty if b is None else b for b in biases],
                                                          self.activations, self.alphas)
        # The total's chain rule down to the rows, in autograd's order: seed, head weight, row weight.
        coef = seed if self.head.weight == 1.0 else seed * self.head.weight
        if row_weight is not None:
            coef = coef * row_weight
        loss, grad = loss_and_grad(self.head, y, target, coef)
        if any(need_w) or any(need_b):
            with torch._C._AutoDispatchBelowAutograd():
                _, dws, dbs = _ops.dense_chain_backward(grad, x, hidden, y, weights, preacts, self.activations,
                                                        self.alphas, need_w, need_b, False)
            for params, ds, need in ((weights, dws, need_w), (biases, dbs, need_b)):
                for p, d, wanted in zip(params, ds, need, strict=True):
                    if wanted:
                        p.grad = d
        return {self.output: y}, loss

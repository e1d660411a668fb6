"""Gradients without autograd's graph of the whole model, for the models tabular training mostly
sees: any graph of layers (MLPs, autoencoders, several inputs and outputs), maybe with L1/L2
penalties on its weights.

Its step is each layer's forward kernel (and each dropout's noise), each output's loss and its
gradient, then each layer's backward kernel (and each noise's product), last first: the calls
autograd makes for that model, with the same arguments in the same order, and a value read by
several layers sums their gradients in autograd's order, so the gradients are the same, bit for
bit (tests/test_direct.py). What is left out is autograd's own cost per step (recording the graph,
running its nodes, accumulating gradients), a third of a tabular MLP's step on the CPU.
Fused dense chains, batch normalization and dropout run their kernels directly; any other layer
(layer normalization, alpha dropout, a standalone activation, a concatenation, ...) is called as it
is and differentiated by autograd on its own. Sparse categorical cross-entropy from logits, the
classifier's loss, comes with its gradient from one kernel; any other loss is differentiated by
autograd on its own, and the weights' L1/L2 penalties by their formula, in autograd's arithmetic.
Models with activity penalties or a layer reading an output after its head's activation, and every
model on the GPU or under torchrun, train through autograd.

An MLP classifier (one chain under softmax cross-entropy from logits, no weight penalty) goes one
step further: _ChainPlan.epoch makes every step's calls of an epoch from C++ (csrc/chain_epoch.cpp),
the same calls as its grads() and the Trainer's step, and comes back to Python only for the
optimizer's update. With several threads it splits a step's rows into one block per thread and sums
the blocks' gradients, which is the same to rounding (bit for bit on one thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densepipe import _C, ops
from densepipe.nn.dense import FusedDense, expects_own_call
from densepipe.nn.layers import BatchNorm, MultiplicativeNoise
from densepipe.nn.losses import LOSSES, uses_logits
from densepipe.nn.model import DenseModel, Head, l1_l2_grad

_ops = torch.ops.densepipe


_below_autograd = torch._C._AutoDispatchBelowAutograd  # the kernels themselves: no graph is recorded


def loss_and_grad(head: Head, raw: Tensor, target: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's loss and the gradient of sum(coef * loss) with respect to raw, computed as
    autograd's backward from the Trainer's loss total computes it (coef: the total's chain rule
    up to the rows, a scalar or one value per row)."""
    if head.loss == "sparse_categorical_crossentropy" and uses_logits(head.loss_params.get("from_logits")):
        # The kernel that nn/losses.py computes this loss with returns its gradient too.
        with _below_autograd():
            loss, grad = ops.softmax_cross_entropy(raw, target.reshape(-1).long())
        return loss, grad.mul_(coef.unsqueeze(1) if coef.dim() else coef)
    raw = raw.detach().requires_grad_()  # every other loss: autograd over the loss alone
    with torch.enable_grad():
        loss = LOSSES[head.loss](raw, target, head.activation, **head.loss_params)
        (grad,) = torch.autograd.grad(loss, raw, coef.expand_as(loss))
    return loss.detach(), grad


# Each segment (one node of the model's graph, or a chain of fused dense nodes) has: trainable
# (whether any of its parameters trains); usable() (whether its kernels may run now, without its
# own call); bind() (takes what its steps read of its layers, once per epoch: see DirectStep.plan);
# forward(xs, need) -> (output, kept), from its inputs and which of them need a gradient;
# backward(kept, g, need) -> one gradient per input (None where not needed), setting its
# parameters' .grad from g, the gradient of its output.


@dataclass
class _Chain:
    """Fused dense layers run as one dense_chain op."""
    layers: list[FusedDense]
    activations: list[str]
    alphas: list[float]
    # Set by bind(): the layers' parameters and which of them train. Module attribute lookups cost
    # about half a microsecond each, which a small model's step would pay a dozen times over.
    weights: list[Tensor] = field(init=False, default_factory=list)
    biases: list[Tensor] = field(init=False, default_factory=list)  # an empty tensor for no bias
    need_w: list[bool] = field(init=False, default_factory=list)
    need_b: list[bool] = field(init=False, default_factory=list)

    @classmethod
    def of(cls, layers: list[FusedDense]) -> _Chain:
        return cls(layers, [m.act.name for m in layers], [float(m.alpha) for m in layers])

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for m in self.layers for p in m.parameters())

    def usable(self) -> bool:
        return all(m.chainable() for m in self.layers)

    def bind(self) -> None:
        self.weights = [m.weight for m in self.layers]
        empty = self.weights[0].new_empty(0)  # the op's "no bias"
        self.biases = [empty if m.bias is None else m.bias for m in self.layers]
        self.need_w = [w.requires_grad for w in self.weights]
        self.need_b = [b.requires_grad for b in self.biases]  # False for the empty stand-in

    def forward(self, xs: list[Tensor], need: list[bool]):
        (h,) = xs
        with _below_autograd():
            y, hidden, preacts = _ops.dense_chain_forward(h, self.weights, self.biases, self.activations,
                                                          self.alphas)
        return y, (h, y, hidden, preacts)

    def backward(self, kept, g: Tensor, need: list[bool]) -> list[Tensor | None]:
        x, y, hidden, preacts = kept
        (need_x,) = need
        with _below_autograd():
            dx, dws, dbs = _ops.dense_chain_backward(g, x, hidden, y, self.weights, preacts, self.activations,
                                                     self.alphas, self.need_w, self.need_b, need_x)
        _set_grads(self.weights + self.biases, dws + dbs, self.need_w + self.need_b)
        return [dx if need_x else None]


class _Unbound:
    """A segment that reads its layer at each call: binding it keeps nothing."""

    def bind(self) -> None:
        pass


@dataclass
class _Norm(_Unbound):
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

    def forward(self, xs: list[Tensor], need: list[bool]):
        bn, (h,) = self.layer, xs
        with _below_autograd():
            # What torch.batch_norm runs in training without running statistics.
            y, mean, invstd = torch.ops.aten.native_batch_norm(h, bn.weight, bn.bias, None, None, True, 0.0,
                                                               bn.eps)
        bn.track(h)
        return y, (h, mean, invstd)

    def backward(self, kept, g: Tensor, need: list[bool]) -> list[Tensor | None]:
        bn, (x, mean, invstd) = self.layer, kept
        wanted = [need[0], bn.weight.requires_grad, bn.bias.requires_grad]
        with _below_autograd():
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, bn.weight, None, None, mean, invstd,
                                                                   True, bn.eps, wanted)
        _set_grads([bn.weight, bn.bias], [dw, db], wanted[1:])
        return [dx if need[0] else None]


@dataclass
class _Noise(_Unbound):
    """A layer that multiplies its input by noise it draws (dropout)."""
    layer: MultiplicativeNoise
    trainable = False

    @staticmethod
    def takes(layer: nn.Module) -> bool:
        return isinstance(layer, MultiplicativeNoise)  # forward is x * multiplier(x) in every one

    def usable(self) -> bool:
        return not expects_own_call(self.layer)

    def forward(self, xs: list[Tensor], need: list[bool]):
        (h,) = xs
        with _below_autograd():
            return self.layer.noised(h)

    def backward(self, noise, g: Tensor, need: list[bool]) -> list[Tensor | None]:
        return [None if not need[0] else g if noise is None else g * noise]


@dataclass
class _Local(_Unbound):
    """Any other layer (layer normalization, alpha dropout, additive noise, a standalone activation,
    a dense layer on torch's reference ops, a concatenation or merge of several inputs): called as it
    is, its forward recorded by autograd on its own, and that small graph run backward. These are the
    nodes the whole model's graph would run for it, and its hooks see its call."""
    layer: nn.Module

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.layer.parameters())

    def usable(self) -> bool:
        return True

    def forward(self, xs: list[Tensor], need: list[bool]):
        xs = [x.detach().requires_grad_() if n else x for x, n in zip(xs, need, strict=True)]
        with torch.enable_grad():
            y = self.layer(*xs)
        return y, (xs, y)

    def backward(self, kept, g: Tensor, need: list[bool]) -> list[Tensor | None]:
        xs, y = kept
        params = [p for p in self.layer.parameters() if p.requires_grad]
        wanted = [x for x, n in zip(xs, need, strict=True) if n]
        grads = iter(torch.autograd.grad(y, wanted + params, g, materialize_grads=True))
        dxs = [next(grads) if n else None for n in need]
        _set_grads(params, list(grads), [True] * len(params))
        return dxs


def _set_grads(params: list[Tensor], grads: list[Tensor], wanted: list[bool]) -> None:
    for p, d, want in zip(params, grads, wanted, strict=True):
        if want:
            p.grad = d


_Segment = _Chain | _Norm | _Noise | _Local


def _segment(layer: nn.Module) -> _Segment:
    """The segment running one layer: one that runs its kernels without autograd where there is one
    for its kind, else a _Local."""
    return next((kind for kind in (_Noise, _Norm) if kind.takes(layer)), _Local)(layer)


@dataclass
class _Node:
    """A segment where it sits in the graph: the names it reads and the name it writes."""
    segment: _Segment
    inputs: list[str]
    output: str


class DirectStep:
    """The model's graph as segments in the order its forward runs them."""

    def __init__(self, model: DenseModel, nodes: list[_Node]):
        self.model, self.nodes = model, nodes

    @classmethod
    def build(cls, model: DenseModel, device: torch.device, world: int) -> DirectStep | None:
        """A DirectStep for the model, or None where autograd has to do the work: several
        processes (DDP's gradient hooks), a device this path has not been measured on, penalties on
        activity, an output whose head activation other layers read."""
        if world > 1 or device.type != "cpu" or model.has_activity or model.reads_activated_outputs:
            return None
        nodes = []
        for run in model.runs:
            layers = [model.layers[node.name] for node in run]
            if all(isinstance(m, FusedDense) and m.chains for m in layers):  # a run reads one input
                nodes.append(_Node(_Chain.of(layers), run[0].inputs, run[-1].name))
            else:
                nodes += [_Node(_segment(m), node.inputs, node.name) for node, m in zip(run, layers, strict=True)]
        return cls(model, nodes)

    def usable(self) -> bool:
        """Whether it may run now: nothing expects the model's own call, or the call of a layer whose
        kernels run directly (hooks)."""
        return not expects_own_call(self.model) and all(node.segment.usable() for node in self.nodes)

    def plan(self) -> _Plan:
        """The steps of one epoch. What they read of the model is taken here, once: which
        parameters train and which values need a gradient (callbacks change them only between
        epochs), and the chains' parameters."""
        trains: dict[str, bool] = {}  # per name: whether anything that made it trains (inputs: no)
        nodes = []
        for node in self.nodes:
            node.segment.bind()
            need = [trains.get(i, False) for i in node.inputs]  # the inputs that need a gradient
            trains[node.output] = any(need) or node.segment.trainable
            nodes.append(_Planned(node, need, trains[node.output]))
        heads = [head.node for head in self.model.heads.values()]
        if len(nodes) == 1 and isinstance(nodes[0].node.segment, _Chain) and heads == [nodes[0].node.output]:
            return _ChainPlan(self, nodes)  # an MLP: the step needs none of the graph's bookkeeping
        return _Plan(self, nodes)


@dataclass
class _Planned:
    """A node as one epoch runs it: which inputs need a gradient, and whether anything it made
    does (else backward stops there)."""
    node: _Node
    need: list[bool]
    trains: bool


@dataclass
class _Plan:
    """One epoch's steps of a DirectStep (see DirectStep.plan)."""
    step: DirectStep
    nodes: list[_Planned]

    def grads(self, inputs: dict[str, Tensor], targets: dict[str, Tensor], seed: Tensor,
              row_weights: dict[str, Tensor | None]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Sets every trainable parameter's .grad to the gradient of seed * the sum over outputs of
        head weight * sum of row weight * loss over the rows, as backward(seed) of the Trainer's
        loss total does. Returns the raw outputs and each row's loss, per output name."""
        env, saved = dict(inputs), []
        for planned in self.nodes:
            node = planned.node
            env[node.output], kept = node.segment.forward([env[i] for i in node.inputs], planned.need)
            saved.append(kept)
        heads = self.step.model.heads
        raw = {name: env[head.node].detach() for name, head in heads.items()}
        losses, pending = {}, {}  # pending: per name, the gradient of its value so far
        # Autograd runs nodes last recorded first: the losses (last output first), then the layers from
        # the last; a value read several times sums its gradients in that order.
        for name, head in reversed(heads.items()):
            losses[name], g = loss_and_grad(head, raw[name], targets[head.target], _coef(seed, head, row_weights[name]))
            _add(pending, head.node, g)
        for planned, kept in zip(reversed(self.nodes), reversed(saved), strict=True):
            node = planned.node
            g = pending.pop(node.output, None)
            if g is None or not planned.trains:  # nothing it made needs a gradient
                continue
            for name, dx in zip(node.inputs, node.segment.backward(kept, g, planned.need), strict=True):
                if dx is not None:
                    _add(pending, name, dx)
        return raw, {name: losses[name] for name in heads}

    def runs_epochs(self, dense: list[Tensor]) -> bool:
        """Whether an epoch's steps run in one call into the extension (epoch(); see _ChainPlan): not
        for a general graph, whose steps the loop makes one by one through grads()."""
        return False

    def penalty_grads(self) -> Tensor | None:
        """Adds the gradient of the weights' L1/L2 penalties to their .grad, set by a plan's grads(),
        and returns the penalty (None without any). Autograd's backward of loss total + penalty sums
        the same two terms into each weight's gradient: the penalty's (its nodes were recorded
        later, so they run first) and the layer's."""
        if not self.step.model.penalized:
            return None
        with torch.no_grad():
            for w, l1, l2 in self.step.model.penalized_weights():
                if w.requires_grad:
                    g = l1_l2_grad(w, l1, l2)
                    w.grad = g if w.grad is None else w.grad + g
            return self.step.model.penalty()


class _ChainPlan(_Plan):
    """The plan of a model that is one chain of fused dense layers with one output (an MLP): its
    grads() makes the calls _Plan.grads makes for it, without the walk over the graph, whose
    bookkeeping costs a few percent of a small MLP's step."""

    def grads(self, inputs: dict[str, Tensor], targets: dict[str, Tensor], seed: Tensor,
              row_weights: dict[str, Tensor | None]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        ((name, head),), (planned,) = self.step.model.heads.items(), self.nodes
        chain = planned.node.segment
        y, kept = chain.forward([inputs[planned.node.inputs[0]]], planned.need)
        raw = y.detach()
        loss, g = loss_and_grad(head, raw, targets[head.target], _coef(seed, head, row_weights[name]))
        if planned.trains:
            chain.backward(kept, g, planned.need)
        return {name: raw}, {name: loss}

    def runs_epochs(self, dense: list[Tensor]) -> bool:
        """Whether epoch() may run this epoch's steps: a classifier under softmax cross-entropy from logits, no
        penalty on its weights, and nothing outside the chain: its parameters are the model's (the
        optimizer's gradients are the chain's to set) and its weights are `dense`, those whose
        gradient norms the loop logs."""
        (head,), (planned,) = self.step.model.heads.values(), self.nodes
        chain = planned.node.segment
        params = [p for m in chain.layers for p in m.parameters()]
        return (head.loss == "sparse_categorical_crossentropy" and uses_logits(head.loss_params.get("from_logits"))
                and not self.step.model.penalized and len(dense) == len(chain.weights)
                and all(a is b for a, b in zip(dense, chain.weights, strict=True))
                and all(any(p is q for q in params) for p in self.step.model.parameters()))

    def epoch(self, data, order: Tensor, buffers: dict[str, Tensor], bounds: list[tuple[int, int]],
              seeds: list[Tensor], class_weights: dict[str, Tensor], update) -> tuple[Tensor, dict[str, Tensor]]:
        """The epoch's steps in one call to the extension (csrc/chain_epoch.cpp), where runs_epochs()
        holds: the calls grads() and the loop make for each step, with update() (the optimizer's step)
        called after each step's gradients are set. data: the split (train/loop.py's Split); seeds:
        backward's seed gradient per step. Returns the steps' log rows (steps, 2 + layers) and the raw
        output of every step, in order."""
        ((name, head),), (planned,) = self.step.model.heads.items(), self.nodes
        chain, source = planned.node.segment, planned.node.inputs[0]
        distinct = {id(seed): seed for seed in seeds}  # one per step size: each coefficient made once
        coef_of = {key: _coef(seed, head, None) for key, seed in distinct.items()}
        coefs = [coef_of[id(seed)] for seed in seeds]
        log, outputs = _C.chain_classifier_epoch(
            data.inputs[source], data.targets[head.target], order, buffers[source], bounds, coefs,
            class_weights.get(head.target), chain.weights, chain.biases, chain.activations, chain.alphas,
            chain.need_w, chain.need_b, planned.trains, float(head.weight), update)
        return log, {name: outputs}


def _coef(seed: Tensor, head: Head, row_weight: Tensor | None) -> Tensor:
    """The loss total's chain rule down to one output's rows, in autograd's order: seed, head weight,
    row weight."""
    coef = seed if head.weight == 1.0 else seed * head.weight
    return coef if row_weight is None else coef * row_weight


def _add(pending: dict[str, Tensor], name: str, g: Tensor) -> None:
    """Adds g to the gradient gathered for name, as autograd's input buffers add what arrives."""
    pending[name] = g if name not in pending else pending[name] + g

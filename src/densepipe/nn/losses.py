"""Loss functions by name. Each maps (raw, target, head) to a per-sample loss (N,).

`raw` is the output layer's value *before* its head activation (sigmoid,
softmax, step); `head` names that activation. Classification losses work on the
logits where the head allows it (log-sum-exp stable, as Keras' from_logits=True),
or on probabilities when the user sets from_logits: false.
Class and sample weights are applied by `weighted_sum` / `weighted_mean`, outside the losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from densepipe import ops
from densepipe.nn.activations import softmax_rows
from densepipe.registry import Registry

LOSSES: Registry[Callable[..., Tensor]] = Registry("loss")
_EPS = 1e-7  # probability clamp, Keras' epsilon


def _flat(raw: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    target = target.to(raw.dtype).reshape(raw.shape)
    shape = (raw.shape[0], math.prod(raw.shape[1:]))  # not -1: a batch may have no rows
    return raw.reshape(shape), target.reshape(shape)


def _probs(raw: Tensor, head: str) -> Tensor:
    if head == "sigmoid":
        return torch.sigmoid(raw)
    if head == "softmax":
        return softmax_rows(raw)
    return raw


def uses_logits(from_logits) -> bool:
    """Whether a classification loss reads the raw output as logits. auto: sigmoid, softmax and
    linear heads all give logits; only an explicit from_logits: false reads probabilities."""
    return from_logits in (None, "auto", True)


@LOSSES.register("mse", "mean_squared_error")
def mse(raw, target, head="linear"):
    p, t = _flat(_probs(raw, head), target)
    return ((p - t) ** 2).mean(dim=1)


@LOSSES.register("mae", "mean_absolute_error")
def mae(raw, target, head="linear"):
    p, t = _flat(_probs(raw, head), target)
    return (p - t).abs().mean(dim=1)


@LOSSES.register("huber", "smooth_l1")
def huber(raw, target, head="linear", delta: float = 1.0):
    p, t = _flat(_probs(raw, head), target)
    return F.huber_loss(p, t, reduction="none", delta=delta).mean(dim=1)


@LOSSES.register("log_cosh", "logcosh")
def log_cosh(raw, target, head="linear"):
    p, t = _flat(_probs(raw, head), target)
    d = p - t
    # log(cosh(d)) = |d| + log1p(exp(-2|d|)) - log 2, stable for large |d|
    return (d.abs() + torch.log1p(torch.exp(-2 * d.abs())) - math.log(2.0)).mean(dim=1)


@LOSSES.register("mape", "mean_absolute_percentage_error")
def mape(raw, target, head="linear"):
    # Keras' mape, in percent: each error relative to the target's own size (at least epsilon).
    p, t = _flat(_probs(raw, head), target)
    return (100 * (p - t).abs() / t.abs().clamp_min(_EPS)).mean(dim=1)


@LOSSES.register("msle", "mean_squared_logarithmic_error")
def msle(raw, target, head="linear"):
    # Keras' msle: values below epsilon read as epsilon, so a negative prediction cannot make a NaN.
    p, t = _flat(_probs(raw, head), target)
    return ((torch.log1p(p.clamp_min(_EPS)) - torch.log1p(t.clamp_min(_EPS))) ** 2).mean(dim=1)


@LOSSES.register("poisson")
def poisson(raw, target, head="linear"):
    # Keras' poisson: the output is the rate itself (a softplus or relu output keeps it positive);
    # epsilon keeps a zero rate finite.
    p, t = _flat(_probs(raw, head), target)
    return (p - t * torch.log(p + _EPS)).mean(dim=1)


def l2_normalize(x: Tensor) -> Tensor:
    """Each row scaled to unit length, as Keras' l2_normalize: a zero row stays zero."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True).clamp_min(1e-12))  # Keras' epsilon


@LOSSES.register("cosine_similarity", "cosine")
def cosine_similarity(raw, target, head="linear"):
    # Keras' sign: minus the cosine of each row's prediction and target, so -1 is a perfect match
    # and lower is better, as for every loss.
    p, t = _flat(_probs(raw, head), target)
    return -(l2_normalize(p) * l2_normalize(t)).sum(dim=1)


@LOSSES.register("binary_crossentropy", "bce", "binary_cross_entropy")
def binary_crossentropy(raw, target, head="sigmoid", from_logits="auto", label_smoothing: float = 0.0):
    z, t = _flat(raw, target)
    t = t * (1 - label_smoothing) + 0.5 * label_smoothing
    if uses_logits(from_logits):
        return F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(dim=1)
    p = _probs(z, head).clamp(_EPS, 1 - _EPS)
    return F.binary_cross_entropy(p, t, reduction="none").mean(dim=1)


def _log_probs(raw: Tensor, head: str, from_logits) -> Tensor:
    if uses_logits(from_logits):
        return softmax_rows(raw, log=True)
    p = _probs(raw, head)
    return torch.log((p / p.sum(dim=-1, keepdim=True)).clamp_min(_EPS))


def _one_hot(target: Tensor, n: int, dtype) -> Tensor:
    if target.dtype.is_floating_point and target.dim() == 2 and target.shape[1] == n:
        return target.to(dtype)  # already a distribution / one-hot
    return F.one_hot(target.reshape(-1).long(), n).to(dtype)


@LOSSES.register("categorical_crossentropy", "cce", "cross_entropy")
def categorical_crossentropy(raw, target, head="softmax", from_logits="auto", label_smoothing: float = 0.0):
    n = raw.shape[-1]
    t = _one_hot(target, n, raw.dtype)
    t = t * (1 - label_smoothing) + label_smoothing / n
    return -(t * _log_probs(raw, head, from_logits)).sum(dim=-1)


@LOSSES.register("sparse_categorical_crossentropy", "scce")
def sparse_categorical_crossentropy(raw, target, head="softmax", from_logits="auto"):
    ids = target.reshape(-1).long()
    if uses_logits(from_logits) and raw.dim() == 2 and raw.device.type == "cpu":
        # The one-pass kernel, whose gradient training without autograd's graph uses. Elsewhere
        # (where that path is not taken) ATen's log_softmax and nll_loss, as before.
        return ops.softmax_cross_entropy(raw, ids)[0]
    return F.nll_loss(_log_probs(raw, head, from_logits), ids, reduction="none")


def _signed(target: Tensor, dtype) -> Tensor:
    t = target.to(dtype)
    return torch.where(t <= 0, -torch.ones_like(t), torch.ones_like(t))  # {0,1} or {-1,1} -> {-1,1}


@LOSSES.register("hinge")
def hinge(raw, target, head="linear"):
    z, t = _flat(raw, target)
    return F.relu(1 - _signed(t, z.dtype) * z).mean(dim=1)


@LOSSES.register("squared_hinge")
def squared_hinge(raw, target, head="linear"):
    z, t = _flat(raw, target)
    return (F.relu(1 - _signed(t, z.dtype) * z) ** 2).mean(dim=1)


@LOSSES.register("categorical_hinge")
def categorical_hinge(raw, target, head="softmax"):
    # Keras' formula, max(0, 1 + best wrong score - true score), on the class scores before a
    # softmax head (as hinge reads margins before a sigmoid).
    t = _one_hot(target, raw.shape[-1], raw.dtype)
    pos = (t * raw).sum(dim=-1)
    neg = ((1 - t) * raw).amax(dim=-1)
    return F.relu(neg - pos + 1)


@LOSSES.register("perceptron")
def perceptron(raw, target, head="step"):
    # Rosenblatt's criterion max(0, -y z), with z = 0 counted as a mistake (as the step
    # unit's z >= 0 -> 1 and scikit-learn's Perceptron do): its SGD step is the perceptron rule,
    # and a zero-initialized unit still learns.
    z, t = _flat(raw, target)
    margin = _signed(t, z.dtype) * z
    return (-margin * (margin <= 0).to(z.dtype)).mean(dim=1)


@LOSSES.register("kl_divergence", "kld", "kullback_leibler_divergence")
def kl_divergence(raw, target, head="softmax", from_logits="auto"):
    t = _one_hot(target, raw.shape[-1], raw.dtype).clamp(_EPS, 1)
    return (t * (t.log() - _log_probs(raw, head, from_logits))).sum(dim=-1)


def weighted_sum(per_sample: Tensor, weight: Tensor | None) -> Tensor:
    """Sum over the rows of weight * loss: adds up over batches and processes."""
    return per_sample.sum() if weight is None else (per_sample * weight).sum()


def weighted_mean(per_sample: Tensor, weight: Tensor | None) -> Tensor:
    """Keras' sum_over_batch_size: mean over the batch of weight * loss."""
    return weighted_sum(per_sample, weight) / per_sample.shape[0]


def loss_fn(name: str, **params) -> Callable[[Tensor, Tensor, str], Tensor]:
    fn = LOSSES[name]
    return lambda raw, target, head: fn(raw, target, head, **params)

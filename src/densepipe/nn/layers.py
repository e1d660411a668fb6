"""Layer builders by type: config -> (module, output width).

A builder receives the layer's config, the widths of its inputs and the build
context (kernel choice, init generator, the width an `auto` output needs).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densepipe import ops
from densepipe.nn.activations import alpha_for, resolve
from densepipe.nn.dense import FusedDense
from densepipe.nn.initializers import initialize
from densepipe.nn.losses import l2_normalize
from densepipe.registry import Registry


@dataclass
class BuildContext:
    kernels: str                       # "fused" or "reference"
    generator: torch.Generator         # seeded: same params -> same initial weights
    auto_units: int | None = None      # width an output layer gets from the data (units: auto)
    activation: str | None = None      # an output layer's activation after its head was split off
    initializer: str | dict | None = None  # model-wide default for layers that name none


LAYERS: Registry[Callable[..., tuple[nn.Module, int]]] = Registry("layer type")


class ReferenceDense(FusedDense):
    """nn.Linear + activation in plain torch: the `kernels: reference` twin of FusedDense,
    with the same parameters (names and layout), so weights move between the two."""

    runs_fused_kernel = False

    def forward(self, x: Tensor) -> Tensor:
        return self.act.reference(F.linear(x, self.weight, self.bias), self.alpha)


def _single(widths: list[int], kind: str) -> int:
    if len(widths) != 1:
        raise ValueError(f"a {kind} layer takes exactly one input, got {len(widths)}")
    return widths[0]


@LAYERS.register("dense")
def build_dense(cfg, widths: list[int], ctx: BuildContext):
    in_w = _single(widths, "dense")
    if cfg.units == "auto":
        if ctx.auto_units is None:
            raise ValueError("units: auto is only allowed on a layer that is a model output")
        units = ctx.auto_units
    else:
        units = cfg.units
    activation = ctx.activation or cfg.activation
    cls = FusedDense if ctx.kernels == "fused" else ReferenceDense
    layer = cls(in_w, units, cfg.use_bias, activation, cfg.alpha)
    explicit = "initializer" in cfg.model_fields_set or ctx.initializer is None
    initialize(layer.weight, cfg.initializer if explicit else ctx.initializer, ctx.generator)
    if layer.bias is not None:
        initialize(layer.bias, cfg.bias_initializer, ctx.generator)
    # (l1, l2) per parameter, summed by DenseModel.penalty().
    layer.penalties = {"weight": (cfg.l1, cfg.l2), "bias": (cfg.bias_l1, cfg.bias_l2)}
    # (l1, l2) on the layer's output, summed over the rows by DenseModel.forward().
    layer.activity = (cfg.activity_l1, cfg.activity_l2)
    # Applied by DenseModel.apply_constraints() after each optimizer step.
    layer.constraints = {"weight": cfg.constraint, "bias": cfg.bias_constraint}
    return layer, units


class Activation(nn.Module):
    def __init__(self, name: str, alpha: float | None):
        super().__init__()
        self.act = resolve(name)
        self.alpha = alpha_for(self.act, alpha)

    def forward(self, x: Tensor) -> Tensor:
        return self.act.reference(x, self.alpha)

    def extra_repr(self) -> str:
        return self.act.name


@LAYERS.register("activation")
def build_activation(cfg, widths, ctx):
    name = ctx.activation or cfg.activation
    return Activation(name, cfg.alpha), _single(widths, "activation")


class PReLU(nn.Module):
    """max(0, x) + alpha * min(0, x) with a learned alpha per unit (Keras' PReLU on a dense
    layer's output) or one for all (`shared`, torch's nn.PReLU()); `weight` is named and laid out
    as nn.PReLU's."""

    def __init__(self, width: int, shared: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1 if shared else width))  # (units,) or (1,)

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.weight)

    def extra_repr(self) -> str:
        return f"num_parameters={self.weight.numel()}"


@LAYERS.register("prelu", "p_relu")
def build_prelu(cfg, widths, ctx):
    width = _single(widths, "prelu")
    layer = PReLU(width, cfg.shared)
    initialize(layer.weight, cfg.alpha_initializer, ctx.generator)
    return layer, width


class MultiplicativeNoise(nn.Module, abc.ABC):
    """A layer that, while training, multiplies its input by noise it draws, `multiplier(x)`
    (None: the identity). Training without autograd's graph (train/direct.py) multiplies by the
    same tensor and backpropagates through it."""

    @abc.abstractmethod
    def multiplier(self, x: Tensor) -> Tensor | None:
        """The tensor training multiplies x by; None where it leaves x as it is."""

    def noised(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x times the noise drawn for it, and that noise (None: x is returned as it is)."""
        noise = self.multiplier(x)
        return (x if noise is None else x * noise), noise

    def forward(self, x: Tensor) -> Tensor:
        return self.noised(x)[0]


class Dropout(MultiplicativeNoise, nn.Dropout):
    """nn.Dropout, its noise drawn on the CPU by the dropout_noise kernel, several times faster
    than torch's Bernoulli draws there; on other devices this is torch's dropout, whose kernel
    fuses mask and product."""

    def multiplier(self, x: Tensor) -> Tensor | None:
        """The tensor training multiplies x by (None: the identity), on the CPU."""
        if not self.training or self.p == 0:
            return None
        return ops.dropout_noise(x, self.p)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if x.device.type == "cpu" else nn.Dropout.forward(self, x)


class GaussianDropout(MultiplicativeNoise):
    """Keras' GaussianDropout: multiplies by N(1, rate / (1 - rate)) noise while training (the
    variance of dropout's own multiplicative noise); the identity at inference."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def multiplier(self, x: Tensor) -> Tensor | None:
        """The tensor training multiplies x by (None: the identity)."""
        if not self.training or self.rate == 0:
            return None
        stddev = (self.rate / (1 - self.rate)) ** 0.5
        return 1 + stddev * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


# Dropout by kind: torch's AlphaDropout is Keras' (it keeps selu's mean and variance).
DROPOUTS = {"dropout": Dropout, "alpha_dropout": nn.AlphaDropout, "gaussian_dropout": GaussianDropout}


def build_dropout(cfg, widths, ctx):
    return DROPOUTS[cfg.type](cfg.rate), _single(widths, cfg.type)


for _kind in DROPOUTS:
    LAYERS.add(_kind, build_dropout, ())


class BatchNorm(nn.BatchNorm1d):
    """nn.BatchNorm1d (same parameters, buffers and state_dict keys) trained as Keras trains
    it: the moving variance follows the batch's biased variance (torch's uses the unbiased
    one), and a batch of one row trains (mean = the row, variance 0, output = beta) where
    torch refuses it, as the last batch of an epoch may hold a single row."""

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C)
        if not self.training:
            return super().forward(x)
        # The op under F.batch_norm, which skips its batch-size check; the running
        # statistics are left to the Keras update below.
        out = torch.batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps,
                               torch.backends.cudnn.enabled)
        self.track(x)
        return out

    @torch.no_grad()
    def track(self, x: Tensor) -> None:
        """Moves the running statistics towards a training batch's (training without autograd's
        graph, train/direct.py, calls it too)."""
        if x.shape[0] > 0:  # an empty batch (a DDP rank with no rows this step) has no statistics
            dims = [d for d in range(x.dim()) if d != 1]           # every axis but the channels
            var, mean = torch.var_mean(x, dims, correction=0)       # (C,), (C,): biased, as Keras
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)


@LAYERS.register("batchnorm", "batch_normalization")
def build_batchnorm(cfg, widths, ctx):
    w = _single(widths, "batchnorm")
    # Keras' momentum m keeps m of the running value; torch's momentum is the new batch's share.
    return BatchNorm(w, eps=cfg.epsilon, momentum=1.0 - cfg.momentum), w


class LayerNorm(nn.Module):
    """Keras' LayerNormalization over the features of each row: (x - mean) / sqrt(var + eps),
    the variance biased, times a learned gain `weight` (gamma) plus a learned offset `bias`
    (beta); either can be left out (scale / center false), which nn.LayerNorm cannot do."""

    def __init__(self, width: int, eps: float, scale: bool, center: bool):
        super().__init__()
        self.width, self.eps = width, eps
        self.weight = nn.Parameter(torch.empty(width)) if scale else None  # (width,)
        self.bias = nn.Parameter(torch.empty(width)) if center else None   # (width,)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.width,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, scale={self.weight is not None}, center={self.bias is not None}"


@LAYERS.register("layernorm", "layer_normalization")
def build_layernorm(cfg, widths, ctx):
    w = _single(widths, "layernorm")
    layer = LayerNorm(w, cfg.epsilon, cfg.scale, cfg.center)
    if layer.weight is not None:
        initialize(layer.weight, cfg.gamma_initializer, ctx.generator)
    if layer.bias is not None:
        initialize(layer.bias, cfg.beta_initializer, ctx.generator)
    return layer, w


class GaussianNoise(nn.Module):
    """Adds N(0, stddev^2) noise while training; the identity at inference."""

    def __init__(self, stddev: float):
        super().__init__()
        self.stddev = stddev

    def forward(self, x: Tensor) -> Tensor:
        return x + self.stddev * torch.randn_like(x) if self.training else x


@LAYERS.register("gaussian_noise")
def build_noise(cfg, widths, ctx):
    return GaussianNoise(cfg.stddev), _single(widths, "gaussian_noise")


# The layers whose training forward draws from torch's global generator: the trainer seeds it
# each epoch (a resumed run draws what the uninterrupted one drew) only for models that hold one.
NOISE_LAYERS = (*DROPOUTS.values(), GaussianNoise)


class ActivityRegularization(nn.Module):
    """Keras' ActivityRegularization: passes its input on unchanged; DenseModel.forward()
    adds l1 * sum|x| + l2 * sum x^2 of it to the loss."""

    def __init__(self, l1: float, l2: float):
        super().__init__()
        self.activity = (l1, l2)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"l1={self.activity[0]}, l2={self.activity[1]}"


@LAYERS.register("activity_regularization")
def build_activity_regularization(cfg, widths, ctx):
    return ActivityRegularization(cfg.l1, cfg.l2), _single(widths, "activity_regularization")


class Concatenate(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=-1)


@LAYERS.register("concatenate", "concat")
def build_concatenate(cfg, widths, ctx):
    return Concatenate(), sum(widths)


@dataclass(frozen=True)
class MergeRule:
    fold: Callable[[Tensor, Tensor], Tensor]   # combines the running result with the next input
    inputs: int | None = None                  # exactly this many inputs; None: one or more
    mean: bool = False                         # divide the fold by the number of inputs


# Element-wise merges, as Keras' merge layers of the same names.
MERGES = {
    "add": MergeRule(torch.add),
    "subtract": MergeRule(torch.sub, inputs=2),   # the first input minus the second
    "multiply": MergeRule(torch.mul),
    "average": MergeRule(torch.add, mean=True),
    "maximum": MergeRule(torch.maximum),
    "minimum": MergeRule(torch.minimum),
}


class Merge(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.rule = kind, MERGES[kind]

    def forward(self, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = self.rule.fold(out, x)
        return out / len(xs) if self.rule.mean else out

    def extra_repr(self) -> str:
        return self.kind


def _merged_width(kind: str, widths: list[int], inputs: int | None) -> int:
    """The one width of an element-wise merge's inputs; refuses another count than `inputs`
    (None: any) or inputs of several widths."""
    what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} layer"
    if inputs is not None and len(widths) != inputs:
        raise ValueError(f"{what} takes exactly {inputs} inputs, got {len(widths)}")
    if len(set(widths)) != 1:
        raise ValueError(f"{what} needs inputs of one width, got {widths}")
    return widths[0]


def build_merge(cfg, widths, ctx):
    return Merge(cfg.type), _merged_width(cfg.type, widths, MERGES[cfg.type].inputs)


for _kind in MERGES:
    LAYERS.add(_kind, build_merge, ())


class Dot(nn.Module):
    """Keras' Dot(axes=1): each row's dot product of two inputs, (N, 1); with normalize, of the
    rows scaled to unit length (the cosine similarity), as Keras' l2_normalize scales them."""

    def __init__(self, normalize: bool):
        super().__init__()
        self.normalize = normalize

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.normalize:
            a, b = l2_normalize(a), l2_normalize(b)
        return (a * b).sum(dim=-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


@LAYERS.register("dot")
def build_dot(cfg, widths, ctx):
    _merged_width("dot", widths, 2)
    return Dot(cfg.normalize), 1

"""Layer builders by type: config -> (module, output width).

A builder receives the layer's config, the widths of its inputs and the build
context (kernel choice, init generator, the width an `auto` output needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densepipe.nn.activations import alpha_for, resolve
from densepipe.nn.dense import FusedDense
from densepipe.nn.initializers import initialize
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


@LAYERS.register("dropout")
def build_dropout(cfg, widths, ctx):
    return nn.Dropout(cfg.rate), _single(widths, "dropout")


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
        if x.shape[0] > 0:  # an empty batch (a DDP rank with no rows this step) has no statistics
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if d != 1]           # every axis but the channels
                var, mean = torch.var_mean(x, dims, correction=0)       # (C,), (C,): biased, as Keras
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        return out


@LAYERS.register("batchnorm", "batch_normalization")
def build_batchnorm(cfg, widths, ctx):
    w = _single(widths, "batchnorm")
    # Keras' momentum m keeps m of the running value; torch's momentum is the new batch's share.
    return BatchNorm(w, eps=cfg.epsilon, momentum=1.0 - cfg.momentum), w


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


class Concatenate(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=-1)


class Add(nn.Module):
    def forward(self, *xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


@LAYERS.register("concatenate", "concat")
def build_concatenate(cfg, widths, ctx):
    return Concatenate(), sum(widths)


@LAYERS.register("add")
def build_add(cfg, widths, ctx):
    if len(set(widths)) != 1:
        raise ValueError(f"an add layer needs inputs of one width, got {widths}")
    return Add(), widths[0]

"""Plain-language flags read off a run: overfitting, underfitting, vanishing or
exploding gradients, dead ReLU units. Each check is a function of the run's
data returning a message or None."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from densepipe.registry import Registry

CHECKS: Registry = Registry("diagnostic")

VANISHING_RATIO = 1e-3   # a layer's gradient this much smaller than the largest layer's
EXPLODING_GROWTH = 1e2   # a layer's gradient norm this many times its first epoch's
DEAD_FRACTION = 0.10     # share of a ReLU layer's units that never fire


@CHECKS.register("overfitting")
def overfitting(ctx):
    h: pd.DataFrame = ctx["history"]
    if "val_loss" not in h or len(h) < 4:
        return None
    best = int(h["val_loss"].idxmin())
    last = len(h) - 1
    val_rise = h["val_loss"].iloc[last] - h["val_loss"].iloc[best]
    train_drop = h["loss"].iloc[best] - h["loss"].iloc[last]
    if best < last - 1 and val_rise > 0.05 * abs(h["val_loss"].iloc[best]) and train_drop > 0:
        best_epoch = int(h["epoch"].iloc[best])
        said = (f"Overfitting: validation loss was lowest at epoch {best_epoch} ({h['val_loss'].iloc[best]:.4g}) "
                f"and rose to {h['val_loss'].iloc[last]:.4g} while the training loss kept falling.")
        if ctx.get("held_epoch") == best_epoch:  # restored best weights or a best-only checkpoint
            return f"{said} The model file holds epoch {best_epoch}, so the test metrics are those of the best one."
        return f"{said} Try early stopping with restore_best_weights, dropout, L2 regularization or fewer units."
    return None


@CHECKS.register("underfitting")
def underfitting(ctx):
    h: pd.DataFrame = ctx["history"]
    if len(h) < 2:
        return None
    first, last = h["loss"].iloc[0], h["loss"].iloc[-1]
    acc = next((h[c].iloc[-1] for c in h.columns if c.endswith("accuracy") and not c.startswith("val_")), None)
    if acc is not None and acc < 0.7:
        return (f"Underfitting: training accuracy ends at {acc:.3f}. The model may be too small, the "
                "learning rate too low, or training too short; try more units/layers or epochs.")
    if last > first:
        return (f"Underfitting: the training loss rose ({first:.4g} -> {last:.4g}). The learning rate may be "
                "too high, or the inputs or target unscaled (scale.numeric, scale.target).")
    if first > 0 and (first - last) / first < 0.1:
        return (f"Underfitting: the training loss barely moved ({first:.4g} -> {last:.4g}). Check the "
                "learning rate and the input scaling, or train longer.")
    return None


def _grad_table(h: pd.DataFrame) -> pd.DataFrame:
    return h[[c for c in h.columns if c.startswith("grad_norm/")]]


@CHECKS.register("vanishing_gradients")
def vanishing(ctx):
    g = _grad_table(ctx["history"])
    if g.shape[1] < 2:
        return None
    mean = g.mean()
    weak = mean[mean < VANISHING_RATIO * mean.max()]
    if weak.empty:
        return None
    names = ", ".join(c.removeprefix("grad_norm/") for c in weak.index)
    return (f"Vanishing gradients: layer(s) {names} get gradients over {1 / VANISHING_RATIO:.0f}x smaller "
            "than the largest layer's, so they barely learn. Try relu-family activations, he/glorot "
            "initialization or batch normalization.")


@CHECKS.register("exploding_gradients")
def exploding(ctx):
    g = _grad_table(ctx["history"])
    if g.empty:
        return None
    # Growth, not size: a norm's scale follows the loss's (an unscaled regression target has large
    # but healthy gradients); one that grows a hundredfold over training is running away.
    growth = g.max() / g.iloc[0].where(g.iloc[0] > 0)
    if not np.isfinite(g.to_numpy()).all():
        said = "a gradient norm became NaN/inf"
    elif (growth > EXPLODING_GROWTH).any():
        layer = growth.idxmax()
        said = (f"the gradient norm of {layer.removeprefix('grad_norm/')} grew {growth.max():.3g}x over "
                f"training (first epoch {g[layer].iloc[0]:.3g}, peak {g[layer].max():.3g})")
    else:
        return None
    return (f"Exploding gradients: {said}. Try gradient clipping (train.clip.norm: 1.0), a lower learning "
            "rate or batch normalization.")


@CHECKS.register("dead_relu")
def dead_relu(ctx):
    dead = ctx.get("dead_units") or {}
    bad = {k: v for k, v in dead.items() if v[0] / max(v[1], 1) > DEAD_FRACTION}
    if not bad:
        return None
    parts = ", ".join(f"{k}: {d}/{n} units" for k, (d, n) in bad.items())
    return (f"Dead ReLU units (never active on the test rows) — {parts}. Try a lower learning rate, "
            "he initialization, or leaky_relu / elu.")


@torch.no_grad()
def count_dead_units(model, inputs: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per ReLU dense layer: (units that output 0 on every row, units)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.layers.items():
        act = getattr(module, "act", None)
        if act is not None and act.name == "relu" and hasattr(module, "weight"):
            hooks.append(module.register_forward_hook(
                lambda m, i, out, name=name: seen.__setitem__(name, (out > 0).any(dim=0))))
    model.eval()
    model(inputs)
    for h in hooks:
        h.remove()
    return {k: (int((~v).sum()), v.numel()) for k, v in seen.items()}


def run_checks(ctx) -> list[tuple[str, str]]:
    return [(name, msg) for name, fn in CHECKS.items() if (msg := fn(ctx))]

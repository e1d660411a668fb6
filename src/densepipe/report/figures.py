"""Report figures, each a function of the run's data returning a matplotlib Figure
(or None when the run has nothing to show for it)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from densepipe.registry import Registry  # noqa: E402

FIGURES: Registry = Registry("figure")


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _curves(ax, history: pd.DataFrame, keys: list[str], title: str, logy: bool = False):
    # matplotlib's default cycle has 10 colours: more curves (a deep net's gradient norms) would repeat
    # them, so those take evenly spaced colours of one map instead.
    colors = plt.cm.turbo(np.linspace(0.05, 0.95, len(keys))) if len(keys) > 10 else [None] * len(keys)
    for k, color in zip(keys, colors, strict=True):
        if k in history:
            ax.plot(history["epoch"], history[k], label=k, color=color,
                    marker="." if len(history) < 30 else None)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _history_figure(ctx, pick, title: str, height: float = 3.5, logy: bool = False):
    """Curves of the history columns that `pick` selects, or None when there are none."""
    h = ctx["history"]
    keys = [c for c in h.columns if pick(c)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, height))
    _curves(ax, h, keys, title, logy=logy and bool((h[keys] > 0).all().all()))
    return fig


_NOT_METRICS = ("epoch", "lr", "epoch_seconds", "samples_per_sec")


@FIGURES.register("loss")
def loss_curves(ctx):
    return _history_figure(ctx, lambda c: c.endswith("loss"), "loss: train vs validation")


@FIGURES.register("metrics")
def metric_curves(ctx):
    return _history_figure(ctx, lambda c: not c.endswith("loss") and c not in _NOT_METRICS
                           and not c.startswith("grad_norm/"), "metrics: train vs validation")


@FIGURES.register("learning_rate")
def lr_curve(ctx):
    return _history_figure(ctx, lambda c: c == "lr", "learning rate", height=2.8, logy=True)


@FIGURES.register("gradient_norms")
def grad_norms(ctx):
    return _history_figure(ctx, lambda c: c.startswith("grad_norm/"),
                           "gradient L2 norm per dense layer (RMS over the epoch's steps)", logy=True)


@FIGURES.register("confusion_matrix")
def confusion(ctx):
    figs = []
    for name, m in ctx["metrics_full"].items():
        cm = m.get("confusion_matrix")
        if cm is None:
            continue
        classes = m["classes"]  # the matrix's order; per_class's keys come back sorted as text
        cm = np.asarray(cm)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"confusion matrix ({name}, test)" if len(ctx["metrics_full"]) > 1 else "confusion matrix (test)")
        figs.append(fig)
    return figs or None


def _plot_tables(ctx, suffix: str):
    return {k: v for k, v in ctx["plots"].items() if k == suffix or k.endswith("_" + suffix)}


def _classes_of(ctx, plot_name: str) -> int:
    """Classes of the output a plot table belongs to ("roc" for one output, "<output>_roc" for several)."""
    outputs = ctx["metrics_full"]
    name = next((o for o in outputs if plot_name == f"{o}_roc"), next(iter(outputs), None))
    return len(outputs.get(name, {}).get("classes", ()))


@FIGURES.register("roc")
def roc(ctx):
    figs = []
    for name, t in _plot_tables(ctx, "roc").items():
        fig, ax = plt.subplots(figsize=(4.5, 4))
        # Several classes: every (row, class) pair as one decision, so the area under this curve is the
        # micro average, while the table's roc_auc is the macro one; the label says which.
        area = float(np.trapezoid(t["tpr"], t["fpr"]))
        kind = "micro-average AUC" if len(t) and _classes_of(ctx, name) > 2 else "AUC"
        ax.plot(t["fpr"], t["tpr"], label=f"model ({kind} {area:.3f})")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC curve ({name}, test{', one-vs-rest' if 'micro' in kind else ''})")
        ax.legend(fontsize=8)
        figs.append(fig)
    return figs or None


@FIGURES.register("residuals")
def residuals(ctx):
    figs = []
    for name, t in _plot_tables(ctx, "residuals").items():
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].scatter(t["actual"], t["predicted"], s=8, alpha=0.6)
        both = t[["actual", "predicted"]].to_numpy()
        lo, hi = float(both.min()), float(both.max())
        axes[0].plot([lo, hi], [lo, hi], "--", color="grey")
        axes[0].set_xlabel("actual")
        axes[0].set_ylabel("predicted")
        axes[0].set_title(f"predicted vs actual ({name})")
        axes[1].scatter(t["predicted"], t["residual"], s=8, alpha=0.6)
        axes[1].axhline(0, color="grey", ls="--")
        axes[1].set_xlabel("predicted")
        axes[1].set_ylabel("residual")
        axes[1].set_title("residuals (test)")
        figs.append(fig)
    return figs or None


@FIGURES.register("weight_histograms")
def weight_histograms(ctx):
    layers = ctx["weights"]
    if not layers:
        return None
    n = len(layers)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, (name, w) in zip(axes.flat, layers.items(), strict=False):
        values = w.reshape(-1)
        lo, hi = float(values.min()), float(values.max())
        if hi - lo < 1e-6 * max(1.0, abs(lo)):  # (near-)constant weights: one visible bar
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(values, bins=min(50, max(5, int(np.sqrt(values.size)))), range=(lo, hi), color="#4c72b0")
        ax.set_title(f"{name} weights", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


@FIGURES.register("reconstructions")
def reconstructions(ctx):
    rec = ctx.get("reconstructions")
    if rec is None:
        return None
    original, restored = rec
    n = min(8, len(original))
    side = int(round(np.sqrt(original.shape[1])))
    square = side * side == original.shape[1]
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8), squeeze=False)
    for i in range(n):
        for row, data in enumerate((original, restored)):
            ax = axes[row, i]
            if square:
                ax.imshow(data[i].reshape(side, side), cmap="gray")
            else:
                ax.bar(range(data.shape[1]), data[i])
            ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    return fig


@FIGURES.register("embedding")
def embedding(ctx):
    t = ctx["plots"].get("embedding")
    if t is None:
        return None
    dims = [c for c in t.columns if c.startswith("dim")]
    labels = [c for c in t.columns if not c.startswith("dim")]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    color = t[labels[0]].astype("category").cat.codes if labels else None
    xy = t[dims[:2]].to_numpy() if len(dims) >= 2 else np.c_[t[dims[0]], np.zeros(len(t))]
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=color, cmap="tab10", s=10)
    if labels:
        ax.legend(*sc.legend_elements(), title=labels[0], fontsize=7, loc="best")
    ax.set_title("bottleneck embedding (test rows, first two dims)")
    return fig


@FIGURES.register("model_graph")
def model_graph(ctx):
    from densepipe.report.model_graph import model_graph_figure

    model = ctx.get("model")
    return None if model is None else model_graph_figure(model)


def render_all(ctx) -> list[tuple[str, bytes]]:
    """(name, png) for every figure that applies to this run."""
    out = []
    for name, fn in FIGURES.items():
        result = fn(ctx)
        figs = result if isinstance(result, list) else ([result] if result is not None else [])
        for i, fig in enumerate(figs):
            out.append((name if len(figs) == 1 else f"{name}_{i + 1}", to_png(fig)))
    return out

"""`densepipe compare`: runs of one model under different settings side by side —
loss curves and per-layer gradient norms in one figure, a metrics table, and
plain-language notes (e.g. the symmetry failure of an all-zeros start)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from densepipe.io import write_bytes, write_json, write_text
from densepipe.report.figures import data_uri, plt, to_png

DEAD_GRADIENT = 1e-12  # a hidden layer whose gradient norm never exceeds this did not learn


def load_histories(folder: Path) -> dict[str, pd.DataFrame]:
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no history CSV files in {folder}")
    return {f.stem: pd.read_csv(f) for f in files}


def figure(histories: dict[str, pd.DataFrame]):
    grad_cols = sorted({c for h in histories.values() for c in h.columns if c.startswith("grad_norm/")})
    fig, axes = plt.subplots(1, 2 + len(grad_cols), figsize=(4.2 * (2 + len(grad_cols)), 3.8), squeeze=False)
    axes = axes[0]
    for name, h in histories.items():
        axes[0].plot(h["epoch"], h["loss"], label=name)
        if "val_loss" in h:
            axes[1].plot(h["epoch"], h["val_loss"], label=name)
        for ax, col in zip(axes[2:], grad_cols, strict=True):
            if col in h:
                # zeros are drawn at the floor so a dead layer stays visible on the log scale
                ax.plot(h["epoch"], np.maximum(h[col], DEAD_GRADIENT), label=name)
    axes[0].set_title("training loss")
    axes[1].set_title("validation loss")
    for ax, col in zip(axes[2:], grad_cols, strict=True):
        ax.set_title(f"gradient norm: {col.removeprefix('grad_norm/')}")
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def summarize(histories: dict[str, pd.DataFrame]) -> tuple[dict, list[str]]:
    table, notes = {}, []
    for name, h in histories.items():
        last = h.iloc[-1]
        row = {k: float(last[k]) for k in h.columns if not k.startswith("grad_norm/") and k != "epoch"
               and k in ("loss", "val_loss", "accuracy", "val_accuracy", "mae", "val_mae")}
        grads = {c.removeprefix("grad_norm/"): float(h[c].max()) for c in h.columns if c.startswith("grad_norm/")}
        row.update({f"max_grad_norm/{k}": v for k, v in grads.items()})
        table[name] = row
        hidden = list(grads)[:-1]  # every dense layer but the output one
        dead = [k for k in hidden if grads[k] <= DEAD_GRADIENT]
        if dead:
            notes.append(f"{name}: hidden layer(s) {', '.join(dead)} never received a gradient. With every "
                         "weight equal, all units of a layer compute the same value and get the same update, "
                         "so the symmetry is never broken and the network behaves like one unit per layer.")
    return table, notes


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="densepipe compare", description=__doc__)
    p.add_argument("--histories", required=True, help="folder of per-run history CSVs (name = file stem)")
    p.add_argument("--out", default="reports/comparison.html")
    p.add_argument("--metrics", default="metrics/comparison.json")
    p.add_argument("--title", default="Runs side by side")
    args = p.parse_args(argv)
    histories = load_histories(Path(args.histories))
    png = to_png(figure(histories))
    table, notes = summarize(histories)
    out = Path(args.out)
    write_bytes(out.with_suffix(".png"), png)
    write_json(args.metrics, table)
    rows = "".join(f"<tr><td>{n}</td>" + "".join(f"<td>{v:.4g}</td>" for v in r.values()) + "</tr>"
                   for n, r in table.items())
    head = "".join(f"<th>{k}</th>" for k in next(iter(table.values())))
    notes_html = "".join(f"<p>{n}</p>" for n in notes)
    write_text(out, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{args.title}</title></head><body>"
                    f"<h1>{args.title}</h1><img alt='comparison' src='{data_uri(png)}'>{notes_html}"
                    f"<table border=1><tr><th>run</th>{head}</tr>{rows}</table></body></html>")
    print(f"compare: {len(histories)} runs -> {out}")
    for n in notes:
        print(f"  ! {n}")

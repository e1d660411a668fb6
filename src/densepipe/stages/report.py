"""report: history, metrics and model -> one self-contained HTML report; the
report and its figures go to the pipeline's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from densepipe import config as config_mod
from densepipe import tracking
from densepipe.checkpoint import load_model
from densepipe.data.arrays import load_arrays, to_split
from densepipe.data.preprocess import RECONSTRUCTION
from densepipe.io import write_bytes, write_text
from densepipe.report.diagnostics import count_dead_units, run_checks
from densepipe.report.figures import render_all
from densepipe.report.html import render
from densepipe.stages.common import load_params


def add_arguments(p) -> None:
    p.add_argument("--model", default="models/model.pt")
    p.add_argument("--data", default="data/processed")
    p.add_argument("--history", default="plots/history.csv")
    p.add_argument("--train-metrics", default="metrics/train.json")
    p.add_argument("--test-metrics", default="metrics/test.json")
    p.add_argument("--plots", default="plots/eval")
    p.add_argument("--out", default="reports/report.html")
    p.add_argument("--run", default="models/run.json")


def _context(args, loaded, max_layers: int) -> dict:
    plots_dir = Path(args.plots)
    features, targets = load_arrays(Path(args.data) / "test.npz")
    split = to_split(features, targets, loaded.preprocessor, loaded.config.model)
    ctx = {
        "history": pd.read_csv(args.history),
        "metrics_full": json.loads((plots_dir / "metrics_full.json").read_text()),
        "plots": {p.stem: pd.read_csv(p) for p in sorted(plots_dir.glob("*.csv"))},
        "weights": {n: m.weight.detach().cpu().numpy()
                    for n, m in list(loaded.model.dense_layers().items())[:max_layers]},
        "dead_units": count_dead_units(loaded.model, split.inputs),
        "model": loaded.model,
    }
    recon = [n for n, h in loaded.model.heads.items()
             if loaded.preprocessor.targets[h.target]["task"] == RECONSTRUCTION]
    if recon:
        with torch.no_grad():
            out = loaded.model.predict(split.inputs)[recon[0]].numpy()
        ctx["reconstructions"] = (split.targets[loaded.model.heads[recon[0]].target].numpy(), out)
    return ctx


def run(args) -> None:
    cfg = load_params(args)
    loaded = load_model(args.model)
    ctx = _context(args, loaded, cfg.report.max_histogram_layers)
    figures = render_all(ctx)
    test_metrics = json.loads(Path(args.test_metrics).read_text())
    train_metrics = json.loads(Path(args.train_metrics).read_text())
    ctx["held_epoch"] = train_metrics.get("epoch")  # the epoch whose weights the model file holds
    flags = run_checks(ctx)
    # One table per classification output: at the top for one output, under each output's name for several.
    per_class = ({"": test_metrics["per_class"]} if isinstance(test_metrics.get("per_class"), dict) else
                 {k: v["per_class"] for k, v in test_metrics.items() if isinstance(v, dict) and "per_class" in v})
    page = render(cfg.report.title, figures, flags, loaded.model.summary(), test_metrics, train_metrics,
                  config_mod.resolved(cfg), per_class)
    out = Path(args.out)
    figure_dir = out.parent / "figures"
    for name, png in figures:
        write_bytes(figure_dir / f"{name}.png", png)
    write_text(out, page)
    tracker = tracking.open_run(args.run)
    tracker.log_artifact(out, "report")
    for name, _ in figures:
        tracker.log_artifact(figure_dir / f"{name}.png", "report/figures")
    tracker.set_tags({"diagnostics": "; ".join(n for n, _ in flags) or "none"})
    tracker.finish()
    print(f"report: {out} ({len(figures)} figures, {len(flags)} warning(s))")
    for _name, msg in flags:
        print(f"  ! {msg}")

"""evaluate: model + test set -> test metrics JSON, plot data, predictions, and the
model logged to MLflow with a signature and an input example."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from densepipe import tracking
from densepipe.checkpoint import load_model
from densepipe.config import ConfigError
from densepipe.data.arrays import load_arrays
from densepipe.data.preprocess import RECONSTRUCTION
from densepipe.evaluate import evaluate_output
from densepipe.io import write_json, write_with
from densepipe.predict import model_outputs, predict_frame
from densepipe.stages.common import load_params

PLOT_ONLY = ("confusion_matrix", "classes")  # kept out of the metrics file: plot data


def add_arguments(p) -> None:
    p.add_argument("--model", default="models/model.pt")
    p.add_argument("--data", default="data/processed")
    p.add_argument("--split", default="data/split")
    p.add_argument("--metrics", default="metrics/test.json")
    p.add_argument("--plots", default="plots/eval", help="folder for confusion/roc/residual CSVs")
    p.add_argument("--predictions", default="predictions/test.csv")
    p.add_argument("--run", default="models/run.json")


def evaluate_model(loaded, features, targets, threshold: float | None = None
                   ) -> tuple[dict, dict[str, pd.DataFrame], dict]:
    """Metrics and plot tables per output, and the raw metrics (with plot-only entries).
    `threshold` defaults to the one saved with the model."""
    pre = loaded.preprocessor
    threshold = loaded.config.evaluate.threshold if threshold is None else threshold
    outs = model_outputs(loaded, features)
    many = len(outs) > 1
    metrics, plots, full = {}, {}, {}
    for name, out in outs.items():
        target = loaded.model.heads[name].target
        spec = pre.targets[target]
        y = targets[target]
        if spec["task"] == "regression":
            out, y = pre.unscale(target, out), pre.unscale(target, y)
        elif spec["task"] != RECONSTRUCTION:
            y = y.reshape(-1)
        m, p = evaluate_output(spec["task"], out, y, spec, threshold)
        full[name] = m
        shown = {k: v for k, v in m.items() if k not in PLOT_ONLY}
        if many:
            metrics[name] = shown
            plots.update({f"{name}_{k}": v for k, v in p.items()})
        else:
            metrics.update(shown)
            plots.update(p)
    return metrics, plots, full


def embedding_table(loaded, features, raw: pd.DataFrame, layer: str) -> pd.DataFrame:
    """The named layer's output on the test rows, with the rows' labels where the data has any."""
    import torch

    from densepipe.data.arrays import input_columns
    if layer not in loaded.model.layers:
        raise ConfigError(f"evaluate.embedding_layer: no layer named '{layer}'; layers: "
                          f"{', '.join(loaded.model.layers)}")
    captured = {}
    hook = loaded.model.layers[layer].register_forward_hook(lambda m, i, out: captured.update(out=out))
    X = torch.from_numpy(features)
    with torch.no_grad():
        loaded.model({n: X[:, idx] for n, idx in input_columns(loaded.preprocessor, loaded.config.model).items()})
    hook.remove()
    emb = captured["out"].cpu().numpy()
    table = pd.DataFrame(emb, columns=[f"dim{i}" for i in range(emb.shape[1])])
    labels = [c for c in raw.columns if c not in loaded.preprocessor.state["features"]]
    for c in labels:
        table[c] = raw[c].to_numpy()
    return table


def run(args) -> None:
    # The evaluate section comes from the current params, not from the config saved in the
    # model file: DVC re-runs only this stage when evaluate.* changes, so the change must
    # show. The architecture and preprocessing still come from the model file.
    settings = load_params(args).evaluate  # a bad params file stops here, before any output is touched
    loaded = load_model(args.model)
    features, targets = load_arrays(Path(args.data) / "test.npz")
    metrics, plots, full = evaluate_model(loaded, features, targets, settings.threshold)
    write_json(args.metrics, metrics)
    write_json(Path(args.plots) / "metrics_full.json", full)
    for name, table in plots.items():
        write_with(Path(args.plots) / f"{name}.csv", lambda p, t=table: t.to_csv(p, index=False))
    raw = pd.read_parquet(Path(args.split) / "test.parquet")
    if settings.embedding_layer:
        table = embedding_table(loaded, features, raw, settings.embedding_layer)
        write_with(Path(args.plots) / "embedding.csv", lambda p: table.to_csv(p, index=False))
    predictions = predict_frame(loaded, raw, settings.threshold)
    shown = pd.concat([raw.reset_index(drop=True), predictions.reset_index(drop=True)], axis=1)
    write_with(args.predictions, lambda p: shown.to_csv(p, index=False))
    tracker = tracking.open_run(args.run)
    # Tags, not params: a re-run with another threshold updates them, as it updates the test metrics.
    tracker.set_tags(tracking.flatten({"evaluate": settings.model_dump(mode="json")}))
    flat = tracking.flatten({"test": metrics})
    tracker.log_metrics({k.replace(".", "_"): float(v) for k, v in flat.items() if _is_number(v)})
    for f in sorted(Path(args.plots).glob("*")):
        tracker.log_artifact(f, "evaluation")
    tracker.log_artifact(args.predictions, "evaluation")
    if tracker.enabled:
        from densepipe.serving import log_model
        features_only = raw.drop(columns=[c for c in loaded.preprocessor.targets if c in raw.columns])
        # The served model decides with the threshold saved in the model file, so the
        # example output shows that one.
        log_model(tracker, args.model, features_only, predict_frame(loaded, features_only.head(5)))
    headline = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"evaluate: test {headline if headline else metrics}")


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False

"""`densepipe <command>`: the pipeline stages and the tools around them."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
from pathlib import Path

import yaml

from densepipe.registry import Registry

COMMANDS: Registry = Registry("command")

# Stage commands live in densepipe.stages.<name> (add_arguments + run).
for _stage in ("split", "scale", "train", "evaluate", "report"):
    COMMANDS.add(_stage, f"densepipe.stages.{_stage}")


def command(name: str):
    def deco(fn):
        COMMANDS.add(name, fn)
        return fn
    return deco


@command("validate")
def validate(argv):
    """Check a params file; print nothing else on success."""
    p = argparse.ArgumentParser(prog="densepipe validate")
    p.add_argument("params", nargs="?", default="params.yaml")
    args = p.parse_args(argv)
    from densepipe.config import load
    load(args.params)
    print(f"{args.params}: ok")


@command("config")
def show_config(argv):
    """Print the params with every default filled in."""
    p = argparse.ArgumentParser(prog="densepipe config")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.add_argument("--resolved", action="store_true", help="fill in defaults (the only mode)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from densepipe.config import load, resolved
    data = resolved(load(args.params))
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end="")


@command("summary")
def summary(argv):
    """A Keras-like table of the model: layer, output shape, parameters."""
    p = argparse.ArgumentParser(prog="densepipe summary")
    # --params as every stage takes it; the positional form is kept for existing scripts.
    p.add_argument("params", nargs="?", default=None)
    p.add_argument("--params", dest="params_option", default=None, metavar="PARAMS",
                   help="the pipeline's params file (default: params.yaml)")
    p.add_argument("--data", default="data/processed", help="processed data (for input/output widths)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the model graph into this PNG file (as Keras' plot_model with show_shapes)")
    args = p.parse_args(argv)
    if args.params and args.params_option and args.params != args.params_option:
        p.error(f"two params files given: {args.params} and --params {args.params_option}; give one")
    params = args.params_option or args.params or "params.yaml"
    from densepipe.summary import model_for_summary, render_summary
    model = model_for_summary(params, args.data)
    print(render_summary(model))
    if args.plot:
        from densepipe.io import write_bytes
        from densepipe.report.figures import to_png
        from densepipe.report.model_graph import model_graph_figure
        write_bytes(Path(args.plot), to_png(model_graph_figure(model)))
        print(f"model graph: {args.plot}")


@command("predict")
def predict(argv):
    """Predict on new raw rows (CSV or Parquet) with a trained model file."""
    p = argparse.ArgumentParser(prog="densepipe predict")
    p.add_argument("--model", default="models/model.pt")
    p.add_argument("--input", required=True, help="CSV or Parquet file with the feature columns")
    p.add_argument("--output", default=None, help="CSV to write (default: print)")
    args = p.parse_args(argv)
    import pandas as pd

    from densepipe.checkpoint import load_model
    from densepipe.data.sources import DataError
    from densepipe.io import write_with
    from densepipe.predict import predict_frame
    path = Path(args.input)
    if not path.exists():
        raise DataError(f"--input: file not found: {path}")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise DataError(f"--input: cannot read {path}: {err}") from None
    out = pd.concat([frame, predict_frame(load_model(args.model), frame)], axis=1)
    if args.output:
        write_with(args.output, lambda p: out.to_csv(p, index=False))
        print(f"predict: {len(out)} row(s) -> {args.output}")
    else:
        print(out.to_csv(index=False), end="")


@command("compare")
def compare(argv):
    """Runs of one model side by side: loss curves, gradient norms, a metrics table."""
    from densepipe.compare import main as compare_main
    compare_main(argv)


@command("sweep")
def sweep(argv):
    """Hyperparameter search: grid, random or optuna trials as DVC experiments under one MLflow parent."""
    from densepipe.sweep import main as sweep_main
    sweep_main(argv)


@command("where")
def where(argv):
    """Say where the report and the MLflow store are, and how to browse them."""
    from densepipe.tracking import project_root, tracking_uri
    p = argparse.ArgumentParser(prog="densepipe where", description=where.__doc__)
    p.add_argument("pipeline", nargs="?", help="the pipeline's folder (default: the nearest one holding a "
                                               "dvc.yaml, from the current folder up to the project root)")
    args = p.parse_args(argv)
    root = project_root()
    folder = Path(args.pipeline).resolve() if args.pipeline else _pipeline_folder(Path.cwd().resolve(), root)
    metrics = folder / "metrics" / "test.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        if "accuracy" in m:
            print(f"test accuracy: {m['accuracy']:.4f}")
    report = folder / "reports" / "report.html"
    state = "open it in a browser" if report.exists() else "not built yet: run dvc repro"
    print(f"report:       {report}  ({state})")
    print(f"MLflow store: {tracking_uri()}")
    print("MLflow UI:    make ui  (then open http://127.0.0.1:5000)")


def _pipeline_folder(cwd: Path, root: Path) -> Path:
    """The nearest folder from cwd up to root with a dvc.yaml (a gallery pipeline, or the root's)."""
    for d in (cwd, *cwd.parents):
        if (d / "dvc.yaml").exists():
            return d
        if d == root:
            break
    return root


def _run_stage(module_name: str, argv: list[str]) -> None:
    from densepipe.stages.common import add_common_arguments
    module = importlib.import_module(module_name)
    p = argparse.ArgumentParser(prog=f"densepipe {module_name.rsplit('.', 1)[-1]}", description=module.__doc__)
    add_common_arguments(p)
    module.add_arguments(p)
    module.run(p.parse_args(argv))


def _user_errors() -> tuple[type[BaseException], ...]:
    from densepipe.config import ConfigError
    from densepipe.data.sources import DataError
    from densepipe.io import UnreadableFile
    from densepipe.train.distributed import WorkerFailure
    from densepipe.train.loop import DivergenceError
    # OSError: a file that cannot be written (permissions, a full disk) is named by its message.
    return ConfigError, DataError, DivergenceError, WorkerFailure, UnreadableFile, OSError


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a queue or a scheduler stopping the job), raised where the process is, as Ctrl-C is, so
    that cleanup runs: the temp file of an output being written is removed."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be handled
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: densepipe <command> [options]\ncommands: " + ", ".join(COMMANDS.names()))
        return 0 if argv else 2
    try:
        target = COMMANDS[argv[0]]
    except ValueError as err:
        print(f"densepipe: {err}", file=sys.stderr)
        return 2
    try:
        if isinstance(target, str):
            _run_stage(target, argv[1:])
        else:
            target(argv[1:])
    except _user_errors() as err:
        print(f"densepipe {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        # Outputs are written atomically and a resume checkpoint is complete or absent: nothing to add.
        how, code = ("terminated", 143) if isinstance(stop, _Terminated) else ("interrupted", 130)
        print(f"densepipe {argv[0]}: {how}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

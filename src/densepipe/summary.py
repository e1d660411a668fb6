"""The Keras-like model summary: layer (type), output shape, parameter count, totals."""

from __future__ import annotations

from pathlib import Path

from densepipe.config import load
from densepipe.data.arrays import data_spec
from densepipe.data.preprocess import Preprocessor
from densepipe.nn.model import DenseModel, build_model
from densepipe.stages.common import as_config_error


def _preprocessor(cfg, data_dir: Path) -> Preprocessor:
    saved = data_dir / "preprocessor.json"
    if saved.exists():
        return Preprocessor.load(saved)
    # No processed data yet: fit on the training part of the source, in memory.
    from densepipe.data.sources import load_source
    from densepipe.data.split import check_table, split_frame
    frame, targets = load_source(cfg.data)
    tasks = check_table(frame, targets, cfg.data.task)
    train, _, _ = split_frame(frame, targets, tasks, cfg.split, cfg.seed)
    recon = cfg.data.task == "reconstruction"
    if recon:
        train, targets, tasks = train.drop(columns=targets), [], {}
    return Preprocessor.fit(train, targets, tasks, cfg.scale, cfg.data.categorical, reconstruction=recon)


def model_for_summary(params: str, data_dir: str) -> DenseModel:
    cfg = load(params)
    pre = _preprocessor(cfg, Path(data_dir))
    spec = as_config_error(data_spec, pre, cfg.model)
    return as_config_error(build_model, cfg.model, cfg.train, spec, cfg.seed)


def render_summary(model: DenseModel) -> str:
    rows = model.summary()
    table = [("Layer (type)", "Output Shape", "Param #", "Connected to")]
    table += [(f"{r['layer']} ({r['type']})", r["output_shape"], f"{r['params']:,}", r["inputs"])
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    line = "-" * (sum(widths) + 6)

    def fmt(row) -> str:
        a, b, c, d = row
        return f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:<{widths[3]}}"
    out = [fmt(table[0]), line, *(fmt(r) for r in table[1:]), line]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    heads = ", ".join(f"{n} -> {h.target} ({h.activation}, {h.loss})" for n, h in model.heads.items())
    out += [f"Total params: {trainable + frozen + buffers:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {frozen + buffers:,}",
            f"Inputs: {', '.join(f'{k} ({v})' for k, v in model.input_widths.items())}",
            f"Outputs: {heads}"]
    return "\n".join(out)

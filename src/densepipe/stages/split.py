"""split: data source -> train / val / test tables (stratified, seeded)."""

from __future__ import annotations

from pathlib import Path

from densepipe.data.sources import load_source
from densepipe.data.split import check_table, split_frame
from densepipe.io import write_json, write_with
from densepipe.stages.common import load_params

SPLITS = ("train", "val", "test")


def add_arguments(p) -> None:
    p.add_argument("--out", default="data/split", help="folder for train/val/test .parquet")


def run(args) -> None:
    cfg = load_params(args)
    frame, targets = load_source(cfg.data)
    tasks = check_table(frame, targets, cfg.data.task)
    parts = split_frame(frame, targets, tasks, cfg.split, cfg.seed)
    out = Path(args.out)
    for name, part in zip(SPLITS, parts, strict=True):
        write_with(out / f"{name}.parquet", lambda p, part=part: part.to_parquet(p, index=True))
    write_json(out / "meta.json", {"targets": targets, "tasks": tasks, "source": cfg.data.source})
    sizes = ", ".join(f"{n} {len(p)}" for n, p in zip(SPLITS, parts, strict=True))
    print(f"split {cfg.data.source}: {len(frame)} rows -> {sizes}; targets {targets} ({tasks})")

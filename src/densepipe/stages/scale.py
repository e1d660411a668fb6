"""scale: fits the preprocessor on train, transforms every split to arrays."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from densepipe.data.arrays import save_arrays
from densepipe.data.preprocess import Preprocessor
from densepipe.data.sources import DataError
from densepipe.data.split import check_table
from densepipe.stages.common import load_params
from densepipe.stages.split import SPLITS


def add_arguments(p) -> None:
    p.add_argument("--split", default="data/split", help="folder with train/val/test .parquet")
    p.add_argument("--out", default="data/processed")


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path} not found; run the split stage first")
    return pd.read_parquet(path)


def run(args) -> None:
    cfg = load_params(args)
    src = Path(args.split)
    frames = {name: _read(src / f"{name}.parquet") for name in SPLITS}
    meta_path = src / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path} not found; run the split stage first")
    targets = json.loads(meta_path.read_text())["targets"]
    tasks = check_table(frames["train"], targets, cfg.data.task)
    reconstruction = cfg.data.task == "reconstruction"
    if reconstruction:  # autoencoders: the label columns are kept out of the inputs
        frames = {k: f.drop(columns=targets) for k, f in frames.items()}
        fit_targets, tasks = [], {}
    else:
        fit_targets = targets
    pre = Preprocessor.fit(frames["train"], fit_targets, tasks, cfg.scale, cfg.data.categorical,
                           reconstruction=reconstruction)
    out = Path(args.out)
    for name, frame in frames.items():
        X = pre.transform(frame)
        save_arrays(out / f"{name}.npz", X, pre.transform_targets(frame, X))
    pre.save(out / "preprocessor.json")
    print(f"scale: {len(pre.feature_names)} features ({cfg.scale.numeric} scaling, "
          f"{cfg.scale.categorical} categoricals, impute {cfg.scale.impute}) fitted on "
          f"{len(frames['train'])} training rows")

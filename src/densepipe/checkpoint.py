"""Model files and resume checkpoints. Both hold only tensors and plain data
(config, preprocessor and data spec as JSON strings), so they load with
torch.load(..., weights_only=True)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from densepipe import config as config_mod
from densepipe.data.preprocess import Preprocessor
from densepipe.io import UnreadableFile, read_or_explain, write_bytes
from densepipe.nn.model import DataSpec, DenseModel, TargetSpec, build_model

MODEL_FORMAT = "densepipe-model/1"
RESUME_FORMAT = "densepipe-resume/1"


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def save_blob(path, blob) -> None:
    """torch.save, byte for byte the same for the same blob: torch names the archive's root
    folder after the file it writes to, and the atomic write's temp name is random, so
    saving to a file would make every run's bytes differ (and DVC re-run what follows).
    A buffer gets the fixed root name 'archive'."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    write_bytes(path, buffer.getvalue())


def config_hash(cfg: config_mod.Config, *sections: str) -> str:
    data = config_mod.resolved(cfg)
    picked = {s: data[s] for s in sections} if sections else data
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def save_model(path, model: DenseModel, cfg: config_mod.Config, pre: Preprocessor, spec: DataSpec,
               epoch: int) -> None:
    blob = {
        "format": MODEL_FORMAT,
        "state_dict": _cpu(model.state_dict()),
        "config": json.dumps(config_mod.resolved(cfg)),
        "preprocessor": pre.to_json(),
        "spec": json.dumps(dataclasses.asdict(spec)),
        "epoch": epoch,
    }
    save_blob(path, blob)


@dataclasses.dataclass
class LoadedModel:
    model: DenseModel
    config: config_mod.Config
    preprocessor: Preprocessor
    spec: DataSpec
    epoch: int


def load_model(path, device: str = "cpu") -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    remedy = "run the train stage again (dvc repro, or densepipe train)"
    blob = read_or_explain(path, lambda p: torch.load(p, map_location=device, weights_only=True),
                           "a densepipe model file", remedy)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        kind = "a resume checkpoint, not" if isinstance(blob, dict) and blob.get("format") == RESUME_FORMAT else "not"
        raise UnreadableFile(f"{path} is {kind} a densepipe model file; {remedy}")
    cfg = config_mod.parse(json.loads(blob["config"]))
    raw = json.loads(blob["spec"])
    spec = DataSpec(raw["inputs"], {k: TargetSpec(**v) for k, v in raw["targets"].items()})
    model = build_model(cfg.model, cfg.train, spec, seed=cfg.seed)
    model.load_state_dict(blob["state_dict"])
    model.to(device).eval()
    return LoadedModel(model, cfg, Preprocessor.from_json(blob["preprocessor"]), spec, blob["epoch"])


def save_resume(path, state: dict, key: str) -> None:
    blob = {"format": RESUME_FORMAT, "key": key, **state, "model": _cpu(state["model"])}
    if state.get("saved_weights") is not None:
        blob["saved_weights"] = _cpu(state["saved_weights"])
    save_blob(path, blob)


def load_resume(path, key: str) -> dict | None:
    """The resume state if `path` holds one for the same config and data, else None."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a damaged checkpoint is not worth failing over: train from scratch)
        print(f"warning: {path} cannot be read ({type(err).__name__}); training starts over", file=sys.stderr)
        return None
    if blob.get("format") != RESUME_FORMAT or blob.get("key") != key:
        return None
    return blob

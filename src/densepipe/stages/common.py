"""What every stage shares: loading params, seeding, user-facing errors."""

from __future__ import annotations

import random

import numpy as np
import torch

from densepipe import config as config_mod
from densepipe.config import ConfigError


def load_params(path: str) -> config_mod.Config:
    return config_mod.load(path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def as_config_error(fn, *args, **kwargs):
    """Runs fn, turning a ValueError about the model's shape into a ConfigError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None

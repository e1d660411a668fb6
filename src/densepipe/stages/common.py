"""What every stage shares: loading params, seeding, user-facing errors."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from densepipe import config as config_mod
from densepipe.config import ConfigError


def add_common_arguments(p) -> None:
    p.add_argument("--params", default="params.yaml", help="the pipeline's params file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. --set model.initializer=zeros (repeatable)")


def load_params(args) -> config_mod.Config:
    return config_mod.load(args.params, args.set)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_algorithms(mode: bool) -> None:
    """torch.use_deterministic_algorithms(mode, warn_only=True), without its import of
    torch._inductor's config: that import loads torch._dynamo, about 2 s of the train stage's
    start on a 2-core machine, in a process that compiles nothing. Inductor's own flag is set where
    inductor is already loaded; loaded later, it reads TORCHINDUCTOR_DETERMINISTIC as usual."""
    torch._C._set_deterministic_algorithms(mode, warn_only=True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = mode


def as_config_error(fn, *args, **kwargs):
    """Runs fn, turning a ValueError about the model's shape into a ConfigError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None

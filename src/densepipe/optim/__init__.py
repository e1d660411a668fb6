"""Fused optimizers and gradient clipping on densepipe's multi-tensor kernels.

Drop-in replacements for torch.optim.SGD / Adagrad / RMSprop / Adam / AdamW / NAdam / Adamax and
torch.nn.utils.clip_grad_norm_ / clip_grad_value_: same arguments, same state
layout (state_dicts load in either direction), one kernel call per parameter group.
"""

from densepipe.optim.adagrad import Adagrad
from densepipe.optim.adam import Adam, AdamW
from densepipe.optim.clip import clip_grad_norm_, clip_grad_value_, get_total_norm
from densepipe.optim.nadam import Adamax, NAdam
from densepipe.optim.optimizer import FusedOptimizer
from densepipe.optim.rmsprop import RMSprop
from densepipe.optim.sgd import SGD

OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW, "nadam": NAdam,
              "adamax": Adamax}

__all__ = ["OPTIMIZERS", "SGD", "Adagrad", "Adam", "AdamW", "Adamax", "FusedOptimizer", "NAdam", "RMSprop",
           "clip_grad_norm_", "clip_grad_value_", "get_total_norm"]

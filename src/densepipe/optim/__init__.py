"""Fused optimizers. Until the kernels land, torch.optim's classes stand in with the same API."""

from torch.optim import SGD, Adagrad, Adam, AdamW, RMSprop  # noqa: F401
from torch.nn.utils import clip_grad_norm_, clip_grad_value_  # noqa: F401

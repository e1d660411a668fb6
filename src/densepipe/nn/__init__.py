"""Layers, activations and model building blocks."""

from densepipe.nn.activations import ACTIVATIONS, FUSED, resolve
from densepipe.nn.dense import FusedDense

__all__ = ["ACTIVATIONS", "FUSED", "FusedDense", "resolve"]

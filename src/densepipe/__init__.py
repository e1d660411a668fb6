"""densepipe: declarative, reproducible training of dense neural networks."""

from densepipe import ops  # noqa: F401  (registers the custom ops)
from densepipe.optim import _ops as _optim_ops  # noqa: F401  (fake kernels of the optimizer ops)

__version__ = "0.1.0"

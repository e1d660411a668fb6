"""densepipe: declarative, reproducible training of dense neural networks."""

from densepipe import ops  # noqa: F401  (registers the custom ops)

__version__ = "0.1.0"

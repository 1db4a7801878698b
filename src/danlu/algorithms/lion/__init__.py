"""Lion (docs/optimizers/lion.md)."""

from danlu.algorithms.lion.functional import lion
from danlu.algorithms.lion.optimizer import Lion

__all__ = ["Lion", "lion"]

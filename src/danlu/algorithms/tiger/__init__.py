"""Tiger (docs/optimizers/tiger.md)."""

from danlu.algorithms.tiger.functional import tiger, tiger_step_size
from danlu.algorithms.tiger.optimizer import Tiger

__all__ = ["Tiger", "tiger", "tiger_step_size"]

"""AdamW (docs/optimizers/adamw.md)."""

from danlu.algorithms.adamw.functional import adamw
from danlu.algorithms.adamw.optimizer import AdamW

__all__ = ["AdamW", "adamw"]

"""AdaX (docs/optimizers/adax.md)."""

from danlu.algorithms.adax.functional import adax, adax_beta2_hat
from danlu.algorithms.adax.optimizer import AdaX

__all__ = ["AdaX", "adax", "adax_beta2_hat"]

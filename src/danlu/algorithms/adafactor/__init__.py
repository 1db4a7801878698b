"""AdaFactor (docs/optimizers/adafactor.md)."""

from danlu.algorithms.adafactor.functional import (
    adafactor,
    adafactor_beta2,
    adafactor_factored_axes,
    adafactor_step_size,
)
from danlu.algorithms.adafactor.optimizer import AdaFactor

__all__ = [
    "AdaFactor",
    "adafactor",
    "adafactor_beta2",
    "adafactor_factored_axes",
    "adafactor_step_size",
]

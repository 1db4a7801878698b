"""The math of each algorithm as pure functions: tensors in, tensors updated in place.

Nothing here knows about param groups; the shells in ``danlu.optim`` call these.
"""

from danlu.functional.adafactor import (
    adafactor,
    adafactor_beta2,
    adafactor_factored_axes,
    adafactor_step_size,
)
from danlu.functional.adamw import adamw
from danlu.functional.adax import adax, adax_beta2_hat
from danlu.functional.amos import amos, amos_default_eta, amos_slot_shape
from danlu.functional.lion import lion
from danlu.functional.nonfinite import finite_flags, finite_mask, shrink_
from danlu.functional.tiger import tiger, tiger_step_size

__all__ = [
    "adafactor",
    "adafactor_beta2",
    "adafactor_factored_axes",
    "adafactor_step_size",
    "adamw",
    "adax",
    "adax_beta2_hat",
    "amos",
    "amos_default_eta",
    "amos_slot_shape",
    "finite_flags",
    "finite_mask",
    "lion",
    "shrink_",
    "tiger",
    "tiger_step_size",
]

"""The math of each algorithm as pure functions: tensors in, tensors updated in place.

Nothing here knows about param groups. Each function lives in its algorithm's package,
``danlu.algorithms.<name>``; this module gathers them.
"""

from danlu.algorithms.adafactor import (
    adafactor,
    adafactor_beta2,
    adafactor_factored_axes,
    adafactor_step_size,
)
from danlu.algorithms.adamw import adamw
from danlu.algorithms.adax import adax, adax_beta2_hat
from danlu.algorithms.amos import amos, amos_default_eta, amos_slot_shape
from danlu.algorithms.lion import lion
from danlu.algorithms.tiger import tiger, tiger_step_size
from danlu.core.nonfinite import finite_flags, finite_mask, shrink_

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

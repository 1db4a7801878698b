"""The math of each algorithm as pure functions: tensors in, tensors updated in place.

Nothing here knows about param groups; the shells in ``danlu.optim`` call these.
"""

from danlu.functional.adamw import adamw
from danlu.functional.lion import lion
from danlu.functional.nonfinite import finite_flags, shrink_
from danlu.functional.tiger import tiger, tiger_step_size

__all__ = ["adamw", "finite_flags", "lion", "shrink_", "tiger", "tiger_step_size"]

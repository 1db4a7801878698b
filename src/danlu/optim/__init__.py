"""danlu's optimizers: thin shells over ``danlu.functional``."""

from danlu.optim.adamw import AdamW
from danlu.optim.lion import Lion
from danlu.optim.tiger import Tiger

__all__ = ["AdamW", "Lion", "Tiger"]

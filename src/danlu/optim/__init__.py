"""danlu's optimizers: thin shells over ``danlu.functional``."""

from danlu.optim.adafactor import AdaFactor
from danlu.optim.adamw import AdamW
from danlu.optim.adax import AdaX
from danlu.optim.amos import Amos
from danlu.optim.lion import Lion
from danlu.optim.tiger import Tiger

__all__ = ["AdaFactor", "AdaX", "AdamW", "Amos", "Lion", "Tiger"]

"""danlu's optimizers, gathered from their packages ``danlu.algorithms.<name>``."""

from danlu.algorithms.adafactor import AdaFactor
from danlu.algorithms.adamw import AdamW
from danlu.algorithms.adax import AdaX
from danlu.algorithms.amos import Amos
from danlu.algorithms.lion import Lion
from danlu.algorithms.tiger import Tiger

__all__ = ["AdaFactor", "AdaX", "AdamW", "Amos", "Lion", "Tiger"]

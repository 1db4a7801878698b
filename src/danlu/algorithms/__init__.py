"""One package per algorithm: its shell class (``optimizer``), its rule and functional entry
(``functional``), its fast paths (``fast``, ``triton``). Importing this package registers every
optimizer in ``danlu.registry``."""

from danlu.algorithms.adafactor import AdaFactor
from danlu.algorithms.adamw import AdamW
from danlu.algorithms.adax import AdaX
from danlu.algorithms.amos import Amos
from danlu.algorithms.lion import Lion
from danlu.algorithms.tiger import Tiger

__all__ = ["AdaFactor", "AdaX", "AdamW", "Amos", "Lion", "Tiger"]

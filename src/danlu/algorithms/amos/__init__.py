"""Amos (docs/optimizers/amos.md)."""

from danlu.algorithms.amos.functional import amos, amos_default_eta, amos_slot_shape
from danlu.algorithms.amos.optimizer import Amos

__all__ = ["Amos", "amos", "amos_default_eta", "amos_slot_shape"]

"""One package per algorithm (docs/reference/algorithms.md): ``rule`` (its hyper-parameters and
update rule), ``optimizer`` (the class and its ``register(...)`` record), ``functional``, and its
fast paths (``fast``, ``triton``). Importing this package imports every home found here, which
registers each optimizer in ``danlu.registry``: a new home needs no line in this file."""

import importlib
import pkgutil

HOMES = tuple(
    sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)  # type: ignore[name-defined]
)
for _home in HOMES:
    importlib.import_module(f"{__name__}.{_home}")

__all__ = ["HOMES"]

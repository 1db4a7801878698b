"""Paths that take an algorithm's hyper-parameters as one frozen dataclass (``LionHyper``,
``AdaXHyper``, ...) and can still be called with its fields as keywords."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def accepts_keywords(hyper_type: type) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let a path ``fn(*tensor_lists, hyper, **extra)`` also be called with the fields of the
    dataclass ``hyper_type`` as keywords (``lr=..., beta1=..., ...``, as the parity tests and
    older callers do): they build the one ``hyper`` (through ``hyper_type.of`` where the type
    checks its fields there); every other keyword passes through."""
    names = frozenset(field.name for field in dataclasses.fields(hyper_type))
    build = getattr(hyper_type, "of", hyper_type)

    def decorate(path: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(path)
        def call(*args: Any, **kwargs: Any) -> Any:
            if "hyper" not in kwargs and not any(isinstance(a, hyper_type) for a in args):
                fields = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
                kwargs["hyper"] = build(**fields)
            return path(*args, **kwargs)

        return call

    return decorate

"""The base of each algorithm's hyper-parameter dataclass (``LionHyper``, ``AdaXHyper``, ...):
the values of one step, built once per call and handed to every path as one object."""

from __future__ import annotations

from typing import Any, TypeVar

H = TypeVar("H", bound="StepHyper")


class StepHyper:
    """Mixin of the frozen dataclasses that hold one step's hyper-parameters."""

    @classmethod
    def given(cls: type[H], hyper: H | None, keywords: dict[str, Any]) -> H:
        """``hyper``, or one built from its fields passed as keywords (``lr=..., ...``): the
        private path functions take either form, the keyword one being the way their parity
        tests and ``upcast_step`` call them."""
        if hyper is None:
            return cls(**keywords)
        if keywords:
            raise TypeError(
                f"pass either a {cls.__name__} or its fields as keywords, not both "
                f"(got {cls.__name__} and {sorted(keywords)})"
            )
        return hyper

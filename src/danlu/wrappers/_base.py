"""The shared shell of danlu's wrappers: an ``Optimizer`` that holds another one.

A wrapper *is* a ``torch.optim.Optimizer`` (so ``torch.optim.lr_scheduler`` accepts it) whose
``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects: a scheduler
writing ``group["lr"]`` changes the inner lr. It never reaches into the inner optimizer's math.

``state_dict()`` is the inner optimizer's state dict with one extra key, ``"danlu_wrappers"``:
a list of records, innermost first, one per wrapper, holding the wrapper's own counters and
buffers. ``load_state_dict`` pops its record and hands the rest inward, so nested wrappers
resume bit-for-bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["WRAPPERS_KEY", "OptimizerWrapper", "iter_params", "unwrap"]

WRAPPERS_KEY = "danlu_wrappers"


def init_optimizer_hooks(opt: Optimizer) -> None:
    """The bookkeeping ``Optimizer.__init__`` sets up, for subclasses that do not call it."""
    opt._optimizer_step_pre_hooks = OrderedDict()
    opt._optimizer_step_post_hooks = OrderedDict()
    opt._optimizer_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_state_dict_post_hooks = OrderedDict()
    opt._optimizer_load_state_dict_pre_hooks = OrderedDict()
    opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    opt._patch_step_function()


def iter_params(opt: Optimizer) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """(group, param) for every parameter of ``opt``, in state-dict order."""
    for group in opt.param_groups:
        for p in group["params"]:
            yield group, p


def unwrap(opt: Optimizer) -> Iterator[Optimizer]:
    """``opt`` and then each optimizer it wraps, outermost first."""
    while True:
        yield opt
        if not isinstance(opt, OptimizerWrapper):
            return
        opt = opt.optimizer


def check_optimizer(name: str, value: Any) -> None:
    if not isinstance(value, Optimizer):
        raise ValueError(
            f"{name} must be a torch.optim.Optimizer instance, got {type(value).__name__}"
        )


class OptimizerWrapper(Optimizer):
    """Base class: delegates everything to ``self.optimizer``; subclasses override ``step`` and
    may keep their own state through ``_wrapper_state`` / ``_load_wrapper_state``."""

    def __init__(self, optimizer: Optimizer) -> None:
        check_optimizer("optimizer", optimizer)
        self.optimizer = optimizer
        init_optimizer_hooks(self)

    # -- the inner optimizer's objects, shared ----------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)

    def _call_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # -- checkpoints ------------------------------------------------------------------------------
    def _wrapper_state(self) -> dict[str, Any]:
        """This wrapper's own counters and buffers (tensors may be included)."""
        return {}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        """Raise ValueError if ``record`` cannot be loaded (called before anything changes)."""

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        """Restore what ``_wrapper_state`` returned (after the inner optimizer was loaded)."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = dict(self.optimizer.state_dict())
        record = {"type": type(self).__name__, **self._wrapper_state()}
        out[WRAPPERS_KEY] = [*out.get(WRAPPERS_KEY, []), record]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        records = list(state_dict.get(WRAPPERS_KEY, []))
        name = type(self).__name__
        if not records or not isinstance(records[-1], dict) or records[-1].get("type") != name:
            found = records[-1].get("type") if records and isinstance(records[-1], dict) else None
            raise ValueError(
                f"state_dict was not saved from a danlu.{name} (its outermost wrapper record is "
                f"{found!r}); to load a bare optimizer's state, call "
                f"wrapper.optimizer.load_state_dict(...)"
            )
        record = records.pop()
        self._check_wrapper_state(record)
        inner = {k: v for k, v in state_dict.items() if k != WRAPPERS_KEY}
        if records:
            inner[WRAPPERS_KEY] = records
        self.optimizer.load_state_dict(inner)
        self._load_wrapper_state(record)

    # -- plumbing ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def _param_index(self) -> dict[int, tuple[int, Tensor]]:
        """id(param) → (state-dict index, param)."""
        return {id(p): (i, p) for i, (_, p) in enumerate(iter_params(self))}

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
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.core.window import WindowedOptimizer

__all__ = ["WRAPPERS_KEY", "OptimizerWrapper", "all_or_nothing", "iter_params", "unwrap"]

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


def _optimizers_within(opt: Optimizer) -> Iterator[Optimizer]:
    """``opt`` and every optimizer it holds: the wrapped one, a MultiOptimizer's inner ones."""
    yield opt
    if isinstance(opt, OptimizerWrapper):
        yield from _optimizers_within(opt.optimizer)
    inner = vars(opt).get("optimizers")
    if isinstance(inner, Mapping):
        for child in inner.values():
            if isinstance(child, Optimizer):
                yield from _optimizers_within(child)


@contextmanager
def all_or_nothing(opt: Optimizer) -> Iterator[None]:
    """Put ``opt``, every optimizer inside it and its parameters' ``.grad`` back as they were if
    the block raises. Loads replace an optimizer's ``state`` and ``param_groups`` (and a
    wrapper's counters) by new objects, never change them in place, so keeping the old
    attributes is enough."""
    saved = [(o, dict(vars(o))) for o in _optimizers_within(opt)]
    grads = [(p, p.grad) for _, p in iter_params(opt)]
    try:
        yield
    except BaseException:
        for o, attributes in saved:
            vars(o).clear()
            vars(o).update(attributes)
        for p, grad in grads:
            p.grad = grad
        raise


def check_gradients(opt: Optimizer, who: str) -> None:
    """Raise ValueError, naming the parameter, for a gradient whose dtype, shape or device is
    not its parameter's (before a wrapper writes anything)."""
    for index, (group, p) in enumerate(iter_params(opt)):
        grad = p.grad
        if grad is None or (grad.dtype, grad.shape, grad.device) == (p.dtype, p.shape, p.device):
            continue
        names = group.get("param_names")
        position = next(i for i, q in enumerate(group["params"]) if q is p)
        name = names[position] if names is not None and position < len(names) else None
        label = repr(name) if name else f"parameter {index}"
        raise ValueError(
            f"{who}: the gradient of {label} (shape {tuple(p.shape)}) has dtype {grad.dtype}, "
            f"shape {tuple(grad.shape)} on {grad.device}; it must have the parameter's "
            f"({p.dtype}, {tuple(p.shape)} on {p.device})"
        )


def check_before_step(opt: Optimizer, who: str) -> None:
    """Run every check of the coming step of ``opt`` (gradients, and the first phase of each
    danlu optimizer inside it) without writing anything: for wrappers that change something
    before the inner step (divide the gradients, zero the lr) or step several optimizers."""
    from danlu.core.shell import DanluOptimizer

    with ExitStack() as stack:
        for inner in _optimizers_within(opt):
            if isinstance(inner, OptimizerWrapper):
                stack.enter_context(inner._checking())
        check_gradients(opt, who)
        for inner in _optimizers_within(opt):
            if isinstance(inner, DanluOptimizer):
                inner._checked_step_inputs()


def run_state_dict_hooks(opt: Optimizer, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()`` between ``opt``'s state_dict pre- and post-hooks, as torch.optim does."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    out = build()
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, out)
        if result is not None:
            out = result
    return out


def load_with_hooks(
    opt: Optimizer, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]
) -> None:
    """``load(state_dict)`` all-or-nothing, between ``opt``'s load_state_dict hooks."""
    state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    with all_or_nothing(opt):
        load(state_dict)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


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

    def _checking(self) -> AbstractContextManager[Any]:
        """The context in which an outer wrapper checks the optimizers inside this one before
        stepping (``check_before_step``): what this wrapper would hand them (``Lazy``: a dense
        stand-in for a table's sparse gradient). Raises ValueError for what its own step
        would refuse."""
        return nullcontext()

    # -- checkpoints ------------------------------------------------------------------------------
    def _wrapper_state(self) -> dict[str, Any]:
        """This wrapper's own counters and buffers (tensors may be included)."""
        return {}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        """Raise ValueError if ``record`` cannot be loaded (called before anything changes)."""

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        """Restore what ``_wrapper_state`` returned (after the inner optimizer was loaded)."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return run_state_dict_hooks(self, self._state_dict)

    def _state_dict(self) -> dict[str, Any]:
        out = dict(self.optimizer.state_dict())
        record = {"type": type(self).__name__, **self._wrapper_state()}
        out[WRAPPERS_KEY] = [*out.get(WRAPPERS_KEY, []), record]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` of the same wrappers around the same optimizer; all or
        nothing: if any part (a wrapper's record, the inner optimizer's state) cannot be
        loaded, ValueError and everything stays as it was."""
        load_with_hooks(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        records = state_dict.get(WRAPPERS_KEY, [])
        records = list(records) if isinstance(records, list | tuple) else []
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


def counts_windows(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` (or one it wraps or holds) keeps an accumulation window (the
    optimizers' ``grad_accum_steps``, ``danlu.UpdateEvery``), so that its ``step()`` must be
    called once per micro-batch even when no parameter has a gradient."""
    from danlu.wrappers.accumulation import UpdateEvery
    from danlu.wrappers.multi import MultiOptimizer

    for opt in unwrap(optimizer):
        if isinstance(opt, WindowedOptimizer) or (isinstance(opt, UpdateEvery) and opt.steps > 1):
            return True
        if isinstance(opt, MultiOptimizer):
            return any(counts_windows(part) for part in opt.optimizers.values())
    return False

"""The one mechanism of danlu's wrappers: an ``Optimizer`` that holds other optimizers.

Every wrapper (``GradientAccumulation``, ``UpdateEvery``, ``Lazy``, ``NonFiniteGuard``,
``StepInBackward``, ``MultiOptimizer``, ``danlu.lora.LoRAPro``) is a :class:`WrapperBase`. A
wrapper *is* a ``torch.optim.Optimizer`` (so ``torch.optim.lr_scheduler`` accepts it) whose
``param_groups``, ``state`` and ``defaults`` are those of the optimizers it holds: a scheduler
writing ``group["lr"]`` changes the inner lr. It never reaches into the inner optimizer's math.

What a wrapper can do, and what it asks of what it wraps, is declared on its class as
*capabilities* (the class attributes and methods under "capabilities" below); the checks
that combine wrappers (``NonFiniteGuard`` outside an accumulation, ``step_in_backward``,
``Lazy``'s row windows, the distributed checkpoint helpers, :func:`unwrap`,
:func:`counts_windows`) read them and never ask for a wrapper's type, so a wrapper written
outside danlu takes part by declaring its capabilities.

``state_dict()`` of a :class:`OptimizerWrapper` is the inner optimizer's state dict with one
extra key, ``"danlu_wrappers"``: a list of records, innermost first, one per wrapper that
``records_state``, holding the wrapper's own counters and buffers. ``load_state_dict`` pops
its record and hands the rest inward, so nested wrappers resume bit-for-bit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

__all__ = [
    "WRAPPERS_KEY",
    "OptimizerWrapper",
    "WrapperBase",
    "all_or_nothing",
    "counts_windows",
    "iter_params",
    "unwrap",
]

WRAPPERS_KEY = "danlu_wrappers"

_MISSING = object()

#: The checkpoint hooks a wrapper keeps in its own registry (its state_dict and load_state_dict
#: are its own; torch's step hooks stay torch's).
_HOOK_KINDS = ("state_dict_pre", "state_dict_post", "load_state_dict_pre", "load_state_dict_post")


def iter_params(opt: Optimizer) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """(group, param) for every parameter of ``opt``, in state-dict order."""
    for group in opt.param_groups:
        for p in group["params"]:
            yield group, p


def unwrap(opt: Optimizer) -> Iterator[Optimizer]:
    """``opt`` and then each optimizer it wraps, outermost first; stops at an optimizer that is
    no wrapper or that ``holds_several``."""
    while True:
        yield opt
        if not isinstance(opt, WrapperBase) or opt.holds_several:
            return
        (opt,) = opt.parts().values()


def _optimizers_within(opt: Optimizer) -> Iterator[Optimizer]:
    """``opt`` and every optimizer it holds, recursively (a wrapper's ``parts()``)."""
    yield opt
    if isinstance(opt, WrapperBase):
        for part in opt.parts().values():
            yield from _optimizers_within(part)


def counts_windows(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` (or one it wraps or holds) keeps an accumulation window (declares
    ``keeps_window()``: the optimizers with ``grad_accum_steps``, ``danlu.UpdateEvery``,
    ``danlu.GradientAccumulation``), so that its ``step()`` must be called once per micro-batch
    even when no parameter has a gradient."""
    for opt in unwrap(optimizer):
        keeps = getattr(opt, "keeps_window", None)
        if callable(keeps) and keeps():
            return True
    return False


@contextmanager
def all_or_nothing(opt: Optimizer) -> Iterator[None]:
    """Put ``opt``, every optimizer inside it and its parameters' ``.grad`` back as they were if
    the block raises. Loads replace an optimizer's ``state`` and ``param_groups`` (and a
    wrapper's counters) by new objects, never change them in place, so rebinding the
    attributes that changed (and dropping new ones) is enough."""
    saved = [(o, dict(vars(o))) for o in _optimizers_within(opt)]
    grads = [(p, p.grad) for _, p in iter_params(opt)]
    try:
        yield
    except BaseException:
        for o, attributes in saved:
            now = vars(o)
            for name in [name for name in now if name not in attributes]:
                del now[name]
            for name, value in attributes.items():
                if now.get(name, _MISSING) is not value:
                    now[name] = value
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
            if isinstance(inner, WrapperBase):
                stack.enter_context(inner._checking())
        check_gradients(opt, who)
        for inner in _optimizers_within(opt):
            if isinstance(inner, DanluOptimizer):
                inner._checked_step_inputs()


def check_optimizer(name: str, value: Any) -> None:
    if not isinstance(value, Optimizer):
        raise ValueError(
            f"{name} must be a torch.optim.Optimizer instance, got {type(value).__name__}"
        )


class WrapperBase(Optimizer):
    """The base of every danlu wrapper: an ``Optimizer`` made of the optimizers it holds.

    Subclasses give ``parts()``, ``param_groups``, ``state``, ``defaults``, ``step``,
    ``zero_grad``, ``add_param_group``, ``_state_dict`` and ``_load`` (the last two run between
    the checkpoint hooks, the load all or nothing), and declare their capabilities.

    torch's own bookkeeping (step hooks, profiling) is set up by ``Optimizer.__setstate__``,
    torch's entry for an optimizer built without its constructor (a pickle): a wrapper's
    ``param_groups`` are not its own, so ``Optimizer.__init__`` cannot run on it, and danlu
    writes none of torch's private attributes. ``register_step_pre_hook`` and
    ``register_step_post_hook`` are torch's; the four checkpoint hooks
    (``register_state_dict_pre_hook`` ...) are kept in the wrapper's own registry, with
    torch's signatures and order (``prepend``), since ``state_dict`` and ``load_state_dict``
    are the wrapper's own.
    """

    # -- capabilities ---------------------------------------------------------------------------
    #: Holds several optimizers over disjoint parameters (``parts()``), each parameter stepped
    #: by its ``owner(p)``: :func:`unwrap` stops here, ``step_in_backward`` and the distributed
    #: checkpoint helpers take the parts one by one, and it may not hold another such wrapper.
    holds_several: ClassVar[bool] = False
    #: Keeps the gradients of the micro-batches (their running sum) between ``step()`` calls
    #: and steps what it wraps only on the call that ends its window (``ends_window()``):
    #: ``_coming_gradient`` and ``_holds_gradient`` say what it holds. A wrapper that
    #: ``withholds_gradients`` must be inside it (it checks each window's mean gradient).
    holds_gradients: ClassVar[bool] = False
    #: Steps what it wraps on every call, but the parameters move only on the call that ends
    #: its window, where a parameter with a gradient earlier in the window and none now is
    #: stepped with a zero gradient (``danlu.UpdateEvery``).
    carries_window: ClassVar[bool] = False
    #: May withhold some gradients from what it wraps on a step (``_withheld``): a
    #: ``danlu.NonFiniteGuard`` skipping non-finite ones.
    withholds_gradients: ClassVar[bool] = False
    #: Adds a record of its own to ``state_dict()`` under ``"danlu_wrappers"`` (False: its
    #: state dict is exactly what it wraps'; the distributed helpers then skip it).
    records_state: ClassVar[bool] = True

    def parts(self) -> dict[str, Optimizer]:
        """The optimizers this wrapper holds, by name."""
        raise NotImplementedError

    def owner(self, p: Tensor) -> Optimizer | None:
        """The optimizer among ``parts()`` that updates ``p`` (None if none does)."""
        for opt in self.parts().values():
            if any(q is p for _, q in iter_params(opt)):
                return opt
        return None

    def keeps_window(self) -> bool:
        """Whether ``step()`` counts micro-batches: call it once per micro-batch, even when no
        parameter has a gradient (see :func:`counts_windows`)."""
        return False

    def ends_window(self) -> bool:
        """Whether the coming ``step()`` ends this wrapper's window (always, without one)."""
        return True

    def refuses_per_parameter(self, where: str) -> str | None:
        """Why this wrapper's step cannot be split into steps of one parameter at a time
        (``step_in_backward``), as an error message about ``where``; None when it can."""
        return None

    def _withheld(
        self, gradient: Callable[[Tensor], Tensor | None], among: Collection[Tensor]
    ) -> tuple[set[int], bool]:
        """(ids of the parameters among ``among`` whose gradient, ``gradient(p)``, the coming
        step withholds from what it wraps; whether it then pulls them toward their centre).
        Computed, nothing written; for ``withholds_gradients``."""
        return set(), False

    def _coming_gradient(self, p: Tensor, grad: Tensor | None) -> Tensor | None:
        """The gradient of ``p`` that this wrapper's coming ``step()`` hands on when ``p``'s
        gradient now is ``grad`` (``holds_gradients``: with the running sum); nothing written."""
        return grad

    def _holds_gradient(self, p: Tensor) -> bool:
        """Whether this wrapper holds ``p``'s gradient as a running sum now."""
        return False

    def _checking(self) -> AbstractContextManager[Any]:
        """The context in which an outer wrapper checks the optimizers inside this one before
        stepping (``check_before_step``): what this wrapper would hand them (``Lazy``: a dense
        stand-in for a table's sparse gradient). Raises ValueError for what its own step
        would refuse."""
        return nullcontext()

    def _wrapper_state(self) -> dict[str, Any]:
        """This wrapper's own counters and buffers (tensors may be included)."""
        return {}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        """Raise ValueError if ``record`` cannot be loaded (called before anything changes)."""

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        """Restore what ``_wrapper_state`` returned (after the inner optimizer was loaded)."""

    def _distributed_state(self) -> dict[str, Any]:
        """``_wrapper_state()`` as a distributed checkpoint holds it (plain numbers and
        strings, no gradient); ValueError when the state in progress cannot be saved so (in
        the middle of a window that holds tensors)."""
        return self._wrapper_state()

    # -- torch's bookkeeping and the checkpoint hooks -------------------------------------------
    def __init__(self) -> None:
        Optimizer.__setstate__(self, {})
        self._hook_registry: dict[str, OrderedDict[int, Callable[..., Any]]] = {
            kind: OrderedDict() for kind in _HOOK_KINDS
        }

    def _add_hook(self, kind: str, hook: Callable[..., Any], prepend: bool) -> RemovableHandle:
        hooks = self._hook_registry[kind]
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        return handle

    def register_state_dict_pre_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """As torch's: ``hook(optimizer)`` before ``state_dict()``."""
        return self._add_hook("state_dict_pre", hook, prepend)

    def register_state_dict_post_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """As torch's: ``hook(optimizer, state_dict) -> None or a state dict`` after it."""
        return self._add_hook("state_dict_post", hook, prepend)

    def register_load_state_dict_pre_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """As torch's: ``hook(optimizer, state_dict) -> None or a state dict`` before
        ``load_state_dict``."""
        return self._add_hook("load_state_dict_pre", hook, prepend)

    def register_load_state_dict_post_hook(  # type: ignore[override]
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """As torch's: ``hook(optimizer)`` after ``load_state_dict``."""
        return self._add_hook("load_state_dict_post", hook, prepend)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        for pre_hook in self._hook_registry["state_dict_pre"].values():
            pre_hook(self)
        out = self._state_dict()
        for post_hook in self._hook_registry["state_dict_post"].values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` of the same wrappers around the same optimizers; all or
        nothing: if any part (a wrapper's record, an inner optimizer's state) cannot be
        loaded, ValueError and everything stays as it was."""
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._hook_registry["load_state_dict_pre"].values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        with all_or_nothing(self):
            self._load(state_dict)
        for post_hook in self._hook_registry["load_state_dict_post"].values():
            post_hook(self)

    def _state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------------
    def _call_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)
        if "_hook_registry" not in self.__dict__:
            self._hook_registry = {kind: OrderedDict() for kind in _HOOK_KINDS}


class OptimizerWrapper(WrapperBase):
    """Base class of the wrappers around one optimizer: delegates everything to
    ``self.optimizer``; subclasses override ``step``, may keep their own state through
    ``_wrapper_state`` / ``_load_wrapper_state``, and declare their capabilities (see
    :class:`WrapperBase`).

    A wrapper of your own declares what danlu's checks must know, e.g.::

        class EveryOther(danlu.wrappers.OptimizerWrapper):
            def keeps_window(self):  # a NonFiniteGuard outside still steps it every call
                return True

            def refuses_per_parameter(self, where):  # step_in_backward refuses it
                return f"{where}: EveryOther counts whole steps"
    """

    def __init__(self, optimizer: Optimizer) -> None:
        check_optimizer("optimizer", optimizer)
        super().__init__()
        self.optimizer = optimizer

    def parts(self) -> dict[str, Optimizer]:
        return {"optimizer": self.optimizer}

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
        inner = self.__dict__.get("optimizer")
        # none only while WrapperBase.__init__ sets up torch's bookkeeping (which would add a
        # key to the defaults it finds)
        return {} if inner is None else inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)

    # -- checkpoints ------------------------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        out = dict(self.optimizer.state_dict())
        if self.records_state:
            record = {"type": type(self).__name__, **self._wrapper_state()}
            out[WRAPPERS_KEY] = [*out.get(WRAPPERS_KEY, []), record]
        return out

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if not self.records_state:
            self.optimizer.load_state_dict(state_dict)
            return
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
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    def _param_index(self) -> dict[int, tuple[int, Tensor]]:
        """id(param) → (state-dict index, param)."""
        return {id(p): (i, p) for i, (_, p) in enumerate(iter_params(self))}

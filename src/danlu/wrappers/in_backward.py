"""The optimizer step inside ``backward()``: each gradient is folded into the optimizer state as
soon as autograd has produced it, and freed (what makes Tiger's memory claim of
docs/reference/algorithms.md#tiger and docs/reference/algorithms.md#conventions real: parameters +
one momentum, no gradient buffers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from danlu.core.dtensor import any_dtensor
from danlu.core.window import MICRO_STEP_KEY
from danlu.wrappers._base import (
    OptimizerWrapper,
    WrapperBase,
    counts_windows,
    iter_params,
    unwrap,
)

__all__ = ["StepInBackward", "step_in_backward"]


def _check_per_parameter(optimizer: Optimizer, where: str = "optimizer") -> None:
    """Raise ValueError for anything whose step cannot be split into per-parameter steps (what
    each wrapper declares in ``refuses_per_parameter``)."""
    if isinstance(optimizer, WrapperBase) and optimizer.holds_several:
        for name, inner in optimizer.parts().items():
            _check_per_parameter(inner, f"{where}[{name!r}]")
        return
    for opt in unwrap(optimizer):
        if isinstance(opt, WrapperBase):
            reason = opt.refuses_per_parameter(where)
            if reason is not None:
                raise ValueError(reason)
        else:
            if any_dtensor(p for _, p in iter_params(opt)):
                raise ValueError(
                    f"{where}: sharded (DTensor, FSDP2) parameters cannot be stepped inside "
                    "backward: their statistics need collectives in the same order on every "
                    "rank, and FSDP2 writes the gradients after its reduce-scatter"
                )
            for index, group in enumerate(opt.param_groups):
                if group.get("nonfinite_scope") == "global":
                    raise ValueError(
                        f"{where}.param_groups[{index}]: nonfinite_scope='global' needs every "
                        "gradient before stepping any; use nonfinite_scope='tensor' inside "
                        "backward"
                    )


class StepInBackward(OptimizerWrapper):
    """Step each parameter from its ``register_post_accumulate_grad_hook`` and free its gradient.

    Made by :func:`step_in_backward`. During ``loss.backward()`` every parameter is stepped (the
    inner optimizer's ``step()`` run with a copy of the parameter's group holding that parameter
    alone) right after autograd has accumulated its gradient, and ``.grad`` is set to ``None``.
    The result equals the ordinary ``backward(); step()`` loop for any optimizer whose update
    treats tensors independently (Tiger, Lion, Adam(W), SGD, AdaFactor, ...), while the
    gradients of all parameters never exist at once. With ``danlu.Tiger`` (with or without
    ``grad_accum_steps``) a training step holds the parameters and one momentum, plus the
    gradients in flight.

    * ``step()`` runs the closure if given, then steps only parameters that still hold a
      gradient (one assigned by hand, say); otherwise it does nothing, except for optimizers
      with ``grad_accum_steps`` (Tiger, AdamW), whose accumulation window it advances by one
      micro-step (moving, at the end of a window, the parameters that had a gradient earlier in
      the window but not in this backward). Keep calling it once per iteration: it is what
      counts the micro-steps, and lr schedulers see the usual order.
    * ``zero_grad()``: the gradients are already freed; it clears any left.
    * Schedulers work on ``param_groups`` as usual: the new lr applies from the next backward.
    * ``state_dict``/``load_state_dict`` are the inner optimizer's.
    * A ``NonFiniteGuard(scope="tensor")`` inside works per parameter; its counters then count
      per-parameter steps (plus the ``step()`` of each iteration with ``grad_accum_steps``).
    * ``remove()`` (or leaving a ``with`` block) removes the hooks; the inner optimizer then
      works as an ordinary one again.

    Not possible per parameter, hence rejected with ValueError: ``GradientAccumulation`` and
    ``UpdateEvery`` (use ``grad_accum_steps``; Lion cannot hide accumulation,
    docs/reference/algorithms.md#lion-edge-cases), global non-finite checks
    (``NonFiniteGuard(scope="global")``, Tiger's ``nonfinite_scope="global"``), and a
    ``MultiOptimizer`` inside another wrapper. Gradient clipping by the global norm is impossible
    too (it needs all gradients). Do not use ``retain_graph=True`` backward passes twice over the
    same graph, nor DDP (its reducer needs the gradients).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        super().__init__(optimizer)
        _check_per_parameter(optimizer)
        self._handles: dict[int, RemovableHandle] = {}
        self._groups: dict[int, dict[str, Any]] = {}
        self._register([p for _, p in iter_params(self)])

    def _register(self, params: list[Tensor]) -> None:
        for p in params:
            if id(p) not in self._handles and p.requires_grad:
                self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    @property
    def active(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        _check_per_parameter(self.optimizer)
        self._register([p for _, p in iter_params(self)])

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        self._step_parameter(self.optimizer, p)
        p.grad = None

    def _step_parameter(self, opt: Optimizer, p: Tensor) -> None:
        if isinstance(opt, WrapperBase) and opt.holds_several:
            owner = opt.owner(p)
            if owner is not None:
                self._step_parameter(owner, p)
            return
        groups = opt.param_groups
        group = self._groups.get(id(p))
        if group is None or not any(g is group for g in groups):
            group = next((g for g in groups if any(q is p for q in g["params"])), None)
            if group is None:
                return
            self._groups[id(p)] = group
        single = {**group, "params": [p]}
        opt.param_groups = [single]
        try:
            opt.step()
        finally:
            opt.param_groups = groups
            for key, value in single.items():
                # the accumulation window advances once per iteration, in step(), not once
                # per parameter
                if key not in ("params", MICRO_STEP_KEY) and group.get(key) is not value:
                    group[key] = value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        if counts_windows(self.optimizer) or any(p.grad is not None for _, p in iter_params(self)):
            # with grad_accum_steps this ends the micro-step: the counter advances, and at the
            # end of a window the parameters without a gradient in this one move too
            self.optimizer.step()
        return loss

    def refuses_per_parameter(self, where: str) -> str | None:
        return f"{where} already steps inside backward"

    def __repr__(self) -> str:
        return f"StepInBackward({self.optimizer!r}, active={self.active})"


def step_in_backward(optimizer: Optimizer) -> StepInBackward:
    """Make ``optimizer`` step each parameter inside ``backward()`` and free its gradient.

    ``opt = danlu.step_in_backward(danlu.Tiger(danlu.param_groups(model), lr=1e-3))``, then the
    usual loop (``loss.backward(); opt.step(); opt.zero_grad()``). See :class:`StepInBackward`.
    """
    return StepInBackward(optimizer)

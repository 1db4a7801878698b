"""The non-finite gradient guard for any optimizer (docs/reference/algorithms.md#tiger-rule "NaN
prevention", docs/reference/algorithms.md#tiger-edge-cases)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.core.nonfinite import finite_flags, shrink_
from danlu.core.shell import check_choice, check_in_range
from danlu.wrappers._base import (
    OptimizerWrapper,
    WrapperBase,
    counts_windows,
    iter_params,
    unwrap,
)

__all__ = ["NonFiniteGuard"]

MODES = ("skip", "shrink", "raise")
SCOPES = ("tensor", "global")

_Entry = tuple[int, dict[str, Any], Tensor]


def _dense_values(grad: Tensor) -> Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


class NonFiniteGuard(OptimizerWrapper):
    """Check every gradient for NaN and ±Inf before the inner step
    (docs/reference/algorithms.md#tiger-edge-cases: ``isfinite``, not the reference's ``isnan``).

    ``mode``:

    * ``"skip"``: a tensor with a non-finite gradient is left exactly as it was, its optimizer
      state included (the inner optimizer does not see its gradient; under an accumulation
      window, below, it may still move at the window's end on its earlier micro-batches);
    * ``"shrink"``: as "skip", and the parameter is pulled toward its init centre,
      θ ← (θ − c)·s + c with s = ``shrink_ratio`` and c the group's ``center`` (1 for norm gains
      when the groups come from ``danlu.param_groups``; 0 when absent): Tiger's fallback;
    * ``"raise"``: raise ``FloatingPointError`` naming the tensors; nothing is modified.

    ``scope="tensor"`` acts on the offending tensors only, and the others step normally (the
    reference code's choice). ``scope="global"`` treats every tensor as non-finite when one is,
    so the inner optimizer is not called at all (AMP GradScaler semantics; the safe choice for
    optimizers whose step couples tensors), except with every gradient hidden when it has an
    accumulation window (below).

    Counters (saved in ``state_dict``): ``steps`` (calls of ``step()``), ``skipped_steps`` (calls
    in which some tensor was skipped or shrunk), ``skipped_tensors`` (tensor-steps skipped or
    shrunk in all), ``last_nonfinite`` (names of the tensors found in the last call).

    Under DDP every rank sees the same averaged gradient, so every rank decides alike; under
    FSDP2 a tensor is non-finite for every rank that holds part of it when any part is (the
    flags are agreed with one small all-reduce), so no rank steps a slice while another
    shrinks or skips its own.

    The user's gradients are not modified. An inner optimizer with an accumulation window
    (Tiger or danlu.AdamW with ``grad_accum_steps``, an :class:`UpdateEvery`) is stepped on
    every call, the skipped tensors hidden (all of them with "global" scope), so its window
    stays aligned with your micro-batches: a skipped micro-batch adds nothing to the window,
    and at the window's end the tensors move on what the window's other micro-batches
    accumulated (Tiger's own ``nonfinite`` option instead keeps a tensor whose last
    micro-batch is non-finite where it is). Wrap a :class:`GradientAccumulation` from the
    outside (``GradientAccumulation(NonFiniteGuard(opt), k)``), not the reverse.
    """

    withholds_gradients = True

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "skip",
        scope: str = "tensor",
        shrink_ratio: float = 0.99,
    ) -> None:
        super().__init__(optimizer)
        holders = [o for o in unwrap(optimizer) if isinstance(o, WrapperBase) and o.holds_gradients]
        if holders:
            raise ValueError(
                "optimizer: put the guard inside the accumulation, "
                f"{type(holders[0]).__name__}(NonFiniteGuard(opt), steps), so that it checks "
                "the mean gradient of each window"
            )
        check_choice("mode", mode, MODES)
        check_choice("scope", scope, SCOPES)
        check_in_range("shrink_ratio", shrink_ratio, 0.0, 1.0, low_open=True, high_open=False)
        self.mode = mode
        self.scope = scope
        self.shrink_ratio = float(shrink_ratio)
        self.steps = 0
        self.skipped_steps = 0
        self.skipped_tensors = 0
        self.last_nonfinite: list[str] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        entries, bad = self._find_nonfinite()
        names = [self._name(index, group, p) for index, group, p in bad]
        if bad and self.mode == "raise":
            raise FloatingPointError(
                "danlu.NonFiniteGuard: non-finite gradient in "
                + ", ".join(names)
                + " (mode='raise'; nothing was modified)"
            )
        if not bad:
            self.optimizer.step()
            # counted after the inner step, so a step that raises leaves the counters as well
            self.steps += 1
            self.last_nonfinite = names
            return loss
        if len(bad) < len(entries) or counts_windows(self.optimizer):
            hidden = [(p, p.grad) for _, _, p in bad]
            for p, _ in hidden:
                p.grad = None
            try:
                self.optimizer.step()
            finally:
                for p, grad in hidden:
                    p.grad = grad
        if self.mode == "shrink":
            for _, group, p in bad:
                shrink_([p], center=float(group.get("center", 0.0)), ratio=self.shrink_ratio)
        self.steps += 1
        self.last_nonfinite = names
        self.skipped_steps += 1
        self.skipped_tensors += len(bad)
        return loss

    # -- capabilities -----------------------------------------------------------------------------
    def refuses_per_parameter(self, where: str) -> str | None:
        if self.scope != "global":
            return None
        return (
            f"{where}: NonFiniteGuard(scope='global') needs every gradient before stepping "
            "any; inside backward only scope='tensor' is possible"
        )

    def _withheld(
        self, gradient: Callable[[Tensor], Tensor | None], among: Collection[Tensor]
    ) -> tuple[set[int], bool]:
        _, bad = self._find_nonfinite(gradient, among=among)
        return {id(p) for _, _, p in bad}, self.mode == "shrink"

    def _find_nonfinite(
        self,
        gradient: Callable[[Tensor], Tensor | None] | None = None,
        among: Collection[Tensor] | None = None,
    ) -> tuple[list[_Entry], list[_Entry]]:
        """(the entries with a gradient, those the coming step skips): (index, group, param)
        in state-dict order. ``gradient(p)`` is the gradient the step will see for ``p``
        (default ``p.grad``; ``danlu.Lazy`` asks ahead of a GradientAccumulation's sum);
        ``among``: only these parameters matter to the caller (with "tensor" scope only they
        are checked)."""
        read = gradient if gradient is not None else (lambda p: p.grad)
        wanted = None if among is None or self.scope == "global" else {id(p) for p in among}
        grads = [
            (index, group, p, read(p))
            for index, (group, p) in enumerate(iter_params(self))
            if wanted is None or id(p) in wanted
        ]
        entries = [(index, group, p) for index, group, p, g in grads if g is not None]
        flags = finite_flags([_dense_values(g) for _, _, _, g in grads if g is not None])
        bad = [entry for entry, ok in zip(entries, flags, strict=True) if not ok]
        if bad and self.scope == "global":
            bad = entries
        return entries, bad

    @staticmethod
    def _name(index: int, group: dict[str, Any], p: Tensor) -> str:
        names = group.get("param_names")
        if names is not None:
            position = next(i for i, q in enumerate(group["params"]) if q is p)
            if position < len(names):
                return f"{names[position]!r} (shape {tuple(p.shape)})"
        return f"parameter {index} (shape {tuple(p.shape)})"

    def _wrapper_state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "skipped_tensors": self.skipped_tensors,
            "last_nonfinite": list(self.last_nonfinite),
        }

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        for key in ("steps", "skipped_steps", "skipped_tensors"):
            value = record.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"state_dict: NonFiniteGuard record lacks an integer {key!r} >= 0, "
                    f"got {value!r}"
                )
        names = record.get("last_nonfinite", [])
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"state_dict: NonFiniteGuard last_nonfinite must be a list of names, got {names!r}"
            )

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        self.steps = record["steps"]
        self.skipped_steps = record["skipped_steps"]
        self.skipped_tensors = record["skipped_tensors"]
        self.last_nonfinite = list(record.get("last_nonfinite", []))

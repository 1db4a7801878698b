"""The accumulation window of the optimizers with ``grad_accum_steps`` (Tiger, AdamW).

The window is a property of the optimizer's ``step()`` calls, not of each parameter: one
micro-step counter per optimizer, ``t`` = the number of ``step()`` calls so far. With
``k = grad_accum_steps``, call ``t`` opens a window when ``t % k == 0`` and closes it when
``(t + 1) % k == 0``. A parameter without a gradient on a micro-step adds nothing to its
moments; its moments decay once per window, on its first micro-step with a gradient; on the
call that closes a window every parameter that had a gradient in the window moves (one
without a gradient on that last call steps with a zero gradient, which adds exactly nothing).
A parameter without a gradient in the whole window neither decays nor moves. The result is
one step on (sum of the window's gradients of that parameter) / k: the window's mean
gradient, a micro-batch without a gradient counting as zero, as in exact accumulation of
``.grad`` over the k micro-batches.

Storage, chosen to survive torch's machinery (``load_state_dict`` casts per-parameter state
tensors, distributed checkpoints flatten the state by parameter name):

* the counter is a Python int under the param-group key ``"micro_step"``, the same value in
  every group (``add_param_group`` copies it from the existing groups);
* per parameter, the optimizer's existing counter records the value of ``t + 1`` at the
  parameter's last micro-step with a gradient (Tiger: ``state["step"]``, a float64 tensor;
  AdamW: ``state["micro_step"]``, a Python int). For a parameter with a gradient on every
  call this is the micro-step count that danlu 0.1.0 stored, so old checkpoints keep their
  meaning; a checkpoint without ``"micro_step"`` in its groups takes the largest per-parameter
  value as the counter.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from danlu.core.shell import DanluOptimizer, GroupTensors

__all__ = ["MICRO_STEP_KEY", "WindowedOptimizer"]

#: The param-group key of the optimizer's micro-step counter.
MICRO_STEP_KEY = "micro_step"


def _check_counter(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (a micro-step count), got {value!r}")
    return int(value)


class WindowedOptimizer(DanluOptimizer):
    """Base of the optimizers with ``grad_accum_steps``: the optimizer-wide micro-step counter.

    Subclasses implement ``_last_seen`` (the counter value after a parameter's last micro-step
    with a gradient, 0 if none) and call ``_carry_into_window`` in phase 1 of their step and
    ``_advance`` at its end.
    """

    @property
    def micro_step(self) -> int:
        """The number of ``step()`` calls so far (micro-steps; the window's position is
        ``micro_step % grad_accum_steps``)."""
        return self._counter()

    def keeps_window(self) -> bool:
        """Always: ``step()`` counts micro-batches (call it once per micro-batch, even when no
        parameter has a gradient); the capability that danlu's wrappers read."""
        return True

    # -- the counter ------------------------------------------------------------------------
    def _counter(self) -> int:
        """The counter, checked (raises ValueError before any write when a group's is bad)."""
        values = [
            _check_counter(f"param_groups[{i}]['{MICRO_STEP_KEY}']", group[MICRO_STEP_KEY])
            for i, group in enumerate(self.param_groups)
            if MICRO_STEP_KEY in group
        ]
        return max(values, default=0)

    def _set_counter(self, value: int) -> None:
        for group in self.param_groups:
            group[MICRO_STEP_KEY] = value

    def _advance(self, t: int) -> None:
        """End of the step that ran as micro-step ``t``."""
        self._set_counter(t + 1)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group added mid-window joins the optimizer's window, not a new one of its own
        counter = self._counter() if self.param_groups else 0
        super().add_param_group(param_group)
        self.param_groups[-1][MICRO_STEP_KEY] = counter

    # -- per parameter ----------------------------------------------------------------------
    def _last_seen(self, p: Tensor) -> int:
        raise NotImplementedError

    def _last_seen_many(self, params: list[Tensor]) -> list[int]:
        return [self._last_seen(p) for p in params]

    def _window_decays(self, p: Tensor) -> dict[str, Any]:
        """{state key: factor} of the decay that opens a window for ``p`` (its group's betas):
        the moments are multiplied by these on the parameter's first micro-step with a gradient
        in a window. ``danlu.Lazy`` applies it to the rows of a table first seen later in the
        window (the optimizer decays a tensor as a whole)."""
        raise NotImplementedError

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _carry_into_window(self, gathered: list[GroupTensors], t: int) -> None:
        """On the call that closes a window, add to ``gathered`` (with a zero gradient) every
        parameter that had a gradient earlier in the window but has none now, so that it moves
        with the others. Allocates only; writes nothing."""
        for index, work in enumerate(gathered):
            group = work.group
            k = group["grad_accum_steps"]
            if k == 1 or (t + 1) % k:
                continue
            start = t - t % k
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is not None or p not in self.state or p.numel() == 0:
                    continue
                # last seen in this window, before this call (t + 1: already stepped at t)
                if start < self._last_seen(p) <= t:
                    name = names[i] if names is not None and i < len(names) else None
                    label = f"{name!r}" if name else f"param_groups[{index}]['params'][{i}]"
                    work.params.append(p)
                    work.grads.append(torch.zeros_like(p, memory_format=torch.preserve_format))
                    work.names.append(f"{label} (shape {tuple(p.shape)})")

    # -- checkpoints ------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class's, and the micro-step counter: the saved one, or for a state
        dict without it (danlu 0.1.0, torch.optim) the largest per-parameter count."""
        saved = [
            _check_counter(f"state_dict param_groups[{i}]['{MICRO_STEP_KEY}']", g[MICRO_STEP_KEY])
            for i, g in enumerate(state_dict.get("param_groups", []))
            if isinstance(g, dict) and MICRO_STEP_KEY in g
        ]
        super().load_state_dict(state_dict)
        self._restore_counters(state_dict)
        if saved and len(saved) == len(self.param_groups):
            self._set_counter(max(saved))
            return
        params = [p for group in self.param_groups for p in group["params"] if p in self.state]
        derived = max(self._last_seen_many(params), default=0)
        self._set_counter(max([*saved, derived]))

    def _restore_counters(self, state_dict: dict[str, Any]) -> None:
        """Undo torch's casts of per-parameter counters after a load (subclasses)."""

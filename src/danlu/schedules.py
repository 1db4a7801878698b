"""Learning-rate schedules, SPEC.md §2(a) (piecewise linear) and §7.1 (Amos-derived decays)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PiecewiseLinearLR", "piecewise_linear"]


def _sorted_knots(
    schedule: Mapping[int | float, float], from_zero: bool
) -> list[tuple[float, float]]:
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError(
            f"schedule must be a non-empty mapping {{step: multiplier}}, got {schedule!r}"
        )
    knots = sorted((float(k), float(v)) for k, v in schedule.items())
    if knots[0][0] < 0:
        raise ValueError(f"schedule steps must be >= 0, got {knots[0][0]:g}")
    if from_zero and knots[0][0] != 0:
        knots.insert(0, (0.0, 0.0))
    return knots


def piecewise_linear(
    t: float, schedule: Mapping[int | float, float], from_zero: bool = True
) -> float:
    """The multiplier at step ``t`` of a piecewise-linear schedule ``{step: multiplier}``.

    As in bojone/tiger: with ``from_zero`` and no knot at 0, the point (0, 0) is prepended (a
    linear warmup); values are interpolated between knots and held after the last one; below
    the first knot (only possible with ``from_zero=False``) the first value is returned.
    ``{0: 1}`` is the constant 1. ``t`` counts micro-steps in the reference code.
    """
    knots = _sorted_knots(schedule, from_zero)
    steps = [k for k, _ in knots]
    if t <= steps[0]:
        return knots[0][1]
    if t >= steps[-1]:
        return knots[-1][1]
    i = bisect.bisect_right(steps, t)
    (t0, v0), (t1, v1) = knots[i - 1], knots[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


class PiecewiseLinearLR(LRScheduler):
    """lr = base_lr · piecewise_linear(step, schedule): the reference ``lr_schedule`` argument
    of bojone/tiger as a ``torch.optim.lr_scheduler.LRScheduler``.

    Call ``scheduler.step()`` once per ``optimizer.step()``; with Tiger's
    ``grad_accum_steps = k`` that is once per micro-step, as in the reference code (so 40000
    steps of warmup are 10000 updates with k = 4).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Mapping[int | float, float],
        from_zero: bool = True,
        last_epoch: int = -1,
    ) -> None:
        self._knots = _sorted_knots(schedule, from_zero)
        self.schedule = dict(schedule)
        self.from_zero = from_zero
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        factor = piecewise_linear(self.last_epoch, self.schedule, self.from_zero)
        return [base_lr * factor for base_lr in self.base_lrs]

"""Learning-rate schedules, docs/reference/algorithms.md#tiger-rule (piecewise linear) and
docs/reference/algorithms.md#amos-recipes (Amos-derived decays)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "InverseSquareDecayLR",
    "InverseTimeDecayLR",
    "PiecewiseLinearLR",
    "inverse_square_decay",
    "inverse_time_decay",
    "piecewise_linear",
]


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
    return _interpolate(_sorted_knots(schedule, from_zero), t)


def _interpolate(knots: list[tuple[float, float]], t: float) -> float:
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

    def get_lr(self) -> list[float | Tensor]:
        factor = _interpolate(self._knots, self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, with ``schedule`` as a list of ``[step, multiplier]`` pairs.

        A dict with number keys would not survive ``torch.distributed.checkpoint``, which turns
        keys into strings (and, loading into a live state dict, keeps both ``20`` and ``'20'``).
        """
        state = {k: v for k, v in super().state_dict().items() if k != "_knots"}
        state["schedule"] = [[step, value] for step, value in self.schedule.items()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; also accepts the older ``schedule`` forms, a
        dict with number keys or with the string keys a distributed checkpoint makes of them
        (or both: equal entries merge, different ones raise ValueError). Nothing changes on
        error."""
        state = {k: v for k, v in state_dict.items() if k != "_knots"}
        schedule = _schedule_from_state(state.get("schedule", self.schedule))
        from_zero = state.get("from_zero", self.from_zero)
        if not isinstance(from_zero, bool):
            raise ValueError(f"state_dict: from_zero must be a bool, got {from_zero!r}")
        knots = _sorted_knots(schedule, from_zero)
        state["schedule"] = schedule
        super().load_state_dict(state)
        self._knots = knots


def _step_key(key: Any) -> int | float:
    """A schedule step from a state dict key: a number, or its string form."""
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            try:
                return float(key)
            except ValueError:
                pass
    elif isinstance(key, int | float) and not isinstance(key, bool):
        return key
    raise ValueError(f"state_dict: schedule steps must be numbers, got {key!r}")


def _schedule_from_state(saved: Any) -> dict[int | float, float]:
    """``{step: multiplier}`` from a saved ``schedule``: pairs, or a dict keyed by numbers
    and/or their strings."""
    if isinstance(saved, Mapping):
        items = list(saved.items())
    elif isinstance(saved, Sequence) and not isinstance(saved, str):
        items = []
        for pair in saved:
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise ValueError(
                    f"state_dict: schedule must hold [step, multiplier] pairs, got {pair!r}"
                )
            items.append((pair[0], pair[1]))
    else:
        raise ValueError(f"state_dict: schedule must be a list of pairs, got {saved!r}")
    schedule: dict[int | float, float] = {}
    for key, value in items:
        step = _step_key(key)
        if step in schedule and schedule[step] != value:
            raise ValueError(
                f"state_dict: schedule gives step {step!r} two multipliers, "
                f"{schedule[step]!r} and {value!r}"
            )
        schedule[step] = value
    return schedule


# ----------------------------------------------------------------------------------------------
# The Amos-derived decays of docs/reference/algorithms.md#amos-recipes (kexue 9344).

_SQRT2_MINUS_1 = math.sqrt(2.0) - 1.0


def _check_halving_step(halving_step: float) -> float:
    if (
        isinstance(halving_step, bool)
        or not isinstance(halving_step, int | float)
        or not math.isfinite(halving_step)
        or halving_step <= 0
    ):
        raise ValueError(f"halving_step must be a finite number > 0, got {halving_step!r}")
    return float(halving_step)


def inverse_square_decay(t: float, halving_step: float) -> float:
    """1 / (α0·p·t + 1)² with α0·p = (√2 − 1)/T: the lr multiplier of a constant convergence
    rate p (docs/reference/algorithms.md#amos-recipes); 1 at t = 0, exactly 0.5 at t = T =
    ``halving_step``, ~1/t² later."""
    return 1.0 / (_SQRT2_MINUS_1 * t / _check_halving_step(halving_step) + 1.0) ** 2


def inverse_time_decay(t: float, halving_step: float) -> float:
    """1 / (2·α0·p0·t + 1) with 2·α0·p0 = 1/T: the lr multiplier of a convergence rate that
    slows as p_t = p0·e^{−S_t} (docs/reference/algorithms.md#amos-recipes, the blog's preferred
    one); 0.5 at t = T."""
    return 1.0 / (t / _check_halving_step(halving_step) + 1.0)


class _AmosDecayLR(LRScheduler):
    _decay = staticmethod(inverse_square_decay)
    # α0·p (or α0·p0) as a function of the halving step T, and its inverse.
    _rate_times_alpha0_at_halving = _SQRT2_MINUS_1

    def __init__(
        self,
        optimizer: Optimizer,
        halving_step: float | None = None,
        *,
        alpha0: float | None = None,
        rate: float | None = None,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        for name, value in (("alpha0", alpha0), ("rate", rate)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if halving_step is not None:
            if rate is not None:
                raise ValueError("give either halving_step or rate (with alpha0), not both")
            self.halving_step = _check_halving_step(halving_step)
            product = self._rate_times_alpha0_at_halving / self.halving_step
            self.rate = None if alpha0 is None else product / alpha0
        else:
            if alpha0 is None or rate is None:
                raise ValueError("give halving_step, or both alpha0 and rate")
            self.rate = float(rate)
            self.halving_step = self._rate_times_alpha0_at_halving / (alpha0 * rate)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.alpha0 = alpha0
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, t: float) -> float:
        """The multiplier of the base lr at step ``t``."""
        warmup = min(1.0, t / self.warmup_steps) if self.warmup_steps else 1.0
        return warmup * self._decay(t, self.halving_step)

    def get_lr(self) -> list[float | Tensor]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class InverseSquareDecayLR(_AmosDecayLR):
    """lr_t = base_lr / (α0·p·t + 1)², docs/reference/algorithms.md#amos-recipes (kexue 9344): the
    Amos-derived schedule for a constant convergence rate p.

    Give the step ``halving_step`` = T at which the lr has halved (α0·p = (√2 − 1)/T), or the
    blog's ``alpha0`` and ``rate`` p. ``alpha0`` is the relative step size (~1e-3); with
    ``halving_step`` it only serves to report ``rate``. ``warmup_steps`` multiplies by a linear
    ramp from 0. Call ``step()`` once per optimizer step.

    The blog's decay ρ_t = α0²/(2q)·(same factor) is absolute; an optimizer whose decoupled
    decay is multiplied by its lr (AdamW, Lion, Tiger) follows it with a constant
    ``weight_decay`` = α0/(2qσ) (see :func:`danlu.recipes.sign_optimizer_hparams`).
    """


class InverseTimeDecayLR(_AmosDecayLR):
    """lr_t = base_lr / (2·α0·p0·t + 1), docs/reference/algorithms.md#amos-recipes (kexue 9344): the
    Amos-derived schedule for a convergence rate that slows as p_t = p0·e^{−S_t} (which the blog
    finds more realistic).

    Give ``halving_step`` = T (2·α0·p0 = 1/T), or ``alpha0`` and ``rate`` p0; otherwise as
    :class:`InverseSquareDecayLR`.
    """

    _decay = staticmethod(inverse_time_decay)
    _rate_times_alpha0_at_halving = 0.5

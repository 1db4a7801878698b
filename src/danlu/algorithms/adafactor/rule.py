"""AdaFactor's reference rule: the hyper-parameters of one step and the update of one tensor.

docs/reference/algorithms.md#adafactor-rule; the blog https://kexue.fm/archives/7302; Shazeer &
Stern 2018, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost* (arXiv:1804.04235);
the code bert4keras ``AdaFactorV2`` and bojone/adafactor. At step t (1-based)::

    β̂_t  = 1 − t^(−c)                       (or a constant beta2)        adafactor_beta2
    V     = g² + ε1
    factored:    R ← β̂ R + (1−β̂) mean(V, largest axis)                    moment_ema_
                 C ← β̂ C + (1−β̂) mean(V, second axis)
                 v̂ = R·C / mean(R, second axis)  (all other axes kept)    inverse_sqrt_factors
    unfactored:  v̂ ← β̂ v̂ + (1−β̂) V                                       inverse_sqrt_moment
    u  = g / √v̂,   û = u / max(1, RMS(u)/d)   (whole tensor)               clip_denominator_
    α_t = lr, or lr·min(1e-2, 1/√t) (× 0.05 without parameter scaling)    adafactor_step_size
    s   = max(ε2, RMS(θ_{t−1})) with parameter scaling, else 1            parameter_scale_
    momentum (β1 > 0, "unit", bert4keras):   m ← β1 m + (1−β1) û;  û ← m  apply_update_
    θ  ← θ − α_t·λ·θ − α_t·s·û

In the ``"scaled"`` momentum order (transformers/fairseq) the EMA is taken over α_t·s·û and
θ ← θ − α_t·λ·θ − m. Statistics (R, C, v̂) are kept in float32 or wider whatever the
parameter dtype: ε1 = 1e-30 underflows in fp16, and bf16 is too coarse for the EMA.

Huge finite gradients: each gradient is read saturated at the largest magnitude for which a
row of its squares sums to a finite number (:func:`gradient_bound`, ``core.overflow``), and
RMS(u) and RMS(θ) are computed without overflowing the sum of squares, so that one huge
gradient cannot turn R, C or v̂ into inf and the parameters into NaN.

:func:`adafactor_update_` is the update of one tensor; the single-tensor path of
``functional.py`` is a loop over it. The named pieces below it are computed here once; the
foreach, DTensor and Triton paths call them, or, where they work on lists or inside a kernel,
say which piece they mirror.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from torch import Tensor

from danlu.core.overflow import finite_norm, square_bound
from danlu.core.precision import saturating_cast
from danlu.core.tensors import scalar_like

__all__ = [
    "FACTORED_DIMS",
    "MOMENTUM_MODES",
    "AdaFactorHyper",
    "adafactor_beta2",
    "adafactor_factored_axes",
    "adafactor_step_size",
    "adafactor_update_",
    "apply_update_",
    "check_modes",
    "clip_denominator_",
    "factored_axes_of",
    "gradient_bound",
    "inverse_sqrt_factors",
    "inverse_sqrt_moment",
    "moment_ema_",
    "moment_floor",
    "parameter_scale_",
    "root_size",
    "saturated_gradient",
]

FACTORED_DIMS = ("two_largest", "last_two")
MOMENTUM_MODES = ("unit", "scaled")


@dataclass(frozen=True)
class AdaFactorHyper:
    """The hyper-parameters of one step, the β̂2 schedule and the step size already taken at
    that step (a number, or a 0-d tensor inside ``torch.compile`` or with a tensor lr).
    Defaults: docs/reference/algorithms.md#adafactor-defaults."""

    beta2_t: float | Tensor  # β̂_t (adafactor_beta2)
    step_size: float | Tensor  # α_t (adafactor_step_size)
    beta1: float = 0.0
    eps1: float = 1e-30
    eps2: float = 1e-3
    clip_threshold: float | None = 1.0  # d; None: no update clipping
    multiply_by_parameter_scale: bool = True
    weight_decay: float = 0.0
    factored_dims: str = "two_largest"
    min_dim_size_to_factor: int = 128
    momentum_mode: str = "unit"
    maximize: bool = False

    def __post_init__(self) -> None:
        check_modes(self.factored_dims, self.momentum_mode)

    @classmethod
    def at_step(cls, step: float | Tensor, options: Mapping[str, Any]) -> AdaFactorHyper:
        """From a param group, or the functional's keyword arguments, at step ``step`` (1-based)."""
        return cls(
            beta2_t=adafactor_beta2(step, decay_rate=options["decay_rate"], beta2=options["beta2"]),
            step_size=adafactor_step_size(
                step,
                lr=options["lr"],
                relative_step=options["relative_step"],
                multiply_by_parameter_scale=options["multiply_by_parameter_scale"],
            ),
            **{name: options[name] for name in _CONSTANT_FIELDS},
        )

    @property
    def momentum(self) -> str | None:
        """The momentum order, or None without momentum (β1 = 0)."""
        return self.momentum_mode if self.beta1 > 0 else None


# the fields taken from the options as they are (all but β̂_t and α_t)
_CONSTANT_FIELDS = tuple(
    f.name for f in fields(AdaFactorHyper) if f.name not in ("beta2_t", "step_size")
)


def adafactor_update_(
    param: Tensor,
    grad: Tensor,
    row: Tensor | None,
    col: Tensor | None,
    full: Tensor | None,
    exp_avg: Tensor | None,
    hyper: AdaFactorHyper,
) -> None:
    r"""One AdaFactor update of one tensor, in place (docs/reference/algorithms.md#adafactor-rule).

    .. math::
        R, C \leftarrow \hat\beta_t\,(R, C) + (1-\hat\beta_t)\,
            (\mathrm{mean}_{\text{largest}}, \mathrm{mean}_{\text{second}})(g^2+\epsilon_1),\quad
        \hat v = R\,C/\mathrm{mean}_{\text{second}}(R)
            \ \text{or}\ \hat v \leftarrow \hat\beta_t\hat v + (1-\hat\beta_t)(g^2+\epsilon_1),

        u = g/\sqrt{\hat v},\quad
        \theta \leftarrow \theta(1 - \alpha_t\lambda)
            - \alpha_t\max(\epsilon_2, \mathrm{RMS}(\theta))\,u/\max(1, \mathrm{RMS}(u)/d).

    Factored (``row``, ``col``) or not (``full``); ``exp_avg``: the momentum, β1 > 0.
    """
    stats = cast(Tensor, row if full is None else full)  # the shell passes one layout
    axes = None if full is not None else factored_axes_of(param, row, hyper)
    bound = gradient_bound(param.shape, axes, stats.dtype)
    g = saturated_gradient(grad, stats.dtype, bound, maximize=hyper.maximize)
    buffer = torch.square(g)  # the one full-size temporary: g², then the update
    if axes is not None:
        assert row is not None and col is not None
        largest, second = axes
        moment_ema_(row, buffer.mean(dim=largest, keepdim=True), hyper)
        moment_ema_(col, buffer.mean(dim=second, keepdim=True), hyper)
        normaliser = row.mean(dim=second, keepdim=True)
        [row_factor], [col_factor] = inverse_sqrt_factors([row], [col], [normaliser])
        update = torch.mul(g, row_factor, out=buffer).mul_(col_factor)
    else:
        moment_ema_(stats, buffer, hyper)
        update = inverse_sqrt_moment(stats, hyper.eps1, out=buffer).mul_(g)
    clip_denom = None
    if (d := hyper.clip_threshold) is not None:
        clip_denom = clip_denominator_(finite_norm(update), root_size(update) * d)
    factor = hyper.step_size
    if hyper.multiply_by_parameter_scale:
        norm = finite_norm(param, dtype=stats.dtype)
        factor = parameter_scale_(norm, root_size(param), hyper.eps2, hyper.step_size)
    apply_update_(param, update, exp_avg, clip_denom, factor, hyper)


# -- the named pieces -------------------------------------------------------------------------


def check_modes(factored_dims: str, momentum_mode: str) -> None:
    if factored_dims not in FACTORED_DIMS:
        raise ValueError(f"factored_dims must be one of {FACTORED_DIMS}, got {factored_dims!r}")
    if momentum_mode not in MOMENTUM_MODES:
        raise ValueError(f"momentum_mode must be one of {MOMENTUM_MODES}, got {momentum_mode!r}")


def adafactor_beta2(
    step: float | Tensor, *, decay_rate: float = 0.8, beta2: float | None = None
) -> float | Tensor:
    """β̂_t = 1 − t^(−decay_rate) (0 at t = 1, → 1), or the constant ``beta2`` when given.
    A 0-d tensor ``step`` (inside ``torch.compile``) gives a float64 0-d tensor."""
    if beta2 is not None:
        return float(beta2)
    if isinstance(step, Tensor):
        return 1.0 - step.to(torch.float64).pow(-decay_rate)
    return 1.0 - float(step) ** (-decay_rate)


def adafactor_step_size(
    step: float | Tensor,
    *,
    lr: float | Tensor,
    relative_step: bool,
    multiply_by_parameter_scale: bool,
) -> float | Tensor:
    """α_t: ``lr``, or with ``relative_step`` lr · min(1e-2, 1/√t), × 0.05 without parameter
    scaling (the mesh-tensorflow convention bert4keras follows). ``lr`` is then a multiplier
    (1.0 by default) that LR schedulers can scale. A 0-d tensor ``step`` (inside
    ``torch.compile``) gives a 0-d tensor."""
    if not relative_step:
        return lr
    if isinstance(step, Tensor):
        rho_t = step.to(torch.float64).rsqrt().clamp(max=1e-2)
        return lr * (rho_t if multiply_by_parameter_scale else rho_t * 0.05)
    rho = min(1e-2, 1.0 / math.sqrt(step))
    if not multiply_by_parameter_scale:
        rho *= 0.05
    return lr * rho


def adafactor_factored_axes(
    shape: Sequence[int], *, factored_dims: str = "two_largest", min_dim_size_to_factor: int = 128
) -> tuple[int, int] | None:
    """The axes ``(largest, second)`` that AdaFactor factors for a tensor of ``shape``, or None.

    ``"two_largest"`` (docs/reference/algorithms.md#adafactor-rule, bert4keras/mesh-tensorflow): the
    two largest dims, ties broken toward the later axis (so (128, 128) → (1, 0)); not factored when
    the second largest is below ``min_dim_size_to_factor``. ``"last_two"`` (torch.optim.Adafactor,
    transformers): the last two dims of every tensor with ndim ≥ 2, no size threshold.
    The row statistic averages over ``largest``, the column statistic over ``second``.
    """
    ndim = len(shape)
    if ndim < 2:
        return None
    if factored_dims == "last_two":
        return ndim - 1, ndim - 2
    if factored_dims != "two_largest":
        raise ValueError(f"factored_dims must be one of {FACTORED_DIMS}, got {factored_dims!r}")
    order = sorted(range(ndim), key=lambda axis: (shape[axis], axis))
    largest, second = order[-1], order[-2]
    if shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


def factored_axes_of(param: Tensor, row: Tensor | None, hyper: AdaFactorHyper) -> tuple[int, int]:
    """The factored axes of ``param``, which has a row statistic ``row``; an error when the
    state does not follow the factoring rule."""
    axes = adafactor_factored_axes(
        param.shape,
        factored_dims=hyper.factored_dims,
        min_dim_size_to_factor=hyper.min_dim_size_to_factor,
    )
    if axes is None or row is None:
        raise ValueError(
            f"AdaFactor state does not match the factoring rule for a tensor of shape "
            f"{tuple(param.shape)} (factored_dims={hyper.factored_dims!r}, "
            f"min_dim_size_to_factor={hyper.min_dim_size_to_factor})"
        )
    return axes


def gradient_bound(shape: Sequence[int], axes: tuple[int, int] | None, dtype: torch.dtype) -> float:
    """The saturation bound of a gradient: its squares, summed along the largest factored
    axis (or one by one when unfactored), stay finite in the statistics' ``dtype``."""
    return square_bound(dtype, 1 if axes is None else shape[axes[0]])


def saturated_gradient(
    grad: Tensor, dtype: torch.dtype, bound: float, *, maximize: bool = False
) -> Tensor:
    """±``grad`` (− with ``maximize``) in the statistics' ``dtype``, clamped to ±``bound``
    (:func:`gradient_bound`): one huge finite gradient cannot turn R, C or v̂ into inf.
    ``grad`` itself is never modified."""
    g = grad.to(dtype)
    if maximize:
        g = -g
    return g.clamp_(-bound, bound) if g is not grad else g.clamp(-bound, bound)


def moment_ema_(stat: Tensor, mean_sq: Tensor, hyper: AdaFactorHyper) -> None:
    """stat ← β̂_t·stat + (1 − β̂_t)(mean(g²) + ε1), with ``mean_sq`` (overwritten) the mean
    of g² (or g² itself for a full v̂): mean(g² + ε1) = mean(g²) + ε1."""
    stat.lerp_(mean_sq.add_(hyper.eps1), scalar_like(1 - hyper.beta2_t, stat))


def moment_floor(eps1: float, dtype: torch.dtype) -> float | None:
    """The floor of a full v̂ before its inverse square root: the smallest normal number when
    v̂ = g² + ε1 can be 0 (ε1 = 0, or below that number and lost in the sum), so that a zero
    gradient gives a 0 update, not 0·∞; None when v̂ ≥ ε1 > 0 needs none."""
    tiny = torch.finfo(dtype).tiny
    return tiny if eps1 < tiny else None


def inverse_sqrt_moment(full: Tensor, eps1: float, out: Tensor | None = None) -> Tensor:
    """v̂^(-1/2) of a full (unfactored) v̂, with its :func:`moment_floor`."""
    floor = moment_floor(eps1, full.dtype)
    if floor is None:
        return torch.rsqrt(full, out=out)
    return torch.clamp_min(full, floor, out=out).rsqrt_()


def inverse_sqrt_factors(
    rows: list[Tensor], cols: list[Tensor], normalisers: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """(R/mean(R))^(-1/2) and C^(-1/2) for each factored tensor, given mean(R) over the second
    axis (``normalisers``, clamped in place). g·both = g/√(R·C/mean(R)): no full-size v̂.

    The clamps at the smallest normal number keep a zero row or column (ε1 = 0, or R/mean(R)
    underflowing next to large gradients) at a finite factor: its gradients are 0, so is its
    update."""
    tiny = torch.finfo(rows[0].dtype).tiny
    torch._foreach_clamp_min_(normalisers, tiny)
    row_factors = list(torch._foreach_div(rows, normalisers))
    torch._foreach_clamp_min_(row_factors, tiny)
    torch._foreach_rsqrt_(row_factors)
    col_factors = list(torch._foreach_clamp_min(cols, tiny))
    torch._foreach_rsqrt_(col_factors)
    return row_factors, col_factors


def root_size(tensor: Tensor) -> float:
    """√n for a tensor of n elements (at least 1): RMS(x) = ‖x‖/√n."""
    return math.sqrt(max(tensor.numel(), 1))


def clip_denominator_(norm: Tensor, divisor: float | Tensor) -> Tensor:
    """max(1, RMS(u)/d) in place, from ``norm`` = ‖u‖ and ``divisor`` = √n·d (the update
    clipping: û = u / this)."""
    return norm.div_(divisor).clamp_min_(1.0)


def parameter_scale_(
    norm: Tensor, root: float | Tensor, eps2: float, step_size: float | Tensor
) -> Tensor:
    """α_t·max(ε2, RMS(θ_{t−1})) in place, from ``norm`` = ‖θ‖ and ``root`` = √n: the factor
    of the update with parameter scaling (a zero-initialised tensor still moves)."""
    return norm.div_(root).clamp_min_(eps2).mul_(step_size)


def apply_update_(
    param: Tensor,
    update: Tensor,
    exp_avg: Tensor | None,
    clip_denom: Tensor | None,
    factor: float | Tensor,
    hyper: AdaFactorHyper,
) -> None:
    """Clipping, momentum, decay and the step, given the unit update u (overwritten), the
    clipping denominator max(1, RMS(u)/d) (None: no clipping) and the factor α_t·s:

    * no momentum: θ ← θ(1 − α_tλ) − (α_t·s / clip)·u;
    * ``"unit"`` (bert4keras): m ← lerp(m, u/clip, 1 − β1), θ ← θ(1 − α_tλ) − α_t·s·m;
    * ``"scaled"`` (transformers): m ← lerp(m, α_t·s·u/clip, 1 − β1), θ ← θ(1 − α_tλ) − m.
    """
    source, coef = update, factor
    if hyper.momentum == "unit":
        assert exp_avg is not None
        if clip_denom is not None:
            update.div_(clip_denom)
        exp_avg.lerp_(saturating_cast(update, exp_avg.dtype), 1 - hyper.beta1)
        source = exp_avg
    elif clip_denom is not None:
        coef = clip_denom.reciprocal_().mul_(factor)
    if hyper.momentum == "scaled":
        assert exp_avg is not None
        exp_avg.lerp_(saturating_cast(update.mul_(coef), exp_avg.dtype), 1 - hyper.beta1)
        source, coef = exp_avg, 1.0
    if hyper.weight_decay != 0:
        param.mul_(1 - hyper.step_size * hyper.weight_decay)
    if isinstance(coef, Tensor):  # a 0-d tensor stays on the device
        param.addcmul_(source, coef, value=-1.0)
    else:
        param.add_(source, alpha=-coef)

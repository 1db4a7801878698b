"""AdaFactor, docs/reference/algorithms.md#adafactor-rule: the math only, tensors in, tensors
updated in place.

One call is one update of tensors that share the step count ``t`` (1-based)::

    β̂_t  = 1 − t^(−c)                       (or a constant beta2)
    V     = g² + ε1
    factored:    R ← β̂ R + (1−β̂) mean(V, largest axis)      C ← β̂ C + (1−β̂) mean(V, second axis)
                 v̂ = R·C / mean(R, second axis)              (all other axes kept)
    unfactored:  v̂ ← β̂ v̂ + (1−β̂) V
    u  = g / √v̂,   û = u / max(1, RMS(u)/d)                   (update clipping, whole tensor)
    momentum (β1 > 0, "unit" order, bert4keras):   m ← β1 m + (1−β1) û;  û ← m
    α_t = lr, or the relative step min(1e-2, 1/√t) · lr  (× 0.05 without parameter scaling)
    s   = max(ε2, RMS(θ_{t−1}))  with parameter scaling, else 1
    θ  ← θ − α_t·λ·θ − α_t·s·û

In the ``"scaled"`` momentum order (transformers/fairseq) the EMA is taken over α_t·s·û and
θ ← θ − α_t·λ·θ − m. Statistics (R, C, v̂) are kept in float32 or wider whatever the
parameter dtype: ε1 = 1e-30 underflows in fp16, and bf16 is too coarse for the EMA.

Huge finite gradients: each gradient is read saturated at the largest magnitude for which a
row of its squares sums to a finite number (:func:`gradient_bound`, ``functional.overflow``),
and RMS(u) and RMS(θ) are computed without overflowing the sum of squares, so that one huge
gradient cannot turn R, C or v̂ into inf and the parameters into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, local, reduce_partial_sums
from danlu.core.overflow import (
    finite_norm,
    finite_norms,
    finite_sum_of_squares,
    square_bound,
)
from danlu.core.precision import saturating_cast, stochastically_rounded_params
from danlu.core.tensors import (
    foreach_lerp_,
    group_by_device_and_dtype,
    scalar_like,
    select_path,
)

__all__ = [
    "FACTORED_DIMS",
    "MOMENTUM_MODES",
    "adafactor",
    "adafactor_beta2",
    "adafactor_factored_axes",
    "adafactor_step_size",
]

FACTORED_DIMS = ("two_largest", "last_two")
MOMENTUM_MODES = ("unit", "scaled")


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


def gradient_bound(shape: Sequence[int], axes: tuple[int, int] | None, dtype: torch.dtype) -> float:
    """The saturation bound of a gradient: its squares, summed along the largest factored
    axis (or one by one when unfactored), stay finite in the statistics' ``dtype``."""
    return square_bound(dtype, 1 if axes is None else shape[axes[0]])


def _rms_divisor(tensor: Tensor) -> float:
    return math.sqrt(max(tensor.numel(), 1))


def adafactor(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg_sq_rows: Sequence[Tensor | None],
    exp_avg_sq_cols: Sequence[Tensor | None],
    exp_avg_sqs: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor | None],
    *,
    step: float | Tensor,
    lr: float | Tensor,
    relative_step: bool = False,
    beta1: float = 0.0,
    beta2: float | None = None,
    decay_rate: float = 0.8,
    eps1: float = 1e-30,
    eps2: float = 1e-3,
    clip_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    weight_decay: float = 0.0,
    factored_dims: str = "two_largest",
    min_dim_size_to_factor: int = 128,
    momentum_mode: str = "unit",
    maximize: bool = False,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One AdaFactor update at step ``step`` (1-based) of every tensor.

    For each parameter either ``exp_avg_sq_rows[i]``/``exp_avg_sq_cols[i]`` (factored, keepdim
    shapes with size 1 on the averaged axis, see :func:`adafactor_factored_axes`) or
    ``exp_avg_sqs[i]`` (full shape) is given; ``exp_avgs[i]`` is the momentum (needed when
    ``beta1 > 0``). Statistics must be float32 (or float64); the momentum may be any float dtype.
    ``foreach``/``fused`` choose the implementation (see ``functional._utils.select_path``):
    the Triton kernels on CUDA, the foreach path, or the single-tensor loop (there is no
    separate kernel without Triton: ``fused=True`` then runs the foreach path, or on CPU the
    single-tensor loop, the faster one there).
    DTensor (FSDP2) tensors take the single-tensor ops on their local slices, with every mean
    and norm over the whole tensor (state placed as ``danlu.distributed.new_state`` does).
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``functional.precision``; inside the kernel on the Triton path); the statistics
    and the momentum are kept and rounded as without it.
    """
    if factored_dims not in FACTORED_DIMS:
        raise ValueError(f"factored_dims must be one of {FACTORED_DIMS}, got {factored_dims!r}")
    if momentum_mode not in MOMENTUM_MODES:
        raise ValueError(f"momentum_mode must be one of {MOMENTUM_MODES}, got {momentum_mode!r}")
    if not params:
        return
    if beta1 > 0 and any(m is None for m in exp_avgs):
        raise ValueError("adafactor: beta1 > 0 needs a momentum tensor in exp_avgs for every param")
    path = "dtensor" if any_dtensor(params) else select_path(foreach, fused, params)
    if path == "dtensor":
        fn: Any = _dtensor_adafactor
    else:
        on_cpu = all(p.device.type == "cpu" for p in params)
        fn = _implementation(path, on_cpu)
    settings: dict[str, Any] = dict(
        beta2_t=adafactor_beta2(step, decay_rate=decay_rate, beta2=beta2),
        step_size=adafactor_step_size(
            step,
            lr=lr,
            relative_step=relative_step,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
        ),
        beta1=beta1,
        eps1=eps1,
        eps2=eps2,
        clip_threshold=clip_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        weight_decay=weight_decay,
        factored_dims=factored_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
        momentum_mode=momentum_mode,
        maximize=maximize,
    )
    if path == "triton":
        fn(
            list(params),
            list(grads),
            list(exp_avg_sq_rows),
            list(exp_avg_sq_cols),
            list(exp_avg_sqs),
            list(exp_avgs),
            stochastic_rounding=stochastic_rounding,
            **settings,
        )
        return

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avg_sq_rows[i] for i in indices],
            [exp_avg_sq_cols[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [exp_avgs[i] for i in indices],
            **settings,
        )

    stochastically_rounded_params(run, params, stochastic_rounding)


def _implementation(path: str, on_cpu: bool) -> Callable[..., None]:
    if path == "triton":
        from danlu.algorithms.adafactor.triton import adafactor_triton

        return adafactor_triton
    if path == "foreach" or (path == "compiled" and not on_cpu):
        return _multi_tensor_adafactor
    # "single", "chunked" and, on CPU, "compiled": the loop holds one g²-sized buffer per
    # tensor and measured faster than the foreach math there (benchmarks/RESULTS.md)
    return _single_tensor_adafactor


def _cast_like(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [saturating_cast(t, other.dtype) for t, other in zip(tensors, like, strict=True)]


def _axes(param: Tensor, row: Tensor | None, factored_dims: str, min_dim: int) -> tuple[int, int]:
    axes = adafactor_factored_axes(
        param.shape, factored_dims=factored_dims, min_dim_size_to_factor=min_dim
    )
    if axes is None or row is None:
        raise ValueError(
            f"AdaFactor state does not match the factoring rule for a tensor of shape "
            f"{tuple(param.shape)} (factored_dims={factored_dims!r}, "
            f"min_dim_size_to_factor={min_dim})"
        )
    return axes


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


def _eps1_may_vanish(eps1: float, dtype: torch.dtype) -> bool:
    """Whether v̂ = g² + ε1 can be 0 (ε1 = 0, or below the statistics' smallest normal number
    and lost in the sum): then v̂^(-1/2) is floored so that a zero gradient gives 0, not 0·∞."""
    return eps1 < torch.finfo(dtype).tiny


def _apply(param: Tensor, source: Tensor, coef: float | Tensor) -> None:
    """θ ← θ − coef·source with coef a number or a 0-d tensor (kept on the device)."""
    if isinstance(coef, Tensor):
        param.addcmul_(source, coef, value=-1.0)
    else:
        param.add_(source, alpha=-coef)


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    *,
    beta2_t: float | Tensor,
    step_size: float | Tensor,
    beta1: float,
    eps1: float,
    eps2: float,
    clip_threshold: float | None,
    multiply_by_parameter_scale: bool,
    weight_decay: float,
    factored_dims: str,
    min_dim_size_to_factor: int,
    momentum_mode: str,
    maximize: bool,
) -> None:
    for param, grad, row, col, full, exp_avg in zip(
        params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, strict=True
    ):
        axes = (
            None if full is not None else _axes(param, row, factored_dims, min_dim_size_to_factor)
        )
        _adafactor_tensor(
            param,
            grad,
            row,
            col,
            full,
            exp_avg,
            axes=axes,
            beta2_t=beta2_t,
            step_size=step_size,
            beta1=beta1,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            weight_decay=weight_decay,
            momentum_mode=momentum_mode,
            maximize=maximize,
        )


def _adafactor_tensor(
    param: Tensor,
    grad: Tensor,
    row: Tensor | None,
    col: Tensor | None,
    full: Tensor | None,
    exp_avg: Tensor | None,
    *,
    axes: tuple[int, int] | None,
    beta2_t: float | Tensor,
    step_size: float | Tensor,
    beta1: float,
    eps1: float,
    eps2: float,
    clip_threshold: float | None,
    multiply_by_parameter_scale: bool,
    weight_decay: float,
    momentum_mode: str,
    maximize: bool,
) -> None:
    """One tensor's update; ``axes`` are the factored (largest, second) axes, None when
    unfactored."""
    stats = row if full is None else full
    assert stats is not None  # the shell always passes one layout
    g = grad.to(stats.dtype)
    if maximize:
        g = -g
    bound = gradient_bound(param.shape, axes, stats.dtype)
    g = g.clamp_(-bound, bound) if maximize or g.dtype != grad.dtype else g.clamp(-bound, bound)
    # One full-size temporary: g², then reused for the update.
    buffer = torch.square(g)
    if full is None:
        assert row is not None and col is not None and axes is not None
        largest, second = axes
        # mean(g² + ε1) = mean(g²) + ε1
        row.lerp_(buffer.mean(dim=largest, keepdim=True).add_(eps1), scalar_like(1 - beta2_t, row))
        col.lerp_(buffer.mean(dim=second, keepdim=True).add_(eps1), scalar_like(1 - beta2_t, col))
        [row_factor], [col_factor] = inverse_sqrt_factors(
            [row], [col], [row.mean(dim=second, keepdim=True)]
        )
        update = torch.mul(g, row_factor, out=buffer).mul_(col_factor)
    else:
        full.lerp_(buffer.add_(eps1), scalar_like(1 - beta2_t, full))
        if _eps1_may_vanish(eps1, full.dtype):
            update = torch.clamp_min(full, torch.finfo(full.dtype).tiny, out=buffer).rsqrt_()
        else:
            update = torch.rsqrt(full, out=buffer)
        update.mul_(g)
    clip_denom = None
    if clip_threshold is not None:
        clip_denom = finite_norm(update).div_(_rms_divisor(update) * clip_threshold)
        clip_denom.clamp_min_(1.0)
    if multiply_by_parameter_scale:
        scale = finite_norm(param, dtype=stats.dtype) / _rms_divisor(param)
        factor: float | Tensor = scale.clamp_min_(eps2).mul_(step_size)
    else:
        factor = step_size
    _finish_update(
        param,
        update,
        exp_avg,
        clip_denom,
        factor,
        beta1=beta1,
        momentum_mode=momentum_mode,
        weight_decay=weight_decay,
        step_size=step_size,
    )


def _finish_update(
    param: Tensor,
    update: Tensor,
    exp_avg: Tensor | None,
    clip_denom: Tensor | None,
    factor: float | Tensor,
    *,
    beta1: float,
    momentum_mode: str,
    weight_decay: float,
    step_size: float | Tensor,
) -> None:
    """Clipping, momentum, decay and the step, given the unit update u, the clipping
    denominator max(1, RMS(u)/d) (None: no clipping) and the factor α_t·s."""
    source, coef = update, factor
    if beta1 > 0 and momentum_mode == "unit":
        assert exp_avg is not None
        if clip_denom is not None:
            update.div_(clip_denom)
        exp_avg.lerp_(saturating_cast(update, exp_avg.dtype), 1 - beta1)
        source = exp_avg
    elif clip_denom is not None:
        coef = clip_denom.reciprocal_().mul_(factor)
    if beta1 > 0 and momentum_mode == "scaled":
        assert exp_avg is not None
        exp_avg.lerp_(saturating_cast(update.mul_(coef), exp_avg.dtype), 1 - beta1)
        source, coef = exp_avg, 1.0
    if weight_decay != 0:
        param.mul_(1 - step_size * weight_decay)
    _apply(param, source, coef)


def _dtensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    *,
    beta2_t: float | Tensor,
    step_size: float | Tensor,
    beta1: float,
    eps1: float,
    eps2: float,
    clip_threshold: float | None,
    multiply_by_parameter_scale: bool,
    weight_decay: float,
    factored_dims: str,
    min_dim_size_to_factor: int,
    momentum_mode: str,
    maximize: bool,
) -> None:
    """AdaFactor on DTensors (FSDP2): the single-tensor ops on the local slices, with the row
    and column means, the update RMS and the parameter RMS over the whole tensor. The partial
    sums of all tensors are all-reduced together, in three collectives per step (the
    statistics; the mean of the row statistic; the two RMS). The unit update is formed twice,
    once for its RMS and once to apply it, so that no tensor's update is kept while the
    others are formed."""
    n = len(params)
    axes = [
        _axes(p, r, factored_dims, min_dim_size_to_factor) if f is None else None
        for p, r, f in zip(params, exp_avg_sq_rows, exp_avg_sqs, strict=True)
    ]
    rows = [None if t is None else local(t) for t in exp_avg_sq_rows]
    cols = [None if t is None else local(t) for t in exp_avg_sq_cols]
    fulls = [None if t is None else local(t) for t in exp_avg_sqs]

    def gradient(i: int) -> Tensor:
        stats = rows[i] if fulls[i] is None else fulls[i]
        assert stats is not None  # the shell always passes one layout
        g = local(grads[i]).to(stats.dtype)
        g = -g if maximize else g
        bound = gradient_bound(params[i].shape, axes[i], stats.dtype)  # the global shape
        return g.clamp(-bound, bound)

    # 1. the second-moment statistics; mean(g² + ε1) = mean(g²) + ε1
    factored: list[tuple[int, int, int]] = []  # (index, largest axis, second axis)
    partials: list[Tensor] = []
    for i, (full, axis_pair) in enumerate(zip(fulls, axes, strict=True)):
        squares = torch.square(gradient(i))
        if full is not None:
            full.lerp_(squares.add_(eps1), scalar_like(1 - beta2_t, full))
            continue
        assert axis_pair is not None
        largest, second = axis_pair
        factored.append((i, largest, second))
        partials += [squares.sum(dim=largest, keepdim=True), squares.sum(dim=second, keepdim=True)]
    sums = reduce_partial_sums(
        partials,
        [params[i] for i, _, _ in factored for _ in (0, 1)],
        [axis for _, largest, second in factored for axis in (largest, second)],
    )
    for j, (i, largest, second) in enumerate(factored):
        row, col, shape = rows[i], cols[i], params[i].shape
        assert row is not None and col is not None
        row.lerp_(sums[2 * j].div_(shape[largest]).add_(eps1), scalar_like(1 - beta2_t, row))
        col.lerp_(sums[2 * j + 1].div_(shape[second]).add_(eps1), scalar_like(1 - beta2_t, col))
    # 2. the mean of the row statistic over the second axis
    row_sums = []
    for i, _, second in factored:
        row = rows[i]
        assert row is not None
        row_sums.append(row.sum(dim=second, keepdim=True))
    normalisers = reduce_partial_sums(
        row_sums, [params[i] for i, _, _ in factored], [second for _, _, second in factored]
    )
    row_factors: list[Tensor | None] = [None] * n
    col_factors: list[Tensor | None] = [None] * n
    if factored:
        f_row_factors, f_col_factors = inverse_sqrt_factors(
            [cast(Tensor, rows[i]) for i, _, _ in factored],
            [cast(Tensor, cols[i]) for i, _, _ in factored],
            [
                total.div_(params[i].shape[second])
                for (i, _, second), total in zip(factored, normalisers, strict=True)
            ],
        )
        for (i, _, _), r, c in zip(factored, f_row_factors, f_col_factors, strict=True):
            row_factors[i], col_factors[i] = r, c

    def unit_update(i: int) -> Tensor:
        g = gradient(i)
        full, row_factor, col_factor = fulls[i], row_factors[i], col_factors[i]
        if full is not None:
            if _eps1_may_vanish(eps1, full.dtype):
                full = full.clamp_min(torch.finfo(full.dtype).tiny)
            return torch.rsqrt(full).mul_(g)
        assert row_factor is not None and col_factor is not None
        return g.mul(row_factor).mul_(col_factor)

    # 3. the RMS of each update (clipping) and of each parameter (parameter scale); the sums
    # of squares in float64, which a huge update cannot overflow
    partials = []
    for i, param in enumerate(params):
        update = unit_update(i)
        partials.append(finite_sum_of_squares(update))
        partials.append(finite_sum_of_squares(local(param).to(update.dtype)))
    totals = reduce_partial_sums(partials, [p for p in params for _ in (0, 1)], [None] * (2 * n))
    stat_dtypes = [cast(Tensor, rows[i] if fulls[i] is None else fulls[i]).dtype for i in range(n)]
    totals = [t.sqrt().to(stat_dtypes[j // 2]) for j, t in enumerate(totals)]
    # 4. clipping, momentum, decay and the step
    for i, param in enumerate(params):
        divisor = _rms_divisor(param)
        clip_denom = None
        if clip_threshold is not None:
            clip_denom = totals[2 * i].div_(divisor * clip_threshold).clamp_min_(1.0)
        if multiply_by_parameter_scale:
            scale = totals[2 * i + 1].div_(divisor)
            factor: float | Tensor = scale.clamp_min_(eps2).mul_(step_size)
        else:
            factor = step_size
        exp_avg = exp_avgs[i]
        _finish_update(
            local(param),
            unit_update(i),
            None if exp_avg is None else local(exp_avg),
            clip_denom,
            factor,
            beta1=beta1,
            momentum_mode=momentum_mode,
            weight_decay=weight_decay,
            step_size=step_size,
        )


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    *,
    beta2_t: float | Tensor,
    step_size: float | Tensor,
    beta1: float,
    eps1: float,
    eps2: float,
    clip_threshold: float | None,
    multiply_by_parameter_scale: bool,
    weight_decay: float,
    factored_dims: str,
    min_dim_size_to_factor: int,
    momentum_mode: str,
    maximize: bool,
) -> None:
    grouped = group_by_device_and_dtype(
        [params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs]
    )
    for (device_params, device_grads, rows, cols, fulls, device_exp_avgs), _ in grouped:
        first_stats = rows[0] if fulls[0] is None else fulls[0]
        assert first_stats is not None
        stat_dtype = first_stats.dtype
        gs = [g.to(stat_dtype) for g in device_grads]
        gs = list(torch._foreach_neg(gs)) if maximize else gs
        gs = [
            g.clamp(-b, b)
            for g, b in zip(
                gs,
                _gradient_bounds(
                    device_params, rows, fulls, factored_dims, min_dim_size_to_factor, stat_dtype
                ),
                strict=True,
            )
        ]

        updates: list[Tensor] = list(gs)  # placeholders, replaced below
        factored = [i for i, full in enumerate(fulls) if full is None]
        unfactored = [i for i, full in enumerate(fulls) if full is not None]
        if factored:
            axes = [
                _axes(device_params[i], rows[i], factored_dims, min_dim_size_to_factor)
                for i in factored
            ]
            f_rows = [cast(Tensor, rows[i]) for i in factored]
            f_cols = [cast(Tensor, cols[i]) for i in factored]
            squares = list(torch._foreach_mul([gs[i] for i in factored], [gs[i] for i in factored]))
            row_means = [
                sq.mean(dim=a[0], keepdim=True) for sq, a in zip(squares, axes, strict=True)
            ]
            col_means = [
                sq.mean(dim=a[1], keepdim=True) for sq, a in zip(squares, axes, strict=True)
            ]
            del squares
            torch._foreach_add_(row_means, eps1)
            torch._foreach_add_(col_means, eps1)
            foreach_lerp_(f_rows, row_means, 1 - beta2_t)
            foreach_lerp_(f_cols, col_means, 1 - beta2_t)
            normalisers = [
                r.mean(dim=a[1], keepdim=True) for r, a in zip(f_rows, axes, strict=True)
            ]
            row_factors, col_factors = inverse_sqrt_factors(f_rows, f_cols, normalisers)
            f_updates = list(torch._foreach_mul([gs[i] for i in factored], row_factors))
            torch._foreach_mul_(f_updates, col_factors)
            for i, u in zip(factored, f_updates, strict=True):
                updates[i] = u
        if unfactored:
            u_fulls = [cast(Tensor, fulls[i]) for i in unfactored]
            u_grads = [gs[i] for i in unfactored]
            squares = list(torch._foreach_mul(u_grads, u_grads))
            torch._foreach_add_(squares, eps1)
            foreach_lerp_(u_fulls, squares, 1 - beta2_t)
            if _eps1_may_vanish(eps1, u_fulls[0].dtype):
                tiny = torch.finfo(u_fulls[0].dtype).tiny
                u_updates = list(torch._foreach_clamp_min(u_fulls, tiny))
                torch._foreach_rsqrt_(u_updates)
            else:
                u_updates = list(torch._foreach_rsqrt(u_fulls))
            torch._foreach_mul_(u_updates, u_grads)
            for i, u in zip(unfactored, u_updates, strict=True):
                updates[i] = u

        clip_denoms = None
        if clip_threshold is not None:
            clip_denoms = finite_norms(updates)
            torch._foreach_div_(clip_denoms, [_rms_divisor(u) * clip_threshold for u in updates])
            torch._foreach_clamp_min_(clip_denoms, 1.0)
        factors: list[Tensor] | float | Tensor
        if multiply_by_parameter_scale:
            factors = finite_norms(device_params, dtype=stat_dtype)
            torch._foreach_div_(factors, [_rms_divisor(p) for p in device_params])
            torch._foreach_clamp_min_(factors, eps2)
            torch._foreach_mul_(factors, step_size)
        else:
            factors = step_size
        sources, coefs = updates, factors
        use_momentum = beta1 > 0
        momenta = [cast(Tensor, m) for m in device_exp_avgs] if use_momentum else []
        if use_momentum and momentum_mode == "unit":
            if clip_denoms is not None:
                torch._foreach_div_(updates, clip_denoms)
            torch._foreach_lerp_(momenta, _cast_like(updates, momenta), 1 - beta1)
            sources = momenta
        elif clip_denoms is not None:
            torch._foreach_reciprocal_(clip_denoms)
            torch._foreach_mul_(clip_denoms, factors)
            coefs = clip_denoms
        if use_momentum and momentum_mode == "scaled":
            torch._foreach_mul_(updates, coefs)
            torch._foreach_lerp_(momenta, _cast_like(updates, momenta), 1 - beta1)
            sources, coefs = momenta, 1.0
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - step_size * weight_decay)
        if isinstance(coefs, list):
            torch._foreach_addcmul_(device_params, sources, coefs, value=-1.0)
        elif isinstance(coefs, Tensor):
            torch._foreach_addcmul_(device_params, sources, [coefs] * len(sources), value=-1.0)
        else:
            torch._foreach_add_(device_params, sources, alpha=-coefs)


def _gradient_bounds(
    params: list[Tensor],
    rows: list[Tensor | None],
    fulls: list[Tensor | None],
    factored_dims: str,
    min_dim_size_to_factor: int,
    dtype: torch.dtype,
) -> list[float]:
    """:func:`gradient_bound` of each tensor of a group."""
    return [
        gradient_bound(
            p.shape,
            None if full is not None else _axes(p, row, factored_dims, min_dim_size_to_factor),
            dtype,
        )
        for p, row, full in zip(params, rows, fulls, strict=True)
    ]

"""AdaFactor's functional entry and its paths, tensors in, tensors updated in place
(docs/reference/algorithms.md#adafactor-rule).

The rule itself, and every piece of it that the paths share, is in ``rule.py``
(:func:`~danlu.algorithms.adafactor.rule.adafactor_update_`). Paths: the single-tensor loop over
the rule (the reference, and the fastest on CPU), the foreach path (the rule on lists), the
DTensor path (the rule's pieces on local slices, every mean and norm over the whole tensor)
and the Triton kernels (``triton.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from danlu.algorithms.adafactor.rule import (
    FACTORED_DIMS,
    MOMENTUM_MODES,
    AdaFactorHyper,
    adafactor_beta2,
    adafactor_factored_axes,
    adafactor_step_size,
    adafactor_update_,
    apply_update_,
    check_modes,
    clip_denominator_,
    factored_axes_of,
    gradient_bound,
    inverse_sqrt_factors,
    inverse_sqrt_moment,
    moment_ema_,
    moment_floor,
    parameter_scale_,
    root_size,
    saturated_gradient,
)
from danlu.core.dtensor import any_dtensor, local, reduce_partial_sums
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import finite_norms, finite_sum_of_squares
from danlu.core.precision import saturating_cast, stochastically_rounded_params
from danlu.core.tensors import foreach_lerp_, group_by_device_and_dtype, select_path

__all__ = [
    "FACTORED_DIMS",
    "MOMENTUM_MODES",
    "adafactor",
    "adafactor_beta2",
    "adafactor_factored_axes",
    "adafactor_step",
    "adafactor_step_size",
]

# The statistics of each tensor: (params, grads, exp_avg_sq_rows, exp_avg_sq_cols,
# exp_avg_sqs, exp_avgs), one entry per tensor in each list.
Lists = tuple[
    Sequence[Tensor],
    Sequence[Tensor],
    Sequence[Tensor | None],
    Sequence[Tensor | None],
    Sequence[Tensor | None],
    Sequence[Tensor | None],
]


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
    ``foreach``/``fused`` choose the implementation (see ``core.tensors.select_path``):
    the Triton kernels on CUDA, the foreach path, or the single-tensor loop (there is no
    separate kernel without Triton: ``fused=True`` then runs the foreach path, or on CPU the
    single-tensor loop, the faster one there).
    DTensor (FSDP2) tensors take the single-tensor ops on their local slices, with every mean
    and norm over the whole tensor (state placed as ``danlu.distributed.new_state`` does).
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``core.precision``; inside the kernel on the Triton path); the statistics
    and the momentum are kept and rounded as without it.
    """
    check_modes(factored_dims, momentum_mode)
    if not params:
        return
    options = {
        "lr": lr,
        "relative_step": relative_step,
        "beta1": beta1,
        "beta2": beta2,
        "decay_rate": decay_rate,
        "eps1": eps1,
        "eps2": eps2,
        "clip_threshold": clip_threshold,
        "multiply_by_parameter_scale": multiply_by_parameter_scale,
        "weight_decay": weight_decay,
        "factored_dims": factored_dims,
        "min_dim_size_to_factor": min_dim_size_to_factor,
        "momentum_mode": momentum_mode,
        "maximize": maximize,
    }
    adafactor_step(
        (params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs),
        AdaFactorHyper.at_step(step, options),
        stochastic_rounding=stochastic_rounding,
        foreach=foreach,
        fused=fused,
    )


def adafactor_step(
    lists: Lists,
    hyper: AdaFactorHyper,
    *,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """:func:`adafactor` with the hyper-parameters of the step already built (how the
    optimizer calls it): chooses the path and runs it."""
    params, exp_avgs = lists[0], lists[5]
    if not params:
        return
    if hyper.beta1 > 0 and any(m is None for m in exp_avgs):
        raise ValueError("adafactor: beta1 > 0 needs a momentum tensor in exp_avgs for every param")
    path = "dtensor" if any_dtensor(params) else select_path(foreach, fused, params)
    if path == "dtensor":
        fn: Any = _dtensor_adafactor
    else:
        on_cpu = all(p.device.type == "cpu" for p in params)
        fn = _implementation(path, on_cpu)
    if path == "triton":
        fn(*(list(lst) for lst in lists), hyper, stochastic_rounding=stochastic_rounding)
        return

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(work, *([lst[i] for i in indices] for lst in lists[1:]), hyper)

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


@accepts_keywords(AdaFactorHyper)
def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    hyper: AdaFactorHyper,
) -> None:
    """The reference rule (:func:`~danlu.algorithms.adafactor.rule.adafactor_update_`), one
    tensor at a time."""
    for param, grad, row, col, full, exp_avg in zip(
        params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, strict=True
    ):
        adafactor_update_(param, grad, row, col, full, exp_avg, hyper)


def _dtensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    hyper: AdaFactorHyper,
) -> None:
    """AdaFactor on DTensors (FSDP2): the rule's pieces on the local slices, with the row
    and column means, the update RMS and the parameter RMS over the whole tensor. The partial
    sums of all tensors are all-reduced together, in three collectives per step (the
    statistics; the mean of the row statistic; the two RMS). The unit update is formed twice,
    once for its RMS and once to apply it, so that no tensor's update is kept while the
    others are formed."""
    n = len(params)
    axes = [
        factored_axes_of(p, r, hyper) if f is None else None
        for p, r, f in zip(params, exp_avg_sq_rows, exp_avg_sqs, strict=True)
    ]
    rows = [None if t is None else local(t) for t in exp_avg_sq_rows]
    cols = [None if t is None else local(t) for t in exp_avg_sq_cols]
    fulls = [None if t is None else local(t) for t in exp_avg_sqs]
    stat_dtypes = [cast(Tensor, rows[i] if fulls[i] is None else fulls[i]).dtype for i in range(n)]

    def gradient(i: int) -> Tensor:
        bound = gradient_bound(params[i].shape, axes[i], stat_dtypes[i])  # the global shape
        return saturated_gradient(local(grads[i]), stat_dtypes[i], bound, maximize=hyper.maximize)

    # 1. the second-moment statistics
    factored: list[tuple[int, int, int]] = []  # (index, largest axis, second axis)
    partials: list[Tensor] = []
    for i, (full, axis_pair) in enumerate(zip(fulls, axes, strict=True)):
        squares = torch.square(gradient(i))
        if full is not None:
            moment_ema_(full, squares, hyper)
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
        moment_ema_(row, sums[2 * j].div_(shape[largest]), hyper)
        moment_ema_(col, sums[2 * j + 1].div_(shape[second]), hyper)
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
            return inverse_sqrt_moment(full, hyper.eps1).mul_(g)
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
    totals = [t.sqrt().to(stat_dtypes[j // 2]) for j, t in enumerate(totals)]
    # 4. clipping, momentum, decay and the step
    for i, param in enumerate(params):
        root = root_size(param)  # the global size
        clip_denom = None
        if hyper.clip_threshold is not None:
            clip_denom = clip_denominator_(totals[2 * i], root * hyper.clip_threshold)
        factor = hyper.step_size
        if hyper.multiply_by_parameter_scale:
            factor = parameter_scale_(totals[2 * i + 1], root, hyper.eps2, hyper.step_size)
        exp_avg = exp_avgs[i]
        apply_update_(
            local(param),
            unit_update(i),
            None if exp_avg is None else local(exp_avg),
            clip_denom,
            factor,
            hyper,
        )


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    hyper: AdaFactorHyper,
) -> None:
    """The rule with foreach ops over each (device, dtype) group; each block names the piece
    of ``rule.py`` it restates on lists (the parity tests keep them equal)."""
    grouped = group_by_device_and_dtype(
        [params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs]
    )
    for (device_params, device_grads, rows, cols, fulls, device_exp_avgs), _ in grouped:
        first_stats = rows[0] if fulls[0] is None else fulls[0]
        assert first_stats is not None
        stat_dtype = first_stats.dtype
        axes = [
            None if full is not None else factored_axes_of(p, row, hyper)
            for p, row, full in zip(device_params, rows, fulls, strict=True)
        ]
        gs = [
            saturated_gradient(
                g, stat_dtype, gradient_bound(p.shape, a, stat_dtype), maximize=hyper.maximize
            )
            for p, g, a in zip(device_params, device_grads, axes, strict=True)
        ]

        updates: list[Tensor] = list(gs)  # placeholders, replaced below
        factored = [i for i, full in enumerate(fulls) if full is None]
        unfactored = [i for i, full in enumerate(fulls) if full is not None]
        if factored:
            f_axes = [cast(tuple[int, int], axes[i]) for i in factored]
            f_rows = [cast(Tensor, rows[i]) for i in factored]
            f_cols = [cast(Tensor, cols[i]) for i in factored]
            squares = list(torch._foreach_mul([gs[i] for i in factored], [gs[i] for i in factored]))
            row_means = [
                sq.mean(dim=a[0], keepdim=True) for sq, a in zip(squares, f_axes, strict=True)
            ]
            col_means = [
                sq.mean(dim=a[1], keepdim=True) for sq, a in zip(squares, f_axes, strict=True)
            ]
            del squares
            # rule.moment_ema_ on lists
            torch._foreach_add_(row_means, hyper.eps1)
            torch._foreach_add_(col_means, hyper.eps1)
            foreach_lerp_(f_rows, row_means, 1 - hyper.beta2_t)
            foreach_lerp_(f_cols, col_means, 1 - hyper.beta2_t)
            normalisers = [
                r.mean(dim=a[1], keepdim=True) for r, a in zip(f_rows, f_axes, strict=True)
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
            # rule.moment_ema_ on lists
            torch._foreach_add_(squares, hyper.eps1)
            foreach_lerp_(u_fulls, squares, 1 - hyper.beta2_t)
            # rule.inverse_sqrt_moment on lists
            floor = moment_floor(hyper.eps1, u_fulls[0].dtype)
            if floor is not None:
                u_updates = list(torch._foreach_clamp_min(u_fulls, floor))
                torch._foreach_rsqrt_(u_updates)
            else:
                u_updates = list(torch._foreach_rsqrt(u_fulls))
            torch._foreach_mul_(u_updates, u_grads)
            for i, u in zip(unfactored, u_updates, strict=True):
                updates[i] = u

        clip_denoms = None
        if hyper.clip_threshold is not None:
            # rule.clip_denominator_ on lists
            clip_denoms = finite_norms(updates)
            d = hyper.clip_threshold
            torch._foreach_div_(clip_denoms, [root_size(u) * d for u in updates])
            torch._foreach_clamp_min_(clip_denoms, 1.0)
        factors: list[Tensor] | float | Tensor
        if hyper.multiply_by_parameter_scale:
            # rule.parameter_scale_ on lists
            factors = finite_norms(device_params, dtype=stat_dtype)
            torch._foreach_div_(factors, [root_size(p) for p in device_params])
            torch._foreach_clamp_min_(factors, hyper.eps2)
            torch._foreach_mul_(factors, hyper.step_size)
        else:
            factors = hyper.step_size
        _foreach_apply_update_(device_params, updates, device_exp_avgs, clip_denoms, factors, hyper)


def _foreach_apply_update_(
    params: list[Tensor],
    updates: list[Tensor],
    exp_avgs: list[Tensor | None],
    clip_denoms: list[Tensor] | None,
    factors: list[Tensor] | float | Tensor,
    hyper: AdaFactorHyper,
) -> None:
    """rule.apply_update_ on lists: clipping, momentum, decay and the step."""
    sources, coefs = updates, factors
    momenta = [cast(Tensor, m) for m in exp_avgs] if hyper.momentum else []
    if hyper.momentum == "unit":
        if clip_denoms is not None:
            torch._foreach_div_(updates, clip_denoms)
        torch._foreach_lerp_(momenta, _cast_like(updates, momenta), 1 - hyper.beta1)
        sources = momenta
    elif clip_denoms is not None:
        torch._foreach_reciprocal_(clip_denoms)
        torch._foreach_mul_(clip_denoms, factors)
        coefs = clip_denoms
    if hyper.momentum == "scaled":
        torch._foreach_mul_(updates, coefs)
        torch._foreach_lerp_(momenta, _cast_like(updates, momenta), 1 - hyper.beta1)
        sources, coefs = momenta, 1.0
    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, 1 - hyper.step_size * hyper.weight_decay)
    if isinstance(coefs, list):
        torch._foreach_addcmul_(params, sources, coefs, value=-1.0)
    elif isinstance(coefs, Tensor):
        torch._foreach_addcmul_(params, sources, [coefs] * len(sources), value=-1.0)
    else:
        torch._foreach_add_(params, sources, alpha=-coefs)


def _cast_like(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    return [saturating_cast(t, other.dtype) for t, other in zip(tensors, like, strict=True)]

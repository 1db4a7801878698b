"""AdaFactor (docs/reference/algorithms.md#adafactor-rule) with Triton kernels for the passes over
full-size tensors.

Per (device, dtypes, layout) group of tensors:

1. the row and column statistics stay torch ops (one column and one row reduction of g per
   factored tensor, foreach EMAs), and the small row factors (R/mean(R))^(-1/2) and column
   factors C^(-1/2) are packed into one workspace;
2. a reduction kernel (several tensors per launch) computes Σu² per tensor for the update
   clipping, u = g·(R/mean(R))^(-1/2)·C^(-1/2) (or g/√v̂), and Σθ² for the parameter scale,
   as per-block partial sums that a second kernel adds up per tensor (deterministic, no
   atomics); an unfactored v̂ is updated in this pass;
3. the clipping and scale coefficients are formed on the device from those sums;
4. one fused update pass reads g (and v̂, the momentum) and writes θ (and the momentum).

No host synchronisation: every per-tensor number stays on the device, hyper-parameters and
tables are small cached device tensors. The factored statistics are indexed by integer
arithmetic on the flat element index, specialised per layout so that a matrix costs one
division per element.

The host side takes the hyper-parameters as one ``AdaFactorHyper`` and the rule's named pieces
from ``rule.py`` (saturation bound, factored second moment, clipping and scale coefficients);
the kernel bodies restate the per-element arithmetic, each block naming the rule piece it
mirrors (tests/test_kernels_triton.py keeps them equal to the single-tensor path). The kernels
keep long argument lists: Triton needs every pointer and constexpr as its own argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.algorithms.adafactor.rule import (
    AdaFactorHyper,
    clip_denominator_,
    factored_axes_of,
    gradient_bound,
    inverse_sqrt_factors,
    parameter_scale_,
    root_size,
    saturated_gradient,
)
from danlu.core.hyper import accepts_keywords
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    ScalarTable,
    compute_dtype,
    contiguous_or_raise,
    device_scalars,
    div_rn,
    int_table,
    launch_tables,
    lerp,
    load,
    lr_tensor,
    round_to,
    seed_tensor,
    segment_sums,
    sqrt_rn,
    store_rounded,
    triton_dtype,
    typed_pointer,
)

__all__ = ["adafactor_triton"]

_MOMENTUM = {None: 0, "unit": 1, "scaled": 2}  # the MOMENTUM constexpr of hyper.momentum


# The kernels' scalar table (``hyper_ptr``, in the compute dtype): this order is the one
# definition of the offsets named below.
_SCALARS = ScalarTable("one_minus_beta2", "eps1", "one_minus_beta1", "weight_decay", "tiny")
ONE_MINUS_BETA2 = _SCALARS.at("one_minus_beta2")  # 1 − β̂_t
EPS1 = _SCALARS.at("eps1")  # ε1
ONE_MINUS_BETA1 = _SCALARS.at("one_minus_beta1")  # 1 − β1
WEIGHT_DECAY = _SCALARS.at("weight_decay")  # λ
TINY = _SCALARS.at("tiny")  # the floor of a full v̂ (rule.moment_floor)


def _scalar_table(hyper: AdaFactorHyper, compute: torch.dtype, device: torch.device) -> Tensor:
    """The kernels' scalars by name."""
    values = {
        "one_minus_beta2": 1 - cast(float, hyper.beta2_t),
        "eps1": hyper.eps1,
        "one_minus_beta1": 1 - hyper.beta1,
        "weight_decay": hyper.weight_decay,
        "tiny": torch.finfo(compute).tiny,
    }
    return _SCALARS.tensor(values, compute, device)


@triton.jit
def _rsqrt(x):
    return div_rn(1.0, sqrt_rn(x))


@triton.jit
def _factored_scale(
    g,
    offs,
    mask,
    tid,
    info_ptr,
    factors_ptr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
):
    """u = g·rf·cf for a tensor viewed as (P, n_a, Q, n_b, S) with factored axes a < b: the
    statistic without axis a is indexed by (p, q, j, s), the one without b by (p, i, q, s).
    ``info`` holds 7 integers per tensor: n_a, Q, n_b, S, whether a is the largest axis, and
    the offsets of the row and column factors in the workspace."""
    info = info_ptr + tid * 7
    n_a = tl.load(info).to(INDEX)
    big_q = tl.load(info + 1).to(INDEX)
    n_b = tl.load(info + 2).to(INDEX)
    big_s = tl.load(info + 3).to(INDEX)
    largest_is_a = tl.load(info + 4) != 0
    row_offset = tl.load(info + 5)
    col_offset = tl.load(info + 6)
    k = offs.to(INDEX)
    # k = (((p·n_a + i)·Q + q)·n_b + j)·S + s; the divisions by sizes known to be 1 are skipped
    t = k if S1 else k // big_s
    s = 0 if S1 else k - t * big_s
    u = t // n_b
    j = t - u * n_b
    w = u if Q1 else u // big_q
    q = 0 if Q1 else u - w * big_q
    p = 0 if P1 else w // n_a
    i = w - p * n_a
    without_a = ((p * big_q + q) * n_b + j) * big_s + s
    without_b = ((p * n_a + i) * big_q + q) * big_s + s
    # R is averaged over the largest axis, C over the second
    row_index = tl.where(largest_is_a, without_a, without_b)
    col_index = tl.where(largest_is_a, without_b, without_a)
    row_factor = load(factors_ptr + row_offset + row_index, mask, 0.0)
    col_factor = load(factors_ptr + col_offset + col_index, mask, 0.0)
    return g * row_factor * col_factor


@triton.jit
def _unit_update(
    g,
    v_ptr,
    offs,
    mask,
    tid,
    info_ptr,
    factors_ptr,
    hyper_ptr,
    FACTORED: tl.constexpr,
    UPDATE_V: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
):
    if FACTORED:
        u = _factored_scale(g, offs, mask, tid, info_ptr, factors_ptr, P1, Q1, S1, INDEX)
    else:
        v = load(v_ptr + offs, mask, 1.0).to(COMPUTE)
        if UPDATE_V:
            # rule.moment_ema_: v̂ ← lerp(v̂, g² + ε1, 1 − β̂_t)
            v = lerp(v, g * g + tl.load(hyper_ptr + EPS1), tl.load(hyper_ptr + ONE_MINUS_BETA2))
            tl.store(v_ptr + offs, round_to(v, V_DTYPE), mask=mask)
        # rule.inverse_sqrt_moment: v̂ = 0 only where every gradient was 0 (ε1 = 0), a 0
        # update, not 0·∞; floored always here (a no-op where the rule needs no floor)
        tiny = tl.load(hyper_ptr + TINY)
        u = _rsqrt(tl.where(v < tiny, tiny, v)) * g
    return u


@triton.jit
def _saturated(g, bound_ptr, tid):
    """rule.saturated_gradient: g clamped to ± the tensor's bound (its squares along a row
    stay finite); NaN kept."""
    bound = tl.load(bound_ptr + tid).to(g.dtype)
    return tl.where(g > bound, bound, tl.where(g < -bound, -bound, g))


@triton.jit
def _reduce_block(
    p_ptr,
    g_ptr,
    v_ptr,
    offs,
    mask,
    tid,
    info_ptr,
    factors_ptr,
    hyper_ptr,
    bound_ptr,
    FACTORED: tl.constexpr,
    UPDATE_V: tl.constexpr,
    CLIP: tl.constexpr,
    SCALE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
):
    """(Σu², Σθ²) over one block, in float64 (a huge u cannot overflow them); an unfactored v̂
    is updated on the way."""
    u_sum = 0.0
    p_sum = 0.0
    if CLIP or UPDATE_V:
        g = _saturated(load(g_ptr + offs, mask, 0.0).to(COMPUTE), bound_ptr, tid)
        u = _unit_update(
            g, v_ptr, offs, mask, tid, info_ptr, factors_ptr, hyper_ptr,
            FACTORED, UPDATE_V, V_DTYPE, COMPUTE, P1, Q1, S1, INDEX,
        )  # fmt: skip
        u = u.to(tl.float64)
        u_sum = tl.sum(u * u if mask is None else tl.where(mask, u * u, 0.0), axis=0)
    if SCALE:
        p = load(p_ptr + offs, mask, 0.0).to(tl.float64)
        p_sum = tl.sum(p * p, axis=0)
    return u_sum, p_sum


@triton.jit
def _adafactor_reduce_kernel(
    p_addrs,
    g_addrs,
    v_addrs,
    sizes,
    block_tensor,
    block_index,
    info_ptr,
    factors_ptr,
    hyper_ptr,  # the scalar table: _SCALARS
    bound_ptr,  # per tensor: the gradient's saturation bound
    partials,  # (2, programs): Σu², Σθ² per block, float64
    num_programs,
    FACTORED: tl.constexpr,
    UPDATE_V: tl.constexpr,
    CLIP: tl.constexpr,
    SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(block_tensor + pid)
    start = tl.load(block_index + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    size = tl.load(sizes + tid)
    p_ptr = typed_pointer(p_addrs, tid, P_DTYPE, ALIGNED)
    g_ptr = typed_pointer(g_addrs, tid, G_DTYPE, ALIGNED)
    v_ptr = typed_pointer(v_addrs, tid, V_DTYPE, ALIGNED)
    if start + BLOCK <= size:  # a full block: no mask, vector loads
        u_sum, p_sum = _reduce_block(
            p_ptr, g_ptr, v_ptr, offs, None, tid, info_ptr, factors_ptr, hyper_ptr, bound_ptr,
            FACTORED, UPDATE_V, CLIP, SCALE, V_DTYPE, COMPUTE, P1, Q1, S1, INDEX,
        )  # fmt: skip
    else:
        u_sum, p_sum = _reduce_block(
            p_ptr, g_ptr, v_ptr, offs, offs < size, tid, info_ptr, factors_ptr, hyper_ptr,
            bound_ptr, FACTORED, UPDATE_V, CLIP, SCALE, V_DTYPE, COMPUTE, P1, Q1, S1, INDEX,
        )  # fmt: skip
    if CLIP or UPDATE_V:
        tl.store(partials + pid, u_sum)
    if SCALE:
        tl.store(partials + num_programs + pid, p_sum)


@triton.jit
def _update_block(
    p_ptr,
    g_ptr,
    v_ptr,
    m_addrs,
    offs,
    mask,
    tid,
    info_ptr,
    factors_ptr,
    hyper_ptr,
    bound_ptr,
    step_ptr,
    clip_ptr,
    factor_ptr,
    coef_ptr,
    seed_ptr,
    FACTORED: tl.constexpr,
    UPDATE_V: tl.constexpr,
    MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
):
    g = load(g_ptr + offs, mask, 0.0).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    g = _saturated(g, bound_ptr, tid)
    u = _unit_update(
        g, v_ptr, offs, mask, tid, info_ptr, factors_ptr, hyper_ptr,
        FACTORED, UPDATE_V, V_DTYPE, COMPUTE, P1, Q1, S1, INDEX,
    )  # fmt: skip
    # rule.apply_update_
    if MOMENTUM == 0:
        source = u
        coef = tl.load(coef_ptr + tid).to(COMPUTE)
    else:
        if MOMENTUM == 1:
            # unit order: the EMA of the clipped û, then θ ← θ − α_t·s·m
            u = div_rn(u, tl.load(clip_ptr + tid).to(COMPUTE))
            coef = tl.load(factor_ptr + tid).to(COMPUTE)
        else:
            # scaled order: the EMA of α_t·s·û, then θ ← θ − m
            u = u * tl.load(coef_ptr + tid).to(COMPUTE)
            coef = 1.0
        m_ptr = typed_pointer(m_addrs, tid, M_DTYPE, ALIGNED)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        weight = tl.load(hyper_ptr + ONE_MINUS_BETA1)
        m = round_to(lerp(m, round_to(u, M_DTYPE).to(COMPUTE), weight), M_DTYPE)
        tl.store(m_ptr + offs, m, mask=mask)
        source = m.to(COMPUTE)
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    if DECAY:
        p = p * (1 - tl.load(step_ptr).to(COMPUTE) * tl.load(hyper_ptr + WEIGHT_DECAY))
    p = p - coef * source
    store_rounded(p_ptr, offs, p, mask, seed_ptr, tid, P_DTYPE, STOCHASTIC)


@triton.jit
def _adafactor_update_kernel(
    p_addrs,
    g_addrs,
    v_addrs,
    m_addrs,
    sizes,
    block_tensor,
    block_index,
    info_ptr,
    factors_ptr,
    hyper_ptr,  # the scalar table: _SCALARS
    bound_ptr,  # per tensor: the gradient's saturation bound
    step_ptr,  # α_t, for the decay
    clip_ptr,  # per tensor: max(1, RMS(u)/d)
    factor_ptr,  # per tensor: α_t·max(ε2, RMS(θ)) (or α_t)
    coef_ptr,  # per tensor: factor / clip
    seed_ptr,  # the Philox seed of stochastic rounding (unused without it)
    FACTORED: tl.constexpr,
    UPDATE_V: tl.constexpr,
    MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    P1: tl.constexpr,
    Q1: tl.constexpr,
    S1: tl.constexpr,
    INDEX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(block_tensor + pid)
    start = tl.load(block_index + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    size = tl.load(sizes + tid)
    p_ptr = typed_pointer(p_addrs, tid, P_DTYPE, ALIGNED)
    g_ptr = typed_pointer(g_addrs, tid, G_DTYPE, ALIGNED)
    v_ptr = typed_pointer(v_addrs, tid, V_DTYPE, ALIGNED)
    if start + BLOCK <= size:  # a full block: no mask, vector loads
        _update_block(
            p_ptr, g_ptr, v_ptr, m_addrs, offs, None, tid, info_ptr, factors_ptr, hyper_ptr,
            bound_ptr, step_ptr, clip_ptr, factor_ptr, coef_ptr, seed_ptr, FACTORED, UPDATE_V,
            MOMENTUM, MAXIMIZE, DECAY, STOCHASTIC, ALIGNED, P_DTYPE, V_DTYPE, M_DTYPE, COMPUTE,
            P1, Q1, S1, INDEX,
        )  # fmt: skip
    else:
        _update_block(
            p_ptr, g_ptr, v_ptr, m_addrs, offs, offs < size, tid, info_ptr, factors_ptr,
            hyper_ptr, bound_ptr, step_ptr, clip_ptr, factor_ptr, coef_ptr, seed_ptr, FACTORED,
            UPDATE_V, MOMENTUM, MAXIMIZE, DECAY, STOCHASTIC, ALIGNED, P_DTYPE, V_DTYPE, M_DTYPE,
            COMPUTE, P1, Q1, S1, INDEX,
        )  # fmt: skip


def _layout(shape: Sequence[int], largest: int, second: int) -> tuple[int, ...]:
    """(P, n_a, Q, n_b, S, largest is a) for a tensor with factored axes a < b."""
    a, b = sorted((largest, second))
    return (
        math.prod(shape[:a]),
        shape[a],
        math.prod(shape[a + 1 : b]),
        shape[b],
        math.prod(shape[b + 1 :]),
        int(largest == a),
    )


@accepts_keywords(AdaFactorHyper)
def adafactor_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    hyper: AdaFactorHyper,
    *,
    stochastic_rounding: bool | None = False,
) -> None:
    """AdaFactor on contiguous tensors (same arguments as ``functional._single_tensor_adafactor``:
    ``hyper``, or its fields by name); ``stochastic_rounding`` rounds bf16/fp16 parameters
    stochastically (``core.precision.rounds_stochastically``)."""
    # Tensors are grouped by device and dtypes (the kernels' pointer types), and factored ones
    # also by layout: which of P, Q, S are 1 (so a matrix needs one division per element)
    # and whether 64-bit indices are needed.
    buckets: dict[tuple, list[int]] = {}
    axes: dict[int, tuple[int, int]] = {}
    for i, (p, g, full, m) in enumerate(zip(params, grads, exp_avg_sqs, exp_avgs, strict=True)):
        layout_key: tuple = ()
        if full is None:
            axes[i] = factored_axes_of(p, exp_avg_sq_rows[i], hyper)
            lay = _layout(p.shape, *axes[i])
            layout_key = (lay[0] == 1, lay[2] == 1, lay[4] == 1, p.numel() >= 2**31)
        stats = exp_avg_sq_rows[i] if full is None else full
        assert stats is not None
        key = (p.device, p.dtype, g.dtype, stats.dtype, None if m is None else m.dtype)
        buckets.setdefault((full is None, *key, *layout_key), []).append(i)
    for bucket, indices in buckets.items():
        is_factored = bucket[0]
        ps = [params[i] for i in indices]
        gs = [grads[i] for i in indices]
        ms = [exp_avgs[i] for i in indices]
        if is_factored:
            rows = [cast(Tensor, exp_avg_sq_rows[i]) for i in indices]
            cols = [cast(Tensor, exp_avg_sq_cols[i]) for i in indices]
            group_axes: list[tuple[int, int]] | None = [axes[i] for i in indices]
        else:
            rows = [cast(Tensor, exp_avg_sqs[i]) for i in indices]
            cols, group_axes = None, None
        _launch(
            (ps, gs, rows, cols, ms),
            group_axes,
            hyper,
            stochastic=rounds_stochastically(stochastic_rounding, ps[0].dtype),
        )


def _factors(
    grads: list[Tensor],
    rows: list[Tensor],
    cols: list[Tensor],
    axes: list[tuple[int, int]],
    bounds: list[float],
    hyper: AdaFactorHyper,
) -> tuple[Tensor, list[int], list[int]]:
    """Update R and C with torch ops (rule.moment_ema_ on lists); return the packed row factors
    (R/mean(R))^(-1/2) and column factors C^(-1/2), with each one's offset in the workspace."""
    dtype = rows[0].dtype
    # the gradients saturated like the kernels read them (one tensor's copy at a time would
    # do, but the norms below read each twice)
    grads = [saturated_gradient(g, dtype, b) for g, b in zip(grads, bounds, strict=True)]
    # mean(g²) over an axis as ‖g‖²/n: one read of g, no g² temporary
    row_means = [
        torch.linalg.vector_norm(g, dim=a[0], keepdim=True, dtype=dtype)
        for g, a in zip(grads, axes, strict=True)
    ]
    col_means = [
        torch.linalg.vector_norm(g, dim=a[1], keepdim=True, dtype=dtype)
        for g, a in zip(grads, axes, strict=True)
    ]
    torch._foreach_mul_(row_means, row_means)
    torch._foreach_mul_(col_means, col_means)
    torch._foreach_div_(row_means, [float(g.shape[a[0]]) for g, a in zip(grads, axes, strict=True)])
    torch._foreach_div_(col_means, [float(g.shape[a[1]]) for g, a in zip(grads, axes, strict=True)])
    torch._foreach_add_(row_means, hyper.eps1)
    torch._foreach_add_(col_means, hyper.eps1)
    torch._foreach_lerp_(rows, row_means, 1 - cast(float, hyper.beta2_t))
    torch._foreach_lerp_(cols, col_means, 1 - cast(float, hyper.beta2_t))
    normalisers = [r.mean(dim=a[1], keepdim=True) for r, a in zip(rows, axes, strict=True)]
    row_factors, col_factors = inverse_sqrt_factors(rows, cols, normalisers)
    packed = [t.reshape(-1) for t in (*row_factors, *col_factors)]
    offsets = [0]
    for t in packed:
        offsets.append(offsets[-1] + t.numel())
    n = len(rows)
    return torch.cat(packed), offsets[:n], offsets[n : 2 * n]


def _launch(
    tensors: tuple[
        list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor | None]
    ],
    axes: list[tuple[int, int]] | None,
    hyper: AdaFactorHyper,
    *,
    stochastic: bool,
) -> None:
    """One group (params, grads, the row statistics or full v̂, the column statistics or
    None, the momenta) with its factored axes (None: unfactored): the statistics, the
    reduction pass, the coefficients, the update pass."""
    params, grads, stats, cols, exp_avgs = tensors
    momenta = [cast(Tensor, m) for m in exp_avgs] if hyper.momentum else params
    contiguous_or_raise([*params, *grads, *stats, *momenta], "AdaFactor")
    device, stat_dtype = params[0].device, stats[0].dtype
    compute = compute_dtype(params[0].dtype, stat_dtype)
    tables = launch_tables([params, grads, stats, momenta])
    hyper_table = _scalar_table(hyper, compute, device)
    step = lr_tensor(hyper.step_size, compute, device)
    factored = cols is not None
    bounds = [
        gradient_bound(p.shape, None if axes is None else axes[i], stat_dtype)
        for i, p in enumerate(params)
    ]
    bound_table = device_scalars(bounds, compute, device)
    if factored:
        assert axes is not None and cols is not None
        factors, row_offsets, col_offsets = _factors(grads, stats, cols, axes, bounds, hyper)
        layouts = [_layout(p.shape, *a) for p, a in zip(params, axes, strict=True)]
        info = int_table(
            [
                v
                for lay, ro, co in zip(layouts, row_offsets, col_offsets, strict=True)
                for v in (lay[1], lay[2], lay[3], lay[4], lay[5], ro, co)
            ],
            torch.int64,
            device,
        )
        p1, q1, s1 = (all(lay[k] == 1 for lay in layouts) for k in (0, 2, 4))
        wide = any(p.numel() >= 2**31 for p in params)
    else:
        factors, info = hyper_table, hyper_table  # unused placeholders
        p1 = q1 = s1 = True
        wide = False
    if tables.num_programs == 0:  # only empty tensors
        return
    clip = hyper.clip_threshold is not None
    common = {
        "FACTORED": factored,
        "P_DTYPE": triton_dtype(params[0].dtype),
        "G_DTYPE": triton_dtype(grads[0].dtype),
        "V_DTYPE": triton_dtype(stat_dtype),
        "COMPUTE": triton_dtype(compute),
        "P1": p1,
        "Q1": q1,
        "S1": s1,
        "INDEX": tl.int64 if wide else tl.int32,
        "ALIGNED": tables.aligned,
        "BLOCK": BLOCK,
    }
    n = len(params)
    reduce_first = clip or hyper.multiply_by_parameter_scale
    sums = None
    if reduce_first:
        partials = torch.empty(2, tables.num_programs, dtype=torch.float64, device=device)
        _adafactor_reduce_kernel[(tables.num_programs,)](
            *tables.addresses[:3],
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            info,
            factors,
            hyper_table,
            bound_table,
            partials,
            tables.num_programs,
            UPDATE_V=not factored,
            CLIP=clip,
            SCALE=hyper.multiply_by_parameter_scale,
            **common,
        )
        # the roots in float64, then in the compute dtype (inf only where RMS(u) itself
        # exceeds its range: that tensor's update is then 0, not NaN)
        sums = segment_sums(partials, tables).sqrt_().to(compute)
    roots = [root_size(p) for p in params]
    if clip:
        assert sums is not None
        divisors = [r * cast(float, hyper.clip_threshold) for r in roots]
        clip_denoms = clip_denominator_(sums[0], device_scalars(divisors, compute, device))
    else:
        clip_denoms = device_scalars([1.0] * n, compute, device)
    if hyper.multiply_by_parameter_scale:
        assert sums is not None
        factor = parameter_scale_(sums[1], device_scalars(roots, compute, device), hyper.eps2, step)
    else:
        factor = step.expand(n).contiguous()
    coef = clip_denoms.reciprocal().mul_(factor)
    _adafactor_update_kernel[(tables.num_programs,)](
        *tables.addresses,
        tables.sizes,
        tables.block_tensor,
        tables.block_index,
        info,
        factors,
        hyper_table,
        bound_table,
        step,
        clip_denoms,
        factor,
        coef,
        seed_tensor(device) if stochastic else step,
        UPDATE_V=not factored and not reduce_first,
        MOMENTUM=_MOMENTUM[hyper.momentum],
        MAXIMIZE=hyper.maximize,
        DECAY=hyper.weight_decay != 0,
        STOCHASTIC=stochastic,
        M_DTYPE=triton_dtype(momenta[0].dtype),
        **common,
    )

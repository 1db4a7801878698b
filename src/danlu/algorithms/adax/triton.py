"""AdaX (docs/reference/algorithms.md#adax-rule, ``rule.adax_update_``) as one Triton kernel
launch per dtype combination, several tensors per launch: m, the normalised v̂ and θ are
read and written once each.

Math in the statistics' precision (fp32, fp64 for fp64 parameters) with one rounding per
stored value; the momentum is rounded to its dtype before the update reads it, as in the
eager path. The lr and the per-step weight 1 − β̂_t are read from device memory: a
scheduler or the step count changes them without recompiling or synchronising.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.algorithms.adax.rule import AdaXHyper, denominator_floor
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import square_bound
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    ScalarTable,
    compute_dtype,
    contiguous_or_raise,
    div_rn,
    group_by_dtypes,
    launch_tables,
    lerp,
    lr_tensor,
    round_to,
    seed_tensor,
    sqrt_rn,
    store_rounded,
    triton_dtype,
    typed_pointer,
)

__all__ = ["adax_triton"]

# The kernel's scalar table (``hyper_ptr``, in the compute dtype): this order is the one
# definition of the offsets named below.
_SCALARS = ScalarTable(
    "one_minus_beta1",
    "new_sample_weight",
    "eps",
    "weight_decay",
    "floor",
    "bound",
)
_ONE_MINUS_BETA1 = _SCALARS.at("one_minus_beta1")  # 1 − β1
_NEW_SAMPLE_WEIGHT = _SCALARS.at("new_sample_weight")  # 1 − β̂_t
_EPS = _SCALARS.at("eps")  # ε
_WEIGHT_DECAY = _SCALARS.at("weight_decay")  # λ
_FLOOR = _SCALARS.at("floor")  # rule.denominator_floor (0 where ε keeps it above 0)
_BOUND = _SCALARS.at("bound")  # where g² would overflow v̂'s dtype


def _scalar_table(
    hyper: AdaXHyper, bound: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The kernel's scalars by name; 1 − β1 computed on the host in fp64, as the eager path
    does."""
    floor = denominator_floor(hyper.eps, dtype)
    values = {
        "one_minus_beta1": 1 - hyper.beta1,
        "new_sample_weight": float(hyper.new_sample_weight),
        "eps": hyper.eps,
        "weight_decay": hyper.weight_decay,
        "floor": 0.0 if floor is None else floor,
        "bound": bound,
    }
    return _SCALARS.tensor(values, dtype, device)


@triton.jit
def _adax_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    offs,
    mask,
    lr,
    hyper_ptr,
    seed_ptr,
    tid,
    MAXIMIZE: tl.constexpr,
    EPS_INSIDE_SQRT: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    P_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # the lines of rule.adax_update_, on the loaded values:
    # read_grad: −g with maximize, in v̂'s dtype, saturated where g² would overflow it
    # (NaN stays NaN)
    g = tl.load(g_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    eps = tl.load(hyper_ptr + _EPS)
    gv = round_to(g, V_DTYPE).to(COMPUTE)
    bound = tl.load(hyper_ptr + _BOUND)
    gv = tl.where(gv > bound, bound, tl.where(gv < -bound, -bound, gv))
    # m ← lerp(m, g, 1 − β1) in m's dtype; the update reads the stored (rounded) m
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    m = round_to(
        lerp(m, round_to(gv, M_DTYPE).to(COMPUTE), tl.load(hyper_ptr + _ONE_MINUS_BETA1)), M_DTYPE
    )
    tl.store(m_ptr + offs, m, mask=mask)
    # v̂ ← lerp(v̂, g², 1 − β̂_t)
    v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
    v = lerp(v, gv * gv, tl.load(hyper_ptr + _NEW_SAMPLE_WEIGHT))
    tl.store(v_ptr + offs, round_to(v, V_DTYPE), mask=mask)
    # denominator: √v̂ + ε or √(v̂ + ε), at least its floor (a no-op where ε is above it)
    denom = sqrt_rn(v + eps) if EPS_INSIDE_SQRT else sqrt_rn(v) + eps
    floor = tl.load(hyper_ptr + _FLOOR)
    denom = tl.where(denom < floor, floor, denom)
    # θ·(1 − αλ) − α·m / denominator
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    if DECAY:
        p = p * (1 - lr * tl.load(hyper_ptr + _WEIGHT_DECAY))
    p = p - div_rn(lr * m.to(COMPUTE), denom)
    store_rounded(p_ptr, offs, p, mask, seed_ptr, tid, P_DTYPE, STOCHASTIC)


@triton.jit
def _adax_kernel(
    p_addrs,
    g_addrs,
    m_addrs,
    v_addrs,
    sizes,
    block_tensor,
    block_index,
    lr_ptr,
    hyper_ptr,  # _scalar_table
    seed_ptr,
    MAXIMIZE: tl.constexpr,
    EPS_INSIDE_SQRT: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(block_tensor + pid)
    start = tl.load(block_index + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    size = tl.load(sizes + tid)
    p_ptr = typed_pointer(p_addrs, tid, P_DTYPE, ALIGNED)
    g_ptr = typed_pointer(g_addrs, tid, G_DTYPE, ALIGNED)
    m_ptr = typed_pointer(m_addrs, tid, M_DTYPE, ALIGNED)
    v_ptr = typed_pointer(v_addrs, tid, V_DTYPE, ALIGNED)
    lr = tl.load(lr_ptr).to(COMPUTE)
    if start + BLOCK <= size:  # a full block: no mask, vector loads
        _adax_block(
            p_ptr, g_ptr, m_ptr, v_ptr, offs, None, lr, hyper_ptr, seed_ptr, tid,
            MAXIMIZE, EPS_INSIDE_SQRT, DECAY, STOCHASTIC, P_DTYPE, M_DTYPE, V_DTYPE, COMPUTE,
        )  # fmt: skip
    else:
        _adax_block(
            p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < size, lr, hyper_ptr, seed_ptr, tid,
            MAXIMIZE, EPS_INSIDE_SQRT, DECAY, STOCHASTIC, P_DTYPE, M_DTYPE, V_DTYPE, COMPUTE,
        )  # fmt: skip


@accepts_keywords(AdaXHyper)
def adax_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper,
    *,
    stochastic_rounding: bool | None = False,
) -> None:
    """AdaX on contiguous tensors: one launch per (device, dtypes) group.
    ``stochastic_rounding`` rounds bf16/fp16 parameters stochastically
    (``core.precision.rounds_stochastically``)."""
    for (ps, gs, ms, vs), _ in group_by_dtypes([params, grads, exp_avgs, exp_avg_sqs]):
        contiguous_or_raise([*ps, *gs, *ms, *vs], "AdaX")
        tables = launch_tables([ps, gs, ms, vs])
        if tables.num_programs == 0:
            continue
        device = ps[0].device
        compute = compute_dtype(ps[0].dtype, vs[0].dtype)
        stochastic = rounds_stochastically(stochastic_rounding, ps[0].dtype)
        lr_t = lr_tensor(hyper.lr, compute, device)
        _adax_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            lr_t,
            _scalar_table(hyper, square_bound(vs[0].dtype), compute, device),
            seed_tensor(device) if stochastic else lr_t,  # the seed is unused without SR
            MAXIMIZE=hyper.maximize,
            EPS_INSIDE_SQRT=hyper.eps_inside_sqrt,
            DECAY=hyper.weight_decay != 0,
            STOCHASTIC=stochastic,
            ALIGNED=tables.aligned,
            P_DTYPE=triton_dtype(ps[0].dtype),
            G_DTYPE=triton_dtype(gs[0].dtype),
            M_DTYPE=triton_dtype(ms[0].dtype),
            V_DTYPE=triton_dtype(vs[0].dtype),
            COMPUTE=triton_dtype(compute),
            BLOCK=BLOCK,
        )

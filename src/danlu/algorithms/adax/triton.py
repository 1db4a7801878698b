"""AdaX (docs/reference/algorithms.md#adax-rule, ``rule.adax_rule``) as one Triton kernel
launch per dtype combination, several tensors per launch: m, the normalised v̂ and θ are
read and written once each.

Math in the statistics' precision (fp32, fp64 for fp64 parameters) with one rounding per
stored value; the momentum is rounded to its dtype before the update reads it, as in the
eager path. The lr and the per-step weight 1 − β̂_t are read from device memory: a
scheduler or the step count changes them without recompiling or synchronising.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.algorithms.adax.rule import AdaXHyper, denominator_floor
from danlu.core.overflow import square_bound
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    compute_dtype,
    contiguous_or_raise,
    device_scalars,
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

# Offsets into the kernel's buffer of scalars (``hyper_ptr``): the one definition of its
# layout, which ``_scalars`` fills by these names.
UPDATE_WEIGHT = tl.constexpr(0)  # 1 − β1
NEW_SAMPLE_WEIGHT = tl.constexpr(1)  # 1 − β̂_t
EPS = tl.constexpr(2)  # ε
WEIGHT_DECAY = tl.constexpr(3)  # λ
DENOM_FLOOR = tl.constexpr(4)  # rule.denominator_floor (0 where ε keeps the denominator above it)
GRAD_BOUND = tl.constexpr(5)  # where g² would overflow v̂'s dtype


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
    # the lines of rule.adax_rule, on the loaded values:
    # read_grad: −g with maximize, in v̂'s dtype, saturated where g² would overflow it
    # (NaN stays NaN)
    g = tl.load(g_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    eps = tl.load(hyper_ptr + EPS)
    gv = round_to(g, V_DTYPE).to(COMPUTE)
    bound = tl.load(hyper_ptr + GRAD_BOUND)
    gv = tl.where(gv > bound, bound, tl.where(gv < -bound, -bound, gv))
    # m ← lerp(m, g, 1 − β1) in m's dtype; the update reads the stored (rounded) m
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    m = round_to(
        lerp(m, round_to(gv, M_DTYPE).to(COMPUTE), tl.load(hyper_ptr + UPDATE_WEIGHT)), M_DTYPE
    )
    tl.store(m_ptr + offs, m, mask=mask)
    # v̂ ← lerp(v̂, g², 1 − β̂_t)
    v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
    v = lerp(v, gv * gv, tl.load(hyper_ptr + NEW_SAMPLE_WEIGHT))
    tl.store(v_ptr + offs, round_to(v, V_DTYPE), mask=mask)
    # denominator: √v̂ + ε or √(v̂ + ε), at least its floor (a no-op where ε is above it)
    denom = sqrt_rn(v + eps) if EPS_INSIDE_SQRT else sqrt_rn(v) + eps
    floor = tl.load(hyper_ptr + DENOM_FLOOR)
    denom = tl.where(denom < floor, floor, denom)
    # θ·(1 − αλ) − α·m / denominator
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    if DECAY:
        p = p * (1 - lr * tl.load(hyper_ptr + WEIGHT_DECAY))
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
    hyper_ptr,  # the scalars at the offsets above, in the compute dtype
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


def _scalars(h: AdaXHyper, compute: torch.dtype, grad_bound: float) -> list[float]:
    """The kernel's scalars, each at its offset (1 − β1 computed on the host in fp64, as the
    eager path does)."""
    floor = denominator_floor(h.eps, compute)
    at = {
        UPDATE_WEIGHT.value: 1 - h.beta1,
        NEW_SAMPLE_WEIGHT.value: float(h.new_sample_weight),
        EPS.value: h.eps,
        WEIGHT_DECAY.value: h.weight_decay,
        DENOM_FLOOR.value: 0.0 if floor is None else floor,
        GRAD_BOUND.value: grad_bound,
    }
    return [at[i] for i in range(len(at))]


def adax_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper | None = None,
    *,
    stochastic_rounding: bool | None = False,
    **keywords: Any,
) -> None:
    """AdaX on contiguous tensors: one launch per (device, dtypes) group. The
    hyper-parameters are one :class:`AdaXHyper` or its fields as keywords.
    ``stochastic_rounding`` rounds bf16/fp16 parameters stochastically
    (``core.precision.rounds_stochastically``)."""
    h = AdaXHyper.given(hyper, keywords)
    for (ps, gs, ms, vs), _ in group_by_dtypes([params, grads, exp_avgs, exp_avg_sqs]):
        contiguous_or_raise([*ps, *gs, *ms, *vs], "AdaX")
        tables = launch_tables([ps, gs, ms, vs])
        if tables.num_programs == 0:
            continue
        device = ps[0].device
        compute = compute_dtype(ps[0].dtype, vs[0].dtype)
        stochastic = rounds_stochastically(stochastic_rounding, ps[0].dtype)
        lr_t = lr_tensor(h.lr, compute, device)
        scalars = _scalars(h, compute, square_bound(vs[0].dtype))
        _adax_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            lr_t,
            device_scalars(scalars, compute, device),
            seed_tensor(device) if stochastic else lr_t,  # the seed is unused without SR
            MAXIMIZE=h.maximize,
            EPS_INSIDE_SQRT=h.eps_inside_sqrt,
            DECAY=h.weight_decay != 0,
            STOCHASTIC=stochastic,
            ALIGNED=tables.aligned,
            P_DTYPE=triton_dtype(ps[0].dtype),
            G_DTYPE=triton_dtype(gs[0].dtype),
            M_DTYPE=triton_dtype(ms[0].dtype),
            V_DTYPE=triton_dtype(vs[0].dtype),
            COMPUTE=triton_dtype(compute),
            BLOCK=BLOCK,
        )

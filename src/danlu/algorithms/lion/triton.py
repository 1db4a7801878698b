"""Lion (docs/reference/algorithms.md#lion-rule, ``rule.lion_update_``) as one Triton kernel launch
per dtype combination, several tensors per launch.

Math in fp32 (fp64 for fp64 parameters) on the loaded values, with one rounding when storing:
the momentum may have another dtype than its parameter (``state_dtype``, e.g. bf16 momentum
for fp32 parameters; round to nearest) and bf16 parameters may be rounded stochastically.
That is the fp32 upcast path of ``functional.precision`` in one pass. The gradient is read
saturated at half the largest value of the momentum's dtype, as in ``rule.read_grad``. The
lr is read from device memory, so a scheduler changes it without recompiling or
synchronising.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.algorithms.lion.rule import LionHyper
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import average_bound
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    ScalarTable,
    compute_dtype,
    contiguous_or_raise,
    group_by_dtypes,
    launch_tables,
    lerp,
    lr_tensor,
    round_to,
    seed_tensor,
    sign,
    store_rounded,
    triton_dtype,
    typed_pointer,
)

__all__ = ["lion_triton"]

# The kernel's scalar table (``hyper_ptr``, in the compute dtype): this order is the one
# definition of the offsets named below.
_SCALARS = ScalarTable("one_minus_beta1", "one_minus_beta2", "weight_decay", "bound")
_ONE_MINUS_BETA1 = _SCALARS.at("one_minus_beta1")  # 1 − β1
_ONE_MINUS_BETA2 = _SCALARS.at("one_minus_beta2")  # 1 − β2
_WEIGHT_DECAY = _SCALARS.at("weight_decay")  # λ
_BOUND = _SCALARS.at("bound")  # the gradient's saturation bound


def _scalar_table(
    hyper: LionHyper, bound: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The kernel's scalars by name; 1 − β computed on the host in fp64, as the eager path
    does."""
    values = {
        "one_minus_beta1": 1 - hyper.beta1,
        "one_minus_beta2": 1 - hyper.beta2,
        "weight_decay": hyper.weight_decay,
        "bound": bound,
    }
    return _SCALARS.tensor(values, dtype, device)


@triton.jit
def _lion_block(
    p_ptr,
    g_ptr,
    m_ptr,
    offs,
    mask,
    lr,
    hyper_ptr,
    seed_ptr,
    tid,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    P_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    # the lines of rule.lion_update_, on the loaded values:
    # read_grad: −g with maximize, saturated (the averages cannot overflow; NaN stays NaN)
    if MAXIMIZE:
        g = -g
    bound = tl.load(hyper_ptr + _BOUND)
    g = tl.where(g > bound, bound, tl.where(g < -bound, -bound, g))
    # update = sign(lerp(m, g, 1 − β1)); θ·(1 − ηλ) − η·update; m ← lerp(m, g, 1 − β2)
    update = sign(lerp(m, g, tl.load(hyper_ptr + _ONE_MINUS_BETA1)))
    p = p * (1 - lr * tl.load(hyper_ptr + _WEIGHT_DECAY)) - update * lr
    m = lerp(m, g, tl.load(hyper_ptr + _ONE_MINUS_BETA2))
    store_rounded(p_ptr, offs, p, mask, seed_ptr, tid, P_DTYPE, STOCHASTIC)
    tl.store(m_ptr + offs, round_to(m, M_DTYPE), mask=mask)


@triton.jit
def _lion_kernel(
    p_addrs,
    g_addrs,
    m_addrs,
    sizes,
    block_tensor,
    block_index,
    lr_ptr,
    hyper_ptr,  # _scalar_table
    seed_ptr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
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
    lr = tl.load(lr_ptr).to(COMPUTE)
    if start + BLOCK <= size:  # a full block: no mask, vector loads
        _lion_block(
            p_ptr, g_ptr, m_ptr, offs, None, lr, hyper_ptr, seed_ptr, tid,
            MAXIMIZE, STOCHASTIC, P_DTYPE, M_DTYPE, COMPUTE,
        )  # fmt: skip
    else:
        _lion_block(
            p_ptr, g_ptr, m_ptr, offs, offs < size, lr, hyper_ptr, seed_ptr, tid,
            MAXIMIZE, STOCHASTIC, P_DTYPE, M_DTYPE, COMPUTE,
        )  # fmt: skip


@accepts_keywords(LionHyper)
def lion_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    *,
    stochastic_rounding: bool | None = False,
) -> None:
    """Lion on contiguous tensors: one launch per (device, dtypes) group. ``exp_avgs`` may
    have any float dtype; ``stochastic_rounding`` rounds bf16/fp16 parameters
    stochastically."""
    for (ps, gs, ms), _ in group_by_dtypes([params, grads, exp_avgs]):
        contiguous_or_raise([*ps, *gs, *ms], "Lion")
        tables = launch_tables([ps, gs, ms])
        if tables.num_programs == 0:
            continue
        device, dtype = ps[0].device, ps[0].dtype
        compute = compute_dtype(dtype)
        stochastic = rounds_stochastically(stochastic_rounding, dtype)
        lr_t = lr_tensor(hyper.lr, compute, device)
        _lion_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            lr_t,
            _scalar_table(hyper, average_bound(ms[0].dtype, dtype), compute, device),
            seed_tensor(device) if stochastic else lr_t,  # the seed is unused without SR
            MAXIMIZE=hyper.maximize,
            STOCHASTIC=stochastic,
            ALIGNED=tables.aligned,
            P_DTYPE=triton_dtype(dtype),
            G_DTYPE=triton_dtype(gs[0].dtype),
            M_DTYPE=triton_dtype(ms[0].dtype),
            COMPUTE=triton_dtype(compute),
            BLOCK=BLOCK,
        )

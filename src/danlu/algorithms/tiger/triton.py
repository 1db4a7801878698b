"""Tiger (docs/reference/algorithms.md#tiger-rule) as Triton kernels: the step sizes are computed on
the device (per-tensor RMS with ``torch._foreach_norm``, per-row RMS for embeddings), then one fused
update pass covers every tensor of a dtype in one launch (embeddings: one launch each, with per-row
step sizes). The per-tensor finite flags are read on the device, so a step never synchronises with
the host: a tensor with a non-finite gradient is shrunk toward its centre (or skipped) inside
the kernel, its momentum untouched. Finite gradients are read saturated at half the largest
value of the momentum's dtype, as in ``functional.tiger``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.core.overflow import average_bound
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    compute_dtype,
    contiguous_or_raise,
    device_scalars,
    group_by_dtypes,
    int_table,
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

__all__ = ["tiger_triton"]

_MODES = {None: 0, "shrink": 1, "skip": 2}


@triton.jit
def _tiger_block(
    p_ptr,
    g_addrs,
    m_addrs,
    offs,
    mask,
    tid,
    ok,
    eta_ptr,
    hyper_ptr,
    seed_ptr,
    width,
    K1: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ROWWISE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NONFINITE: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    if ok:
        g_ptr = typed_pointer(g_addrs, tid, G_DTYPE, ALIGNED)
        m_ptr = typed_pointer(m_addrs, tid, M_DTYPE, ALIGNED)
        g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        if MAXIMIZE:
            g = -g
        # read saturated at half the momentum dtype's range: the average cannot overflow
        bound = tl.load(hyper_ptr + 6)
        g = tl.where(g > bound, bound, tl.where(g < -bound, -bound, g))  # NaN stays NaN
        if K1:
            m = lerp(m, g, tl.load(hyper_ptr + 1))
        else:
            if FIRST:
                m = m * tl.load(hyper_ptr)
            m = m + g * tl.load(hyper_ptr + 2)
        tl.store(m_ptr + offs, round_to(m, M_DTYPE), mask=mask)
        if LAST:
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            if ROWWISE:
                eta = tl.load(eta_ptr + offs // width, mask=mask).to(COMPUTE)
            else:
                eta = tl.load(eta_ptr + tid).to(COMPUTE)
            update = sign(m)
            if DECAY:
                update = update + p * tl.load(hyper_ptr + 3)
            store_rounded(p_ptr, offs, p - update * eta, mask, seed_ptr, tid, P_DTYPE, STOCHASTIC)
    else:
        if NONFINITE == 1:
            center = tl.load(hyper_ptr + 4)
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            p = (p - center) * tl.load(hyper_ptr + 5) + center
            tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)


@triton.jit
def _tiger_kernel(
    p_addrs,
    g_addrs,
    m_addrs,
    sizes,
    block_tensor,
    block_index,
    eta_ptr,
    ok_ptr,
    hyper_ptr,  # β, 1 − β, (1 − β)/k, λ, centre, shrink ratio, gradient bound (compute dtype)
    seed_ptr,
    width,
    K1: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ROWWISE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NONFINITE: tl.constexpr,
    DECAY: tl.constexpr,
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
    ok = True
    if NONFINITE != 0:
        ok = tl.load(ok_ptr + tid) != 0
    if start + BLOCK <= size:  # a full block: no mask, vector loads
        _tiger_block(
            p_ptr, g_addrs, m_addrs, offs, None, tid, ok, eta_ptr, hyper_ptr, seed_ptr, width,
            K1, FIRST, LAST, ROWWISE, MAXIMIZE, NONFINITE, DECAY, STOCHASTIC, ALIGNED,
            P_DTYPE, G_DTYPE, M_DTYPE, COMPUTE,
        )  # fmt: skip
    else:
        _tiger_block(
            p_ptr, g_addrs, m_addrs, offs, offs < size, tid, ok, eta_ptr, hyper_ptr, seed_ptr,
            width, K1, FIRST, LAST, ROWWISE, MAXIMIZE, NONFINITE, DECAY, STOCHASTIC, ALIGNED,
            P_DTYPE, G_DTYPE, M_DTYPE, COMPUTE,
        )  # fmt: skip


def _step_sizes(params: list[Tensor], *, lr: Tensor, kind: str, rms_floor: float) -> Tensor:
    """η per tensor (elementwise and matrix kinds), on the device."""
    if kind == "elementwise":
        return (0.5 * lr).expand(len(params)).contiguous()
    norms = torch.stack(torch._foreach_norm(params, 2, dtype=lr.dtype))
    roots = [math.sqrt(max(p.numel(), 1)) for p in params]
    return (norms / device_scalars(roots, lr.dtype, lr.device)).clamp_min_(rms_floor).mul_(lr)


def tiger_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta: float,
    weight_decay: float,
    kind: str,
    rms_floor: float,
    grad_accum_steps: int,
    first_micro_step: bool,
    last_micro_step: bool,
    maximize: bool,
    finite: Tensor | None = None,
    nonfinite: str | None = None,
    center: float = 0.0,
    shrink_ratio: float = 1.0,
    stochastic_rounding: bool | None = False,
) -> None:
    """One Tiger micro-step on contiguous tensors of one kind.

    ``finite`` (a bool tensor, one entry per tensor, on the tensors' device) with
    ``nonfinite="shrink"`` or ``"skip"`` applies the non-finite policy on the device.
    ``exp_avgs`` may have any float dtype (rounded to nearest); ``stochastic_rounding``
    rounds bf16/fp16 parameters stochastically.
    """
    mode = _MODES[nonfinite if finite is not None else None]
    for (ps, gs, ms), indices in group_by_dtypes([params, grads, exp_avgs]):
        contiguous_or_raise([*ps, *gs, *ms], "Tiger")
        device, dtype = ps[0].device, ps[0].dtype
        compute = compute_dtype(dtype)
        lr_t = lr_tensor(lr, compute, device)
        hyper = device_scalars(
            [
                beta,
                1 - beta,
                (1 - beta) / grad_accum_steps,
                weight_decay,
                center,
                shrink_ratio,
                average_bound(ms[0].dtype, dtype),
            ],
            compute,
            device,
        )
        ok = lr_t  # an unused placeholder pointer unless a non-finite policy applies
        if mode and finite is not None:
            ok = finite[int_table(indices, torch.int64, finite.device)].to(device, torch.int8)
        stochastic = rounds_stochastically(stochastic_rounding, dtype) and last_micro_step
        common = {
            "K1": grad_accum_steps == 1,
            "FIRST": first_micro_step,
            "LAST": last_micro_step,
            "MAXIMIZE": maximize,
            "NONFINITE": mode,
            "DECAY": weight_decay != 0,
            "STOCHASTIC": stochastic,
            "P_DTYPE": triton_dtype(dtype),
            "G_DTYPE": triton_dtype(gs[0].dtype),
            "M_DTYPE": triton_dtype(ms[0].dtype),
            "COMPUTE": triton_dtype(compute),
            "BLOCK": BLOCK,
        }
        if kind == "embedding":
            for i, (p, g, m) in enumerate(zip(ps, gs, ms, strict=True)):
                if p.numel() == 0:
                    continue
                width = p.shape[-1] if p.dim() > 0 else 1
                if last_micro_step:
                    rms = torch.linalg.vector_norm(p, dim=-1, dtype=compute) / math.sqrt(width)
                    eta = rms.clamp_min_(rms_floor).mul_(lr_t).reshape(-1)
                else:
                    eta = lr_t
                tables = launch_tables([[p], [g], [m]])
                _tiger_kernel[(tables.num_programs,)](
                    *tables.addresses,
                    tables.sizes,
                    tables.block_tensor,
                    tables.block_index,
                    eta,
                    ok[i:] if mode else ok,
                    hyper,
                    seed_tensor(device) if stochastic else lr_t,
                    width,
                    ROWWISE=True,
                    ALIGNED=tables.aligned,
                    **common,
                )
            continue
        tables = launch_tables([ps, gs, ms])
        if tables.num_programs == 0:
            continue
        eta = _step_sizes(ps, lr=lr_t, kind=kind, rms_floor=rms_floor) if last_micro_step else lr_t
        _tiger_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            eta,
            ok,
            hyper,
            seed_tensor(device) if stochastic else lr_t,
            1,
            ROWWISE=False,
            ALIGNED=tables.aligned,
            **common,
        )

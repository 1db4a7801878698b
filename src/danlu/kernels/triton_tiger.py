"""Tiger (SPEC §2(a)) as Triton kernels: the step sizes are computed on the device (per-tensor
RMS with ``torch._foreach_norm``, per-row RMS for embeddings), then one fused update pass
covers every tensor of a dtype in one launch (embeddings: one launch each, with per-row step
sizes). The per-tensor finite flags are read on the device, so a step never synchronises with
the host: a tensor with a non-finite gradient is shrunk toward its centre (or skipped) inside
the kernel, its momentum untouched.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.functional._utils import group_by_device_and_dtype
from danlu.kernels._triton import BLOCK, contiguous_or_raise, launch_tables, triton_dtype
from danlu.kernels.triton_lion import _lerp, _lr_tensor, _sign

__all__ = ["tiger_triton"]

_MODES = {None: 0, "shrink": 1, "skip": 2}


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
    width,
    beta,
    weight,
    grad_scale,
    weight_decay,
    center,
    shrink_ratio,
    K1: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    ROWWISE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    NONFINITE: tl.constexpr,
    DECAY: tl.constexpr,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(block_tensor + pid)
    offs = tl.load(block_index + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(sizes + tid)
    p_ptr = tl.load(p_addrs + tid).to(tl.pointer_type(DTYPE))
    ok = True
    if NONFINITE != 0:
        ok = tl.load(ok_ptr + tid) != 0
    if ok:
        g_ptr = tl.load(g_addrs + tid).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(m_addrs + tid).to(tl.pointer_type(DTYPE))
        g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
        if MAXIMIZE:
            g = -g
        if K1:
            m = _lerp(m, g, weight)
        else:
            if FIRST:
                m = m * beta
            m = m + g * grad_scale
        tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
        if LAST:
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            if ROWWISE:
                eta = tl.load(eta_ptr + offs // width, mask=mask).to(COMPUTE)
            else:
                eta = tl.load(eta_ptr + tid).to(COMPUTE)
            update = _sign(m)
            if DECAY:
                update = update + p * weight_decay
            tl.store(p_ptr + offs, (p - update * eta).to(DTYPE), mask=mask)
    else:
        if NONFINITE == 1:
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            tl.store(p_ptr + offs, ((p - center) * shrink_ratio + center).to(DTYPE), mask=mask)


def _step_sizes(params: list[Tensor], *, lr: Tensor, kind: str, rms_floor: float) -> Tensor:
    """η per tensor (elementwise and matrix kinds), on the device."""
    if kind == "elementwise":
        return (0.5 * lr).expand(len(params)).contiguous()
    norms = torch.stack(torch._foreach_norm(params, 2, dtype=lr.dtype))
    roots = torch.tensor([math.sqrt(max(p.numel(), 1)) for p in params], dtype=lr.dtype)
    return (norms / roots.to(lr.device, non_blocking=True)).clamp_min_(rms_floor).mul_(lr)


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
) -> None:
    """One Tiger micro-step on contiguous tensors of one kind.

    ``finite`` (a bool tensor, one entry per tensor, on the tensors' device) with
    ``nonfinite="shrink"`` or ``"skip"`` applies the non-finite policy on the device.
    """
    mode = _MODES[nonfinite if finite is not None else None]
    for (ps, gs, ms), indices in group_by_device_and_dtype([params, grads, exp_avgs]):
        contiguous_or_raise([*ps, *gs, *ms], "Tiger")
        dtype = ps[0].dtype
        lr_t = _lr_tensor(lr, ps[0])
        ok = (
            finite[torch.tensor(indices, device=finite.device)].to(ps[0].device, torch.int8)
            if finite is not None and mode
            else lr_t  # unused placeholder pointer
        )
        common = {
            "beta": float(beta),
            "weight": 1 - beta,
            "grad_scale": (1 - beta) / grad_accum_steps,
            "weight_decay": float(weight_decay),
            "center": float(center),
            "shrink_ratio": float(shrink_ratio),
            "K1": grad_accum_steps == 1,
            "FIRST": first_micro_step,
            "LAST": last_micro_step,
            "MAXIMIZE": maximize,
            "NONFINITE": mode,
            "DECAY": weight_decay != 0,
            "DTYPE": triton_dtype(dtype),
            "COMPUTE": tl.float64 if dtype == torch.float64 else tl.float32,
            "BLOCK": BLOCK,
        }
        if kind == "embedding":
            for i, (p, g, m) in enumerate(zip(ps, gs, ms, strict=True)):
                if p.numel() == 0:
                    continue
                width = p.shape[-1] if p.dim() > 0 else 1
                if last_micro_step:
                    rms = torch.linalg.vector_norm(p, dim=-1, dtype=lr_t.dtype) / math.sqrt(width)
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
                    width,
                    ROWWISE=True,
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
            1,
            ROWWISE=False,
            **common,
        )

"""Lion (SPEC §1(a)) as one Triton kernel launch per dtype, several tensors per launch.

Math in fp32 (fp64 for fp64 tensors) with one rounding when storing; the lr is read from
device memory, so a scheduler changes it without recompiling or synchronising.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.functional._utils import group_by_device_and_dtype
from danlu.kernels._triton import BLOCK, contiguous_or_raise, launch_tables, triton_dtype

__all__ = ["lion_triton"]


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formula, for the same rounding as the eager path
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1 - weight))


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == x, 0.0, x))).to(x.dtype)


@triton.jit
def _lion_kernel(
    p_addrs,
    g_addrs,
    m_addrs,
    sizes,
    block_tensor,
    block_index,
    lr_ptr,
    weight1,
    weight2,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(block_tensor + pid)
    offs = tl.load(block_index + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(sizes + tid)
    p_ptr = tl.load(p_addrs + tid).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_addrs + tid).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(m_addrs + tid).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    lr = tl.load(lr_ptr).to(COMPUTE)
    update = _sign(_lerp(m, g, weight1))
    p = p * (1 - lr * weight_decay) - update * lr
    m = _lerp(m, g, weight2)
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)


def _lr_tensor(lr: float | Tensor, like: Tensor) -> Tensor:
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(lr, Tensor):
        return lr.detach().to(device=like.device, dtype=dtype).reshape(())
    return torch.tensor(lr, dtype=dtype, device=like.device)


def lion_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Lion on contiguous tensors: one launch per (device, dtype) group."""
    for (ps, gs, ms), _ in group_by_device_and_dtype([params, grads, exp_avgs]):
        contiguous_or_raise([*ps, *gs, *ms], "Lion")
        tables = launch_tables([ps, gs, ms])
        if tables.num_programs == 0:
            continue
        dtype = ps[0].dtype
        _lion_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            # 1 - β computed on the host in fp64, as the eager path does
            _lr_tensor(lr, ps[0]),
            1 - beta1,
            1 - beta2,
            float(weight_decay),
            MAXIMIZE=maximize,
            DTYPE=triton_dtype(dtype),
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            BLOCK=BLOCK,
        )

"""Tiger (docs/reference/algorithms.md#tiger-rule) as Triton kernels: the step sizes are computed on
the device (per-tensor RMS with ``torch._foreach_norm``, per-row RMS for embeddings), then one fused
update pass covers every tensor of a dtype in one launch (embeddings: one launch each, with per-row
step sizes). The per-tensor finite flags are read on the device, so a step never synchronises with
the host: a tensor with a non-finite gradient is shrunk toward its centre (or skipped) inside
the kernel, its momentum untouched. Finite gradients are read saturated at half the largest
value of the momentum's dtype, as in ``functional.tiger``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from danlu.algorithms.tiger.rule import (
    TigerHyper,
    eta_from_rms_,
    rms_root,
    step_size,
)
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import average_bound
from danlu.core.precision import rounds_stochastically
from danlu.core.triton import (
    BLOCK,
    ScalarTable,
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

# The kernels' scalar table (``hyper_ptr``, in the compute dtype): this order is the one
# definition of the offsets named below.
_SCALARS = ScalarTable(
    "beta",
    "one_minus_beta",
    "grad_weight",
    "decay",
    "center",
    "shrink_ratio",
    "bound",
)
_BETA = _SCALARS.at("beta")  # β
_ONE_MINUS_BETA = _SCALARS.at("one_minus_beta")  # 1 − β
_GRAD_WEIGHT = _SCALARS.at("grad_weight")  # (1 − β)/k
_DECAY = _SCALARS.at("decay")  # λ (0 for element-wise tensors)
_CENTER = _SCALARS.at("center")  # c of the shrink
_SHRINK_RATIO = _SCALARS.at("shrink_ratio")  # s of the shrink
_BOUND = _SCALARS.at("bound")  # the gradient's saturation bound


def _scalar_table(
    hyper: TigerHyper, bound: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    values = {
        "beta": hyper.beta,
        "one_minus_beta": 1 - hyper.beta,
        "grad_weight": hyper.grad_weight,
        "decay": hyper.decay,
        "center": hyper.center,
        "shrink_ratio": hyper.shrink_ratio,
        "bound": bound,
    }
    return _SCALARS.tensor(values, dtype, device)


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
        # rule.read_grad: saturated at half the momentum dtype's range (m cannot overflow)
        bound = tl.load(hyper_ptr + _BOUND)
        g = tl.where(g > bound, bound, tl.where(g < -bound, -bound, g))  # NaN stays NaN
        # rule.accumulate_
        if K1:
            m = lerp(m, g, tl.load(hyper_ptr + _ONE_MINUS_BETA))
        else:
            if FIRST:
                m = m * tl.load(hyper_ptr + _BETA)
            m = m + g * tl.load(hyper_ptr + _GRAD_WEIGHT)
        tl.store(m_ptr + offs, round_to(m, M_DTYPE), mask=mask)
        if LAST:
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            if ROWWISE:
                eta = tl.load(eta_ptr + offs // width, mask=mask).to(COMPUTE)
            else:
                eta = tl.load(eta_ptr + tid).to(COMPUTE)
            update = sign(m)  # rule.direction
            if DECAY:
                update = update + p * tl.load(hyper_ptr + _DECAY)
            store_rounded(p_ptr, offs, p - update * eta, mask, seed_ptr, tid, P_DTYPE, STOCHASTIC)
    else:
        if NONFINITE == 1:  # the shrink: θ ← (θ − c)·s + c
            center = tl.load(hyper_ptr + _CENTER)
            p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
            p = (p - center) * tl.load(hyper_ptr + _SHRINK_RATIO) + center
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
    hyper_ptr,  # the scalar table: _SCALARS
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


def _step_sizes(params: list[Tensor], hyper: TigerHyper, lr: Tensor) -> Tensor:
    """η per tensor (elementwise and matrix kinds), on the device: rule.step_size with the
    norms of every tensor in one foreach call."""
    if hyper.kind == "elementwise":
        eta = step_size(params[0], lr=lr, kind="elementwise", rms_floor=hyper.rms_floor)
        assert isinstance(eta, Tensor)
        return eta.expand(len(params)).contiguous()
    norms = torch.stack(torch._foreach_norm(params, 2, dtype=lr.dtype))
    roots = device_scalars([rms_root(p, hyper.kind) for p in params], lr.dtype, lr.device)
    return eta_from_rms_(norms / roots, lr, hyper.rms_floor)


@accepts_keywords(TigerHyper)
def tiger_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: TigerHyper,
    *,
    finite: Tensor | None = None,
) -> None:
    """One Tiger micro-step on contiguous tensors of one kind.

    ``finite`` (a bool tensor, one entry per tensor, on the tensors' device) applies
    ``hyper.nonfinite`` (``"shrink"`` or ``"skip"``) on the device. ``exp_avgs`` may have any
    float dtype (rounded to nearest); ``hyper.stochastic_rounding`` rounds bf16/fp16
    parameters stochastically.
    """
    mode = _MODES[hyper.nonfinite if finite is not None else None]
    last = hyper.last_micro_step
    for (ps, gs, ms), indices in group_by_dtypes([params, grads, exp_avgs]):
        contiguous_or_raise([*ps, *gs, *ms], "Tiger")
        device, dtype = ps[0].device, ps[0].dtype
        compute = compute_dtype(dtype)
        lr_t = lr_tensor(hyper.lr, compute, device)
        table = _scalar_table(hyper, average_bound(ms[0].dtype, dtype), compute, device)
        ok = lr_t  # an unused placeholder pointer unless a non-finite policy applies
        if mode and finite is not None:
            ok = finite[int_table(indices, torch.int64, finite.device)].to(device, torch.int8)
        stochastic = rounds_stochastically(hyper.stochastic_rounding, dtype) and last
        common = {
            "K1": hyper.grad_accum_steps == 1,
            "FIRST": hyper.first_micro_step,
            "LAST": last,
            "MAXIMIZE": hyper.maximize,
            "NONFINITE": mode,
            "DECAY": hyper.decay != 0,
            "STOCHASTIC": stochastic,
            "P_DTYPE": triton_dtype(dtype),
            "G_DTYPE": triton_dtype(gs[0].dtype),
            "M_DTYPE": triton_dtype(ms[0].dtype),
            "COMPUTE": triton_dtype(compute),
            "BLOCK": BLOCK,
        }
        if hyper.kind == "embedding":
            for i, (p, g, m) in enumerate(zip(ps, gs, ms, strict=True)):
                if p.numel() == 0:
                    continue
                eta = lr_t
                if last:  # one η per row
                    rows = step_size(p, lr=lr_t, kind="embedding", rms_floor=hyper.rms_floor)
                    assert isinstance(rows, Tensor)
                    eta = rows.reshape(-1)
                tables = launch_tables([[p], [g], [m]])
                _tiger_kernel[(tables.num_programs,)](
                    *tables.addresses,
                    tables.sizes,
                    tables.block_tensor,
                    tables.block_index,
                    eta,
                    ok[i:] if mode else ok,
                    table,
                    seed_tensor(device) if stochastic else lr_t,
                    p.shape[-1] if p.dim() > 0 else 1,
                    ROWWISE=True,
                    ALIGNED=tables.aligned,
                    **common,
                )
            continue
        tables = launch_tables([ps, gs, ms])
        if tables.num_programs == 0:
            continue
        eta = _step_sizes(ps, hyper, lr_t) if last else lr_t
        _tiger_kernel[(tables.num_programs,)](
            *tables.addresses,
            tables.sizes,
            tables.block_tensor,
            tables.block_index,
            eta,
            ok,
            table,
            seed_tensor(device) if stochastic else lr_t,
            1,
            ROWWISE=False,
            ALIGNED=tables.aligned,
            **common,
        )

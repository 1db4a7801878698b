"""Lion's CPU fast paths: the single-tensor rule on cache-sized slices
(``*_chunked``) and the foreach rule compiled by ``torch.compile`` (``*_compiled``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from danlu.core.chunked import (
    CHUNK,
    all_contiguous,
    saturated,
    scratch_buffer,
    slices,
    small_tensor,
)
from danlu.core.compiled import compiled_once, lr_tensor, recompile_limit
from danlu.core.overflow import average_bound
from danlu.core.precision import store_state_


def lion_chunked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    chunk: int = CHUNK,
) -> None:
    """Lion (docs/reference/algorithms.md#lion-rule), bit-identical to
    ``functional.lion._single_tensor_lion``."""
    from danlu.algorithms.lion.functional import _single_tensor_lion

    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg):
            small_tensor(
                _single_tensor_lion,
                param,
                grad,
                exp_avg,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                maximize=maximize,
                grad_bound=bound,
            )
            continue
        update_buf = scratch_buffer(param, chunk, slot=0)
        grad_buf = scratch_buffer(grad, chunk, slot=1)
        state_buf = scratch_buffer(param, chunk, slot=2) if exp_avg.dtype != param.dtype else None
        for p, g, m in zip(
            slices(param, chunk), slices(grad, chunk), slices(exp_avg, chunk), strict=True
        ):
            n = p.numel()
            g = saturated(g, bound, maximize, grad_buf[:n])
            work = m if state_buf is None else state_buf[:n].copy_(m)
            update = torch.lerp(work, g, 1 - beta1, out=update_buf[:n]).sign_()
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            if isinstance(lr, Tensor):
                p.sub_(update.mul_(lr))
            else:  # one op instead of two; u ∈ {−1, 0, 1} makes −lr·u exact: same bits
                p.add_(update, alpha=-lr)
            work.lerp_(g, 1 - beta2)
            if state_buf is not None:
                store_state_(m, work)


def lion_compiled(
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
    """Lion (docs/reference/algorithms.md#lion-rule): ``functional.lion._multi_tensor_lion``
    compiled."""
    from danlu.algorithms.lion.functional import _multi_tensor_lion

    with recompile_limit():
        compiled_once(_multi_tensor_lion)(
            params,
            grads,
            exp_avgs,
            lr=lr_tensor(lr, params[0]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
        )

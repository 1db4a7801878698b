"""Lion's CPU fast paths: the rule on cache-sized slices with reusable scratch buffers
(``lion_chunked``) and the foreach path compiled by ``torch.compile`` (``lion_compiled``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from danlu.algorithms.lion.functional import _multi_tensor_lion, _single_tensor_lion
from danlu.algorithms.lion.rule import LionHyper, decay_factor
from danlu.core.chunked import (
    CHUNK,
    all_contiguous,
    saturated,
    scratch_buffer,
    slices,
    small_tensor,
)
from danlu.core.compiled import compiled_once, lr_tensor, recompile_limit
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import average_bound
from danlu.core.precision import store_state_


@accepts_keywords(LionHyper)
def lion_chunked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    *,
    chunk: int = CHUNK,
) -> None:
    """:func:`~danlu.algorithms.lion.rule.lion_update_` slice by slice, bit-identical to it: the
    same elementwise ops in the same order, written into scratch buffers instead of
    parameter-sized temporaries (the comments name the rule line each op mirrors)."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg):
            small_tensor(_single_tensor_lion, param, grad, exp_avg, hyper=hyper, grad_bound=bound)
            continue
        update_buf = scratch_buffer(param, chunk, slot=0)
        grad_buf = scratch_buffer(grad, chunk, slot=1)
        state_buf = scratch_buffer(param, chunk, slot=2) if exp_avg.dtype != param.dtype else None
        for p, g, m in zip(
            slices(param, chunk), slices(grad, chunk), slices(exp_avg, chunk), strict=True
        ):
            n = p.numel()
            g = saturated(g, bound, hyper.maximize, grad_buf[:n])  # read_grad
            work = m if state_buf is None else state_buf[:n].copy_(m)
            # update = sign(lerp(m, g, 1 − β1))
            update = torch.lerp(work, g, 1 - hyper.beta1, out=update_buf[:n]).sign_()
            if hyper.weight_decay != 0:
                p.mul_(decay_factor(hyper))
            if isinstance(hyper.lr, Tensor):
                p.sub_(update.mul_(hyper.lr))
            else:  # one op instead of two; u ∈ {−1, 0, 1} makes −lr·u exact: same bits
                p.add_(update, alpha=-hyper.lr)
            work.lerp_(g, 1 - hyper.beta2)  # m ← lerp(m, g, 1 − β2)
            if state_buf is not None:
                store_state_(m, work)


@accepts_keywords(LionHyper)
def lion_compiled(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> None:
    """The foreach path (``functional._multi_tensor_lion``) compiled; the lr is passed as a
    0-d tensor, so that a scheduler does not recompile."""
    with recompile_limit():
        compiled_once(_multi_tensor_lion)(
            params, grads, exp_avgs, dataclasses.replace(hyper, lr=lr_tensor(hyper.lr, params[0]))
        )

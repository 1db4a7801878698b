"""Tiger's CPU fast paths: the reference rule on cache-sized slices (``tiger_chunked``) and
the foreach path compiled by ``torch.compile`` (``tiger_compiled``).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from danlu.algorithms.tiger.functional import _multi_tensor_tiger, _single_tensor_tiger
from danlu.algorithms.tiger.rule import TigerHyper, accumulate_, direction
from danlu.algorithms.tiger.rule import step_size as rule_step_size
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


@accepts_keywords(TigerHyper)
def tiger_chunked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: TigerHyper,
    *,
    chunk: int = CHUNK,
) -> None:
    """Tiger (docs/reference/algorithms.md#tiger-rule), bit-identical to the single-tensor
    path: the rule's pieces applied slice by slice.

    The RMS step size is computed over the whole tensor (or each whole row) first; slices of
    an embedding hold whole rows so that each row keeps its own step size.
    """
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg):
            small_tensor(_single_tensor_tiger, param, grad, exp_avg, hyper=hyper, grad_bound=bound)
            continue
        eta = (
            rule_step_size(param, lr=hyper.lr, kind=hyper.kind, rms_floor=hyper.rms_floor)
            if hyper.last_micro_step
            else None
        )
        width = param.shape[-1] if hyper.kind == "embedding" else 0
        size = max(width, chunk - chunk % width) if width else chunk
        update_buf = scratch_buffer(param, size, slot=0)
        grad_buf = scratch_buffer(grad, size, slot=1)
        state_buf = scratch_buffer(param, size, slot=2) if exp_avg.dtype != param.dtype else None
        for index, (p, g, m) in enumerate(
            zip(slices(param, size), slices(grad, size), slices(exp_avg, size), strict=True)
        ):
            n = p.numel()
            g = saturated(g, bound, hyper.maximize, grad_buf[:n])  # rule.read_grad, into a buffer
            work = m if state_buf is None else state_buf[:n].copy_(m)
            accumulate_(work, g, hyper)
            if state_buf is not None:
                store_state_(m, work)
            if eta is None:
                continue
            update = direction(work, p, hyper.decay, out=update_buf[:n])
            if width:
                assert isinstance(eta, Tensor)  # per-row step sizes
                rows = n // width
                first_row = index * (size // width)
                update.view(rows, width).mul_(eta.view(-1, 1)[first_row : first_row + rows])
            else:
                update.mul_(eta)
            p.sub_(update)


@accepts_keywords(TigerHyper)
def tiger_compiled(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: TigerHyper
) -> None:
    """Tiger (docs/reference/algorithms.md#tiger-rule): the foreach path compiled (RMS
    reductions and the update fused into as few passes as Inductor can manage)."""
    hyper = dataclasses.replace(hyper, lr=lr_tensor(hyper.lr, params[0]))
    with recompile_limit():
        compiled_once(_multi_tensor_tiger)(params, grads, exp_avgs, hyper)

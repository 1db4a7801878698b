"""Tiger's CPU fast paths: the single-tensor rule on cache-sized slices
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


def tiger_chunked(
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
    chunk: int = CHUNK,
) -> None:
    """Tiger (docs/reference/algorithms.md#tiger-rule), bit-identical to
    ``functional.tiger._single_tensor_tiger``.

    The RMS step size is computed over the whole tensor (or each whole row) first; slices of
    an embedding hold whole rows so that each row keeps its own step size.
    """
    from danlu.algorithms.tiger.functional import _single_tensor_tiger, tiger_step_size

    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg):
            small_tensor(
                _single_tensor_tiger,
                param,
                grad,
                exp_avg,
                lr=lr,
                beta=beta,
                weight_decay=weight_decay,
                kind=kind,
                rms_floor=rms_floor,
                grad_accum_steps=grad_accum_steps,
                first_micro_step=first_micro_step,
                last_micro_step=last_micro_step,
                maximize=maximize,
                grad_bound=bound,
            )
            continue
        step_size = (
            tiger_step_size(param, lr=lr, kind=kind, rms_floor=rms_floor)
            if last_micro_step
            else None
        )
        width = param.shape[-1] if kind == "embedding" else 0
        size = max(width, chunk - chunk % width) if width else chunk
        update_buf = scratch_buffer(param, size, slot=0)
        grad_buf = scratch_buffer(grad, size, slot=1)
        state_buf = scratch_buffer(param, size, slot=2) if exp_avg.dtype != param.dtype else None
        for index, (p, g, m) in enumerate(
            zip(slices(param, size), slices(grad, size), slices(exp_avg, size), strict=True)
        ):
            n = p.numel()
            g = saturated(g, bound, maximize, grad_buf[:n])
            work = m if state_buf is None else state_buf[:n].copy_(m)
            if grad_accum_steps == 1:
                work.lerp_(g, 1 - beta)
            else:
                if first_micro_step:
                    work.mul_(beta)
                work.add_(g, alpha=(1 - beta) / grad_accum_steps)
            if state_buf is not None:
                store_state_(m, work)
            if step_size is None:
                continue
            update = torch.sign(work, out=update_buf[:n])
            if weight_decay != 0:
                update.add_(p, alpha=weight_decay)
            if width:
                assert isinstance(step_size, Tensor)  # per-row step sizes
                rows = n // width
                first_row = index * (size // width)
                row_steps = step_size.view(-1, 1)[first_row : first_row + rows]
                update.view(rows, width).mul_(row_steps)
            else:
                update.mul_(step_size)
            p.sub_(update)


def tiger_compiled(
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
) -> None:
    """Tiger (docs/reference/algorithms.md#tiger-rule): ``functional.tiger._multi_tensor_tiger``
    compiled (RMS reductions and the update fused into as few passes as Inductor can manage)."""
    from danlu.algorithms.tiger.functional import _multi_tensor_tiger

    with recompile_limit():
        compiled_once(_multi_tensor_tiger)(
            params,
            grads,
            exp_avgs,
            lr=lr_tensor(lr, params[0]),
            beta=beta,
            weight_decay=weight_decay,
            kind=kind,
            rms_floor=rms_floor,
            grad_accum_steps=grad_accum_steps,
            first_micro_step=first_micro_step,
            last_micro_step=last_micro_step,
            maximize=maximize,
        )

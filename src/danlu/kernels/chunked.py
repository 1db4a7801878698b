"""The CPU for-loop path: the single-tensor math applied to cache-sized slices.

Each tensor is processed in slices of ``CHUNK`` elements with reusable scratch buffers, so
every byte of p, g and m comes from memory once and stays in cache for the few elementwise
ops of the update; no parameter-sized temporary is allocated. The ops are those of
``functional/<name>._single_tensor_<name>``, elementwise and in the same order, so the
results are bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from danlu.functional.overflow import average_bound, square_bound
from danlu.functional.precision import store_state_, upcast_step

__all__ = ["CHUNK", "adax_chunked", "lion_chunked", "tiger_chunked"]

#: Elements per slice: a few tensors × 1 MiB (fp32) sit in the L2/L3 caches of common CPUs.
CHUNK = 1 << 18

_scratch: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}


def scratch_buffer(like: Tensor, size: int, slot: int = 0) -> Tensor:
    """A reusable 1-D buffer of at least ``size`` elements (one per device, dtype and slot)."""
    key = (like.device, like.dtype, slot)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf[:size]


def _slices(t: Tensor, size: int) -> list[Tensor]:
    flat = t.view(-1)
    return [flat[i : i + size] for i in range(0, flat.numel(), size)]


def _all_contiguous(*tensors: Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def _small(fn: Callable[..., None], param: Tensor, grad: Tensor, *states: Tensor, **kwargs: Any):
    """One tensor through the single-tensor math (upcast when a state has another dtype)."""
    if any(state.dtype != param.dtype for state in states):
        upcast_step(
            fn, [param], [grad], [[state] for state in states], stochastic_rounding=False, **kwargs
        )
    else:
        fn([param], [grad], *[[state] for state in states], **kwargs)


def _saturated(g: Tensor, bound: float, maximize: bool, out: Tensor) -> Tensor:
    """A gradient slice negated (``maximize``) and clamped to ±``bound`` into ``out``: the
    single-tensor loops' ``saturate(-grad)``, elementwise the same ops."""
    if maximize:
        return torch.neg(g, out=out).clamp_(-bound, bound)
    return torch.clamp(g, -bound, bound, out=out)


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
    from danlu.functional.lion import _single_tensor_lion

    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not _all_contiguous(param, grad, exp_avg):
            _small(
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
            _slices(param, chunk), _slices(grad, chunk), _slices(exp_avg, chunk), strict=True
        ):
            n = p.numel()
            g = _saturated(g, bound, maximize, grad_buf[:n])
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
    from danlu.functional.tiger import _single_tensor_tiger, tiger_step_size

    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        bound = average_bound(exp_avg.dtype, param.dtype)
        if param.numel() <= chunk or not _all_contiguous(param, grad, exp_avg):
            _small(
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
            zip(_slices(param, size), _slices(grad, size), _slices(exp_avg, size), strict=True)
        ):
            n = p.numel()
            g = _saturated(g, bound, maximize, grad_buf[:n])
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


def adax_chunked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    new_sample_weight: float,
    lr: float | Tensor,
    beta1: float,
    eps: float,
    eps_inside_sqrt: bool,
    weight_decay: float,
    maximize: bool,
    chunk: int = CHUNK,
) -> None:
    """AdaX (docs/reference/algorithms.md#adax), bit-identical to
    ``functional.adax._single_tensor_adax``: the saturated gradient, g², the denominator and m/denom
    live in slice-sized scratch buffers."""
    from danlu.functional.adax import _single_tensor_adax

    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if param.numel() <= chunk or not _all_contiguous(param, grad, exp_avg, exp_avg_sq):
            _single_tensor_adax(
                [param],
                [grad],
                [exp_avg],
                [exp_avg_sq],
                new_sample_weight=new_sample_weight,
                lr=lr,
                beta1=beta1,
                eps=eps,
                eps_inside_sqrt=eps_inside_sqrt,
                weight_decay=weight_decay,
                maximize=maximize,
            )
            continue
        neg_buf = scratch_buffer(grad, chunk, slot=1) if maximize else None
        bound = square_bound(exp_avg_sq.dtype)
        clamp_buf = scratch_buffer(exp_avg_sq, chunk, slot=5)
        square_buf = scratch_buffer(exp_avg_sq, chunk, slot=2)
        denom_buf = scratch_buffer(exp_avg_sq, chunk, slot=3)
        # m / denom has the promoted dtype (fp32 for bf16 m and fp32 v̂), as in the eager path
        ratio_like = (
            exp_avg_sq
            if torch.promote_types(exp_avg.dtype, exp_avg_sq.dtype) == exp_avg_sq.dtype
            else exp_avg
        )
        ratio_buf = scratch_buffer(ratio_like, chunk, slot=4) if isinstance(lr, Tensor) else None
        for p, g, m, v in zip(
            _slices(param, chunk),
            _slices(grad, chunk),
            _slices(exp_avg, chunk),
            _slices(exp_avg_sq, chunk),
            strict=True,
        ):
            n = p.numel()
            if neg_buf is not None:
                g = torch.neg(g, out=neg_buf[:n])
            gv = torch.clamp(g.to(v.dtype), -bound, bound, out=clamp_buf[:n])
            m.lerp_(gv.to(m.dtype), 1 - beta1)
            v.lerp_(torch.mul(gv, gv, out=square_buf[:n]), new_sample_weight)
            if eps_inside_sqrt:
                denom = torch.add(v, eps, out=denom_buf[:n]).sqrt_()
            else:
                denom = torch.sqrt(v, out=denom_buf[:n]).add_(eps)
            if eps < torch.finfo(denom.dtype).tiny:  # ε = 0: a 0 step where v̂ = 0, not 0/0
                denom.clamp_min_(torch.finfo(denom.dtype).tiny)
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            if isinstance(lr, Tensor):
                assert ratio_buf is not None
                p.addcmul_(torch.div(m, denom, out=ratio_buf[:n]), lr, value=-1.0)
            else:
                p.addcdiv_(m, denom, value=-lr)

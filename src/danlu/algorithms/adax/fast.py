"""Adax's CPU fast paths: the single-tensor rule on cache-sized slices
(``*_chunked``) and the foreach rule compiled by ``torch.compile`` (``*_compiled``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from danlu.core.chunked import CHUNK, all_contiguous, scratch_buffer, slices
from danlu.core.compiled import compiled_once, lr_tensor, no_zero_dim, recompile_limit
from danlu.core.overflow import square_bound


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
    from danlu.algorithms.adax.functional import _single_tensor_adax

    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg, exp_avg_sq):
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
            slices(param, chunk),
            slices(grad, chunk),
            slices(exp_avg, chunk),
            slices(exp_avg_sq, chunk),
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


def adax_compiled(
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
) -> None:
    """AdaX (docs/reference/algorithms.md#adax): ``functional.adax._single_tensor_adax`` compiled
    into one fused loop per tensor. The per-step weight 1 − β̂_t is passed as a 0-d tensor like the
    lr, so the step count does not recompile."""
    from danlu.algorithms.adax.functional import _single_tensor_adax

    like = exp_avg_sqs[0]
    with recompile_limit():
        compiled_once(_single_tensor_adax)(
            *(no_zero_dim(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs)),
            new_sample_weight=torch.full(
                (), new_sample_weight, dtype=like.dtype, device=like.device
            ),
            lr=lr_tensor(lr, params[0]),
            beta1=beta1,
            eps=eps,
            eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay,
            maximize=maximize,
        )

"""AdaX's CPU fast paths: the rule on cache-sized slices with reusable scratch buffers
(``adax_chunked``) and the single-tensor path compiled by ``torch.compile``
(``adax_compiled``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from danlu.algorithms.adax.functional import _single_tensor_adax
from danlu.algorithms.adax.rule import AdaXHyper, decay_factor, denominator_floor
from danlu.core.chunked import CHUNK, all_contiguous, scratch_buffer, slices
from danlu.core.compiled import compiled_once, lr_tensor, no_zero_dim, recompile_limit
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import square_bound


@accepts_keywords(AdaXHyper)
def adax_chunked(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper,
    *,
    chunk: int = CHUNK,
) -> None:
    """:func:`~danlu.algorithms.adax.rule.adax_update_` slice by slice, bit-identical to it: the
    saturated gradient, g², the denominator and m/denominator live in slice-sized scratch
    buffers (the comments name the rule line each op mirrors)."""
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if param.numel() <= chunk or not all_contiguous(param, grad, exp_avg, exp_avg_sq):
            _single_tensor_adax([param], [grad], [exp_avg], [exp_avg_sq], hyper)
            continue
        neg_buf = scratch_buffer(grad, chunk, slot=1) if hyper.maximize else None
        bound = square_bound(exp_avg_sq.dtype)
        clamp_buf = scratch_buffer(exp_avg_sq, chunk, slot=5)
        square_buf = scratch_buffer(exp_avg_sq, chunk, slot=2)
        denom_buf = scratch_buffer(exp_avg_sq, chunk, slot=3)
        floor = denominator_floor(hyper.eps, exp_avg_sq.dtype)
        # m / denom has the promoted dtype (fp32 for bf16 m and fp32 v̂), as in the eager path
        ratio_like = (
            exp_avg_sq
            if torch.promote_types(exp_avg.dtype, exp_avg_sq.dtype) == exp_avg_sq.dtype
            else exp_avg
        )
        ratio_buf = (
            scratch_buffer(ratio_like, chunk, slot=4) if isinstance(hyper.lr, Tensor) else None
        )
        for p, g, m, v in zip(
            slices(param, chunk),
            slices(grad, chunk),
            slices(exp_avg, chunk),
            slices(exp_avg_sq, chunk),
            strict=True,
        ):
            n = p.numel()
            # read_grad
            if neg_buf is not None:
                g = torch.neg(g, out=neg_buf[:n])
            gv = torch.clamp(g.to(v.dtype), -bound, bound, out=clamp_buf[:n])
            # m ← lerp(m, g, 1 − β1); v̂ ← lerp(v̂, g², 1 − β̂_t)
            m.lerp_(gv.to(m.dtype), 1 - hyper.beta1)
            v.lerp_(torch.mul(gv, gv, out=square_buf[:n]), hyper.new_sample_weight)
            # denominator
            if hyper.eps_inside_sqrt:
                denom = torch.add(v, hyper.eps, out=denom_buf[:n]).sqrt_()
            else:
                denom = torch.sqrt(v, out=denom_buf[:n]).add_(hyper.eps)
            if floor is not None:
                denom.clamp_min_(floor)
            # θ·(1 − αλ) − α·m / denominator
            if hyper.weight_decay != 0:
                p.mul_(decay_factor(hyper))
            if isinstance(hyper.lr, Tensor):
                assert ratio_buf is not None
                p.addcmul_(torch.div(m, denom, out=ratio_buf[:n]), hyper.lr, value=-1.0)
            else:
                p.addcdiv_(m, denom, value=-hyper.lr)


@accepts_keywords(AdaXHyper)
def adax_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper,
) -> None:
    """The single-tensor path (``functional._single_tensor_adax``) compiled into one fused
    loop per tensor. The weight 1 − β̂_t is passed as a 0-d tensor like the lr, so that
    neither the step count nor a scheduler recompiles."""
    like = exp_avg_sqs[0]
    step_hyper = dataclasses.replace(
        hyper,
        new_sample_weight=torch.as_tensor(
            hyper.new_sample_weight, dtype=like.dtype, device=like.device
        ),
        lr=lr_tensor(hyper.lr, params[0]),
    )
    with recompile_limit():
        compiled_once(_single_tensor_adax)(
            *(no_zero_dim(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs)), step_hyper
        )

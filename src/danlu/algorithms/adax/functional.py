"""AdaX, docs/reference/algorithms.md#adax: the math only, tensors in, tensors updated in place.

The blog's update (kexue 7387, bojone/adax) is

    m_t = β1 m + (1−β1) g,   v_t = (1+β2) v + β2 g²,   v̂_t = v_t / ((1+β2)^t − 1),
    θ_t = θ − α m_t / (√v̂_t + ε)

with no bias correction on m. v_t grows like (1+β2)^t and overflows float32 after about
9·10⁵ steps at β2 = 1e-4, so the state here is v̂ itself, in the equivalent normalised EMA form
of docs/reference/algorithms.md#adax-rule::

    v̂_t = β̂_t v̂_{t−1} + (1−β̂_t) g²,     1 − β̂_t = β2 / ((1+β2)^t − 1)

which is a weighted average of the g² and cannot overflow. 1 − β̂_t is evaluated as
β2 / expm1(t·log1p(β2)) in float64, so it is exact at t = 1 (β̂_1 = 0) and underflows
gracefully to 0 (β̂ = 1) for very large t. Decoupled weight decay
(docs/reference/algorithms.md#conventions): θ ← θ − α(u + λθ) with the old θ.

Gradients are read saturated at the largest magnitude whose square stays finite in v̂'s dtype
(``functional.overflow``, about 1.3e19 in float32): one huge finite gradient cannot turn v̂
into inf and the next update into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, local
from danlu.core.overflow import saturate, saturate_all, square_bound
from danlu.core.precision import stochastically_rounded_params
from danlu.core.tensors import (
    foreach_lerp_,
    group_by_device_and_dtype,
    scalar_like,
    select_path,
)

__all__ = ["adax", "adax_beta2_hat", "adax_new_sample_weight"]

# expm1(x) overflows float64 beyond x ≈ 709.78; past that the weight is below 1e-300 anyway.
_MAX_EXPONENT = 700.0


def adax_new_sample_weight(step: float, beta2: float) -> float:
    """1 − β̂_t = β2 / ((1+β2)^t − 1): the weight of the newest g² in v̂ (1 at t = 1)."""
    if step <= 1:
        return 1.0  # (1+β2)^1 − 1 = β2 exactly
    exponent = float(step) * math.log1p(beta2)
    if exponent > _MAX_EXPONENT:
        return 0.0
    return min(1.0, beta2 / math.expm1(exponent))


def _new_sample_weight_tensor(step: Tensor, beta2: float) -> Tensor:
    """:func:`adax_new_sample_weight` of a 0-d tensor step (float64), on the tensor's device."""
    step = step.to(torch.float64)
    exponent = step * math.log1p(beta2)
    weight = (beta2 / torch.expm1(exponent)).clamp(max=1.0)
    weight = torch.where(exponent > _MAX_EXPONENT, 0.0, weight)
    return torch.where(step <= 1, 1.0, weight)


def adax_beta2_hat(step: float, beta2: float) -> float:
    """β̂_t = 1 − β2 / ((1+β2)^t − 1): 0 at t = 1, ≈ 1 − 1/t for t ≪ 1/β2, → 1."""
    return 1.0 - adax_new_sample_weight(step, beta2)


def adax(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: float | Tensor,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    eps_inside_sqrt: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One AdaX update at step ``step`` (1-based, shared by all tensors of the call; a 0-d
    tensor inside ``torch.compile``, so that the step count does not recompile the graph).

    ``exp_avgs`` is m (any float dtype, usually the param's); ``exp_avg_sqs`` is the normalised
    v̂ (float32 or wider). ``eps_inside_sqrt`` puts ε under the root (the blog) instead of after
    it (the code, the default). ``foreach``/``fused`` choose the implementation (see
    ``functional._utils.select_path``); all of them compute the same update.
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``functional.precision``); the moments are kept and rounded as without it.
    """
    if not params:
        return
    if any_dtensor(params):
        # elementwise: the update runs on the local slices of DTensor (FSDP2) parameters
        params, grads, exp_avgs, exp_avg_sqs = (
            [local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
    path = select_path(foreach, fused, params)
    settings: dict[str, Any] = {
        "new_sample_weight": (
            _new_sample_weight_tensor(step, beta2)
            if isinstance(step, Tensor)
            else adax_new_sample_weight(step, beta2)
        ),
        "lr": lr,
        "beta1": beta1,
        "eps": eps,
        "eps_inside_sqrt": eps_inside_sqrt,
        "weight_decay": weight_decay,
        "maximize": maximize,
    }
    if path == "triton":
        from danlu.algorithms.adax.triton import adax_triton

        adax_triton(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            stochastic_rounding=stochastic_rounding,
            **settings,
        )
        return
    fn = _implementation(path)

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            **settings,
        )

    stochastically_rounded_params(run, params, stochastic_rounding)


def _implementation(path: str) -> Callable[..., None]:
    if path == "single":
        return _single_tensor_adax
    if path == "foreach":
        return _multi_tensor_adax
    if path == "chunked":
        from danlu.algorithms.adax.fast import adax_chunked

        return adax_chunked
    from danlu.algorithms.adax.fast import adax_compiled

    return adax_compiled


def _single_tensor_adax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    new_sample_weight: float | Tensor,
    lr: float | Tensor,
    beta1: float,
    eps: float,
    eps_inside_sqrt: bool,
    weight_decay: float,
    maximize: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if maximize:
            grad = -grad
        g = grad.to(exp_avg_sq.dtype)
        g = saturate(g, square_bound(g.dtype), owned=maximize or g.dtype != grad.dtype)
        exp_avg.lerp_(g.to(exp_avg.dtype), 1 - beta1)
        exp_avg_sq.lerp_(g * g, scalar_like(new_sample_weight, exp_avg_sq))
        denom = exp_avg_sq.add(eps).sqrt_() if eps_inside_sqrt else exp_avg_sq.sqrt().add_(eps)
        if eps < torch.finfo(denom.dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
            # v̂ = 0 only where every gradient was 0 (so m = 0): a 0 step, not 0/0
            denom.clamp_min_(torch.finfo(denom.dtype).tiny)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        if isinstance(lr, Tensor):
            param.addcmul_(exp_avg.div(denom), lr, value=-1.0)
        else:
            param.addcdiv_(exp_avg, denom, value=-lr)


def _multi_tensor_adax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    new_sample_weight: float | Tensor,
    lr: float | Tensor,
    beta1: float,
    eps: float,
    eps_inside_sqrt: bool,
    weight_decay: float,
    maximize: bool,
) -> None:
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs), _ in grouped:
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        m_dtype, v_dtype = device_exp_avgs[0].dtype, device_exp_avg_sqs[0].dtype
        gs = saturate_all([g.to(v_dtype) for g in device_grads], square_bound(v_dtype))
        torch._foreach_lerp_(device_exp_avgs, [g.to(m_dtype) for g in gs], 1 - beta1)
        squares = list(torch._foreach_mul(gs, gs))
        foreach_lerp_(device_exp_avg_sqs, squares, new_sample_weight)
        if eps_inside_sqrt:
            denoms = torch._foreach_add(device_exp_avg_sqs, eps)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_add_(denoms, eps)
        if eps < torch.finfo(denoms[0].dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
            # v̂ = 0 only where every gradient was 0 (so m = 0): a 0 step, not 0/0
            torch._foreach_clamp_min_(denoms, torch.finfo(denoms[0].dtype).tiny)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        if isinstance(lr, Tensor):
            updates = torch._foreach_div(device_exp_avgs, denoms)
            torch._foreach_addcmul_(device_params, updates, [lr] * len(updates), value=-1.0)
        else:
            torch._foreach_addcdiv_(device_params, device_exp_avgs, denoms, -lr)

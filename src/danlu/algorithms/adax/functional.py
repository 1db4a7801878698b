"""AdaX, docs/reference/algorithms.md#adax: ``danlu.functional.adax`` and the paths it chooses
between, tensors in, tensors updated in place. The rule itself, with β̂_t and the state's
normalised form, is :func:`danlu.algorithms.adax.rule.adax_update_`.

Decoupled weight decay (docs/reference/algorithms.md#conventions): θ ← θ − α(u + λθ) with the
old θ. Gradients are read saturated at the largest magnitude whose square stays finite in v̂'s
dtype (``core.overflow.square_bound``, about 1.3e19 in float32): one huge finite gradient
cannot turn v̂ into inf and the next update into NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from danlu.algorithms.adax.rule import (
    AdaXHyper,
    adax_beta2_hat,
    adax_new_sample_weight,
    adax_update_,
    decay_factor,
    denominator_floor,
)
from danlu.core.dtensor import any_dtensor, local
from danlu.core.hyper import accepts_keywords
from danlu.core.overflow import saturate_all, square_bound
from danlu.core.precision import stochastically_rounded_params
from danlu.core.tensors import foreach_lerp_, group_by_device_and_dtype, select_path

__all__ = ["adax", "adax_beta2_hat", "adax_new_sample_weight"]


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
    ``core.tensors.select_path``); all of them compute the same update.
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``core.precision``); the moments are kept and rounded as without it.
    """
    hyper = AdaXHyper.at_step(
        step,
        beta2,
        lr=lr,
        beta1=beta1,
        eps=eps,
        eps_inside_sqrt=eps_inside_sqrt,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    adax_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        hyper,
        stochastic_rounding=stochastic_rounding,
        foreach=foreach,
        fused=fused,
    )


def adax_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    hyper: AdaXHyper,
    *,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """:func:`adax` with its hyper-parameters as one :class:`AdaXHyper` (the optimizer builds
    it from the param group and the step): chooses the path and runs it."""
    if not params:
        return
    if any_dtensor(params):
        # elementwise: the update runs on the local slices of DTensor (FSDP2) parameters
        params, grads, exp_avgs, exp_avg_sqs = (
            [local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
    path = select_path(foreach, fused, params)
    if path == "triton":
        from danlu.algorithms.adax.triton import adax_triton

        adax_triton(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            hyper,
            stochastic_rounding=stochastic_rounding,
        )
        return
    fn = _implementation(path)

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            hyper,
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


@accepts_keywords(AdaXHyper)
def _single_tensor_adax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper,
) -> None:
    """:func:`~danlu.algorithms.adax.rule.adax_update_` on each tensor."""
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        adax_update_(param, grad, exp_avg, exp_avg_sq, hyper)


@accepts_keywords(AdaXHyper)
def _multi_tensor_adax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    hyper: AdaXHyper,
) -> None:
    """:func:`~danlu.algorithms.adax.rule.adax_update_` with foreach ops over each (device,
    dtype) group; the comments name the rule line each op mirrors."""
    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs), _ in grouped:
        # read_grad: −g with maximize, in v̂'s dtype, saturated
        if hyper.maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        m_dtype, v_dtype = device_exp_avgs[0].dtype, device_exp_avg_sqs[0].dtype
        gs = saturate_all([g.to(v_dtype) for g in device_grads], square_bound(v_dtype))
        # m ← lerp(m, g, 1 − β1); v̂ ← lerp(v̂, g², 1 − β̂_t)
        torch._foreach_lerp_(device_exp_avgs, [g.to(m_dtype) for g in gs], 1 - hyper.beta1)
        squares = list(torch._foreach_mul(gs, gs))
        foreach_lerp_(device_exp_avg_sqs, squares, hyper.new_sample_weight)
        # denominator: √v̂ + ε or √(v̂ + ε), at least its floor
        if hyper.eps_inside_sqrt:
            denoms = torch._foreach_add(device_exp_avg_sqs, hyper.eps)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_add_(denoms, hyper.eps)
        floor = denominator_floor(hyper.eps, denoms[0].dtype)
        if floor is not None:
            torch._foreach_clamp_min_(denoms, floor)
        # θ·(1 − αλ) − α·m / denominator
        if hyper.weight_decay != 0:
            torch._foreach_mul_(device_params, decay_factor(hyper))
        if isinstance(hyper.lr, Tensor):
            updates = torch._foreach_div(device_exp_avgs, denoms)
            torch._foreach_addcmul_(device_params, updates, [hyper.lr] * len(updates), value=-1.0)
        else:
            torch._foreach_addcdiv_(device_params, device_exp_avgs, denoms, -hyper.lr)

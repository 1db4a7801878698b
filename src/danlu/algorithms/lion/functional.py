"""Lion, docs/reference/algorithms.md#lion-rule: the math only, tensors in, tensors updated in
place.

    c_t = β1·m_{t-1} + (1-β1)·g_t
    θ_t = θ_{t-1} - η·(sign(c_t) + λ·θ_{t-1})
    m_t = β2·m_{t-1} + (1-β2)·g_t

Decay uses the old parameter and is multiplied by the lr (google/automl lion_pytorch.py).

The gradient is read saturated at half the largest value of the momentum's dtype
(``functional.overflow.average_bound``; ±inf too): both averages then stay finite for every
gradient, where +max followed by −max used to turn m into ±inf and the next step into NaN.
Gradients within the bound (every one that training can meaningfully produce) are read
unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, local
from danlu.core.overflow import average_bound, average_bounds, saturate, saturate_all
from danlu.core.precision import needs_upcast_copies, upcast_step
from danlu.core.tensors import group_by_device_and_dtype, select_path

__all__ = ["lion"]


def lion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Lion step on each (param, grad, exp_avg) triple; updates params and exp_avgs.

    ``foreach``/``fused`` choose the implementation (see ``functional._utils.select_path``);
    all of them compute the same update. Momentum in another dtype than its parameter (e.g.
    bf16) and ``stochastic_rounding`` of bf16/fp16 parameters (``None``/``True``: on for
    them) run the math in fp32: inside the Triton kernel on CUDA, elsewhere on upcast copies
    (``functional.precision``). DTensor (FSDP2) tensors are updated through their local
    slices: the update is elementwise.
    """
    if not params:
        return
    if any_dtensor(params):
        params, grads, exp_avgs = ([local(t) for t in ts] for ts in (params, grads, exp_avgs))
    path = select_path(foreach, fused, params)
    if path == "triton":
        from danlu.algorithms.lion.triton import lion_triton

        lion_triton(
            list(params),
            list(grads),
            list(exp_avgs),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
            stochastic_rounding=stochastic_rounding,
        )
        return
    if needs_upcast_copies(path, params, grads, [exp_avgs], stochastic_rounding):
        # one tensor at a time (as upcast_step goes anyway): the fp32 copies no longer show
        # the momentum's own dtype, so its bound is passed along
        for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
            upcast_step(
                _single_tensor_lion,
                [param],
                [grad],
                [[exp_avg]],
                stochastic_rounding=stochastic_rounding,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                maximize=maximize,
                grad_bound=average_bound(exp_avg.dtype, param.dtype),
            )
        return
    fn = _implementation(path)
    fn(
        list(params),
        list(grads),
        list(exp_avgs),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _implementation(path: str) -> Callable[..., None]:
    if path == "single":
        return _single_tensor_lion
    if path == "foreach":
        return _multi_tensor_lion
    if path == "chunked":
        from danlu.algorithms.lion.fast import lion_chunked

        return lion_chunked
    from danlu.algorithms.lion.fast import lion_compiled

    return lion_compiled


def _single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_bound: float | None = None,
) -> None:
    """``grad_bound``: the saturation bound of every gradient (default: each momentum's
    :func:`~danlu.core.overflow.average_bound`)."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        if maximize:
            grad = -grad
        bound = average_bound(exp_avg.dtype, param.dtype) if grad_bound is None else grad_bound
        grad = saturate(grad, bound, owned=maximize)
        update = torch.lerp(exp_avg, grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.sub_(update.mul_(lr))
        exp_avg.lerp_(grad, 1 - beta2)


def _multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_bound: float | None = None,
) -> None:
    for (device_params, device_grads, device_exp_avgs), _ in group_by_device_and_dtype(
        [params, grads, exp_avgs]
    ):
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        bounds = (
            average_bounds(device_params, device_exp_avgs) if grad_bound is None else grad_bound
        )
        device_grads = saturate_all(device_grads, bounds, owned=maximize)
        updates = torch._foreach_lerp(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_sign_(updates)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(device_params, updates)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta2)

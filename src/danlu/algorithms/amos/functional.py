"""Amos, docs/reference/algorithms.md#amos-optimizer: the math only, tensors in, tensors updated in
place.

jestimator's ``scale_by_amos`` (google-research/jestimator amos.py), with ξ the global lr,
η the per-tensor expected scale of the entries, t the 1-based step and fr the finetune rate::

    g        ← clip(g, −clip_value, clip_value)                  (optional)
    g2       = mean(g² over the axes where v has size 1)        (a scalar for a 0-d v)
    v        ← β v + (1−β) g2
    1/v̂      = (1 − β^t) / max(v, ε)                            ε = 2⁻¹²⁵
    c        = (1 + ζ √ξ b)^(−1/2),     d = 1 / (1 + ζ √(ξη) b)
    γ        = √fr · c · ξ² · g2 / v̂
    δ        = fr · d · (−ξη g / √v̂ − ½ γ (θ − center))
    b        ← b + γ (fr + b)
    m        ← μ m + (1−μ) δ;   δ ← m                            (optional momentum, no debiasing)
    θ        ← θ + δ

``center`` is 0 in jestimator; danlu lets a tensor decay toward another centre (1 for
norm gains), which is Amos applied to θ − center. v and b have the reduced ("slot") shape
chosen by the caller (see :func:`amos_slot_shape`), kept in float32 or wider.

Gradients are read saturated (together with the optional ``clip_value``) at the largest
magnitude for which the sum of squares behind one slot's mean stays finite
(``functional.overflow``): one huge finite gradient cannot turn v into inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, local, reduce_partial_sums
from danlu.core.overflow import square_bound
from danlu.core.precision import stochastically_rounded_params
from danlu.core.tensors import group_by_device_and_dtype, scalar_like, select_path

__all__ = ["AMOS_EPS", "SLOT_RULES", "amos", "amos_default_eta", "amos_slot_shape", "fan_in"]

AMOS_EPS = 2.0**-125
SLOT_RULES = ("per_output", "scalar", "full")


def fan_in(shape: Sequence[int]) -> int:
    """Inputs per output unit in PyTorch's layout: 1 for ndim ≤ 1, else numel / shape[0]
    (``in_features`` of a Linear, ``in/groups·k…`` of a conv kernel, ``dim`` of an Embedding)."""
    if len(shape) <= 1:
        return 1
    return max(math.prod(shape[1:]), 1)


def amos_default_eta(shape: Sequence[int], *, rule: str = "he", elementwise: bool = False) -> float:
    """η from the docs/reference/algorithms.md#amos-optimizer README examples: 0.5 for element-wise
    tensors (biases, norm gains); √(2/fan_in) for ``rule="he"`` (hidden layers); √(1/fan_in) for
    ``rule="lecun"`` (the output layer)."""
    if elementwise or len(shape) <= 1:
        return 0.5
    if rule == "he":
        return math.sqrt(2.0 / fan_in(shape))
    if rule == "lecun":
        return math.sqrt(1.0 / fan_in(shape))
    raise ValueError(f"eta rule must be 'he' or 'lecun', got {rule!r}")


def amos_slot_shape(shape: Sequence[int], rule: str = "per_output") -> tuple[int, ...]:
    """The shape of v and b for a parameter of ``shape``.

    ``"per_output"`` (default): a scalar for tensors with ndim ≤ 1, otherwise one slot per
    index of axis 0 (an output feature of a Linear or conv kernel, a row of an Embedding), as
    jestimator's MNIST/BERT ``shape_fn`` does in Flax's transposed layout. ``"scalar"``: one
    slot per tensor (pytorch_optimizer.Amos). ``"full"``: the parameter's shape (jestimator
    without ``shape_fn``).
    """
    if rule == "scalar" or (rule == "per_output" and len(shape) <= 1):
        return ()
    if rule == "per_output":
        return (shape[0],) + (1,) * (len(shape) - 1)
    if rule == "full":
        return tuple(shape)
    raise ValueError(f"slots must be one of {SLOT_RULES}, got {rule!r}")


def _reduced_axes(grad: Tensor, slot: Tensor) -> list[int] | None:
    """Axes averaged into the slot (None: all of them, for a 0-d slot)."""
    if slot.dim() == 0:
        return None
    return [i for i, size in enumerate(grad.shape) if slot.shape[i] < size]


def _slot_count(grad_shape: Sequence[int], axes: list[int] | None) -> int:
    """How many entries of the gradient go into one slot's mean square."""
    return math.prod(grad_shape if axes is None else [grad_shape[a] for a in axes])


def _gradient_limit(dtype: torch.dtype, count: int, clip_value: float | None) -> float:
    """The clamp applied to the gradient: ±clip_value, and never beyond the overflow bound."""
    bound = square_bound(dtype, count)
    return bound if clip_value is None else min(clip_value, bound)


def _mean_square(g: Tensor, slot: Tensor) -> Tensor:
    axes = _reduced_axes(g, slot)
    if axes is None:
        return (g * g).mean()
    if not axes:
        return g * g
    return (g * g).mean(dim=axes, keepdim=True)


def _sqrt(x: float | Tensor) -> float | Tensor:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def amos(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    bs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | None],
    *,
    step: float | Tensor,
    lr: float | Tensor,
    eta: float | Sequence[float],
    beta: float = 0.999,
    zeta: float = 0.25,
    finetune_rate: float = 1.0,
    center: float = 0.0,
    momentum: float = 0.0,
    clip_value: float | None = None,
    eps: float = AMOS_EPS,
    maximize: bool = False,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Amos update at step ``step`` (1-based; a 0-d tensor inside ``torch.compile``, so
    that the step count does not recompile the graph) of every tensor; ``eta`` is one float for all
    tensors or one per tensor. ``exp_avg_sqs`` (v) and ``bs`` (b) have slot shapes that
    broadcast against the params; ``exp_avgs[i]`` is needed when ``momentum > 0``. DTensor
    (FSDP2) tensors take the single-tensor ops on their local slices, with the mean square
    over the whole tensor (slots placed as ``danlu.distributed.new_state`` does)..

    ``fused=True`` runs the single-tensor math compiled by ``torch.compile`` (one fused loop
    per tensor; Triton code generated by Inductor on CUDA, C++ on CPU; the first step
    compiles); otherwise the foreach path or the for-loop, chosen like torch.optim.
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``functional.precision``); the state is kept and rounded as without it."""
    if not params:
        return
    etas = [float(eta)] * len(params) if isinstance(eta, int | float) else [float(e) for e in eta]
    if len(etas) != len(params):
        raise ValueError(f"amos: got {len(etas)} eta values for {len(params)} params")
    if momentum > 0 and any(m is None for m in exp_avgs):
        raise ValueError("amos: momentum > 0 needs a momentum tensor in exp_avgs for every param")
    if any_dtensor(params):
        fn: Any = _dtensor_amos
    else:
        fn = _implementation(select_path(foreach, fused, params), fused)

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [bs[i] for i in indices],
            [exp_avgs[i] for i in indices],
            etas=[etas[i] for i in indices],
            **settings,
        )

    settings: dict[str, Any] = dict(
        bias_correction=(
            1.0 - torch.pow(beta, step.to(torch.float64))
            if isinstance(step, Tensor)
            else 1.0 - beta ** float(step)
        ),
        lr=lr,
        beta=beta,
        zeta=zeta,
        finetune_rate=finetune_rate,
        center=center,
        momentum=momentum,
        clip_value=clip_value,
        eps=eps,
        maximize=maximize,
    )
    stochastically_rounded_params(run, params, stochastic_rounding)


def _implementation(path: str, fused: bool | None) -> Callable[..., None]:
    if path == "compiled" or (path == "triton" and fused):
        from danlu.algorithms.amos.fast import amos_compiled

        return amos_compiled
    if path in ("foreach", "triton"):  # no hand-written kernel: CUDA's default is foreach
        return _multi_tensor_amos
    return _single_tensor_amos  # "single" and "chunked" (slot means need whole tensors)


def _single_tensor_amos(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    etas: list[float],
    **settings: Any,
) -> None:
    for param, grad, v, b, exp_avg, eta in zip(
        params, grads, exp_avg_sqs, bs, exp_avgs, etas, strict=True
    ):
        _amos_tensor(param, grad, v, b, exp_avg, eta=eta, mean_square=_mean_square, **settings)


def _dtensor_amos(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    etas: list[float],
    **settings: Any,
) -> None:
    """Amos on DTensors (FSDP2): the single-tensor ops on the local slices, with the mean
    square over each slot's reduced axes taken over the whole tensor; the partial sums of all
    tensors are all-reduced together (one collective per step)."""
    partials, axes_list = [], []
    for param, grad, v in zip(params, grads, exp_avg_sqs, strict=True):
        axes = _reduced_axes(param, v)  # from the global shapes (a local slice may have size 1)
        count = _slot_count(param.shape, axes)
        g = _prepared_gradient(local(grad), local(v).dtype, count, settings)
        squares = g * g
        if axes is None:
            partials.append(squares.sum())
        else:
            partials.append(squares.sum(dim=axes, keepdim=True) if axes else squares)
        axes_list.append(axes)
    totals = reduce_partial_sums(partials, params, axes_list)
    for param, grad, v, b, exp_avg, eta, total, axes in zip(
        params, grads, exp_avg_sqs, bs, exp_avgs, etas, totals, axes_list, strict=True
    ):
        count = math.prod(param.shape[a] for a in (range(param.dim()) if axes is None else axes))
        _amos_tensor(
            local(param),
            local(grad),
            local(v),
            local(b),
            None if exp_avg is None else local(exp_avg),
            eta=eta,
            mean_square=partial(_given_mean_square, value=total.div_(max(count, 1))),
            count=_slot_count(param.shape, axes),
            **settings,
        )


def _given_mean_square(g: Tensor, slot: Tensor, *, value: Tensor) -> Tensor:
    return value


def _prepared_gradient(
    grad: Tensor, dtype: torch.dtype, count: int, settings: dict[str, Any]
) -> Tensor:
    """The gradient as the update sees it: in the statistics' dtype, negated for
    ``maximize``, clipped to ±``clip_value`` and saturated where ``count`` of its squares
    could overflow."""
    g = grad.to(dtype)
    if settings["maximize"]:
        g = -g
    limit = _gradient_limit(dtype, count, settings["clip_value"])
    return g.clamp(-limit, limit)


def _amos_tensor(
    param: Tensor,
    grad: Tensor,
    v: Tensor,
    b: Tensor,
    exp_avg: Tensor | None,
    *,
    eta: float,
    mean_square: Callable[[Tensor, Tensor], Tensor],
    bias_correction: float | Tensor,
    lr: float | Tensor,
    beta: float,
    zeta: float,
    finetune_rate: float,
    center: float,
    momentum: float,
    clip_value: float | None,
    eps: float,
    maximize: bool,
    count: int | None = None,
) -> None:
    """One tensor's update; ``mean_square(g, v)`` is the mean of g² over v's reduced axes,
    ``count`` entries of g per slot (by default from the shapes of ``grad`` and ``v``)."""
    fr = finetune_rate
    g = grad.to(v.dtype)
    if maximize:
        g = -g
    if count is None:
        count = _slot_count(grad.shape, _reduced_axes(grad, v))
    limit = _gradient_limit(v.dtype, count, clip_value)
    g = g.clamp(-limit, limit)
    # Slot-shaped factors (v, b and everything below have the slot's shape).
    g2 = mean_square(g, v)
    v.lerp_(g2, 1 - beta)
    rcpl_v_hat = v.clamp_min(eps).reciprocal_().mul_(scalar_like(bias_correction, v))
    decay_c = b.mul(zeta * _sqrt(lr)).add_(1.0).rsqrt_()
    decay_d = b.mul(zeta * _sqrt(lr * eta)).add_(1.0).reciprocal_()
    gamma = decay_c.mul_(rcpl_v_hat).mul_(g2).mul_(math.sqrt(fr) * lr**2)
    # δ = coef_g·g + coef_θ·(θ − center), coef_g = −f·d·ξη/√v̂, coef_θ = −½·f·d·γ
    coef_g = rcpl_v_hat.sqrt_().mul_(decay_d).mul_(-(fr * lr * eta))
    coef_theta = decay_d.mul_(gamma).mul_(-0.5 * fr)
    b.addcmul_(b.add(fr), gamma)
    delta = g.mul(coef_g) if g is grad else g.mul_(coef_g)
    delta.addcmul_(param, coef_theta)
    if center != 0:
        delta.sub_(coef_theta.mul(center))
    if momentum > 0:
        assert exp_avg is not None
        exp_avg.lerp_(delta.to(exp_avg.dtype), 1 - momentum)
        delta = exp_avg
    param.add_(delta)


def _multi_tensor_amos(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    etas: list[float],
    bias_correction: float | Tensor,
    lr: float | Tensor,
    beta: float,
    zeta: float,
    finetune_rate: float,
    center: float,
    momentum: float,
    clip_value: float | None,
    eps: float,
    maximize: bool,
) -> None:
    fr = finetune_rate
    grouped = group_by_device_and_dtype([params, grads, exp_avg_sqs, bs, exp_avgs])
    for (device_params, device_grads, vs, device_bs, device_exp_avgs), indices in grouped:
        device_etas = [etas[i] for i in indices]
        v_dtype = vs[0].dtype
        gs = [g.to(v_dtype) for g in device_grads]
        if maximize:
            gs = list(torch._foreach_neg(gs))
        limits = [
            _gradient_limit(v_dtype, _slot_count(g.shape, _reduced_axes(g, v)), clip_value)
            for g, v in zip(gs, vs, strict=True)
        ]
        gs = [g.clamp(-limit, limit) for g, limit in zip(gs, limits, strict=True)]
        g2s = [_mean_square(g, v) for g, v in zip(gs, vs, strict=True)]
        torch._foreach_lerp_(vs, g2s, 1 - beta)
        rcpl_v_hats = list(torch._foreach_clamp_min(vs, eps))
        torch._foreach_reciprocal_(rcpl_v_hats)
        torch._foreach_mul_(rcpl_v_hats, scalar_like(bias_correction, vs[0]))
        decay_cs = list(torch._foreach_mul(device_bs, zeta * _sqrt(lr)))
        torch._foreach_add_(decay_cs, 1.0)
        torch._foreach_rsqrt_(decay_cs)
        # floats, or 0-d tensors when lr is a tensor (the TensorList overload broadcasts them)
        decay_scales: list[Any] = [zeta * _sqrt(lr * e) for e in device_etas]
        decay_ds = list(torch._foreach_mul(device_bs, decay_scales))
        torch._foreach_add_(decay_ds, 1.0)
        torch._foreach_reciprocal_(decay_ds)
        gammas = decay_cs
        torch._foreach_mul_(gammas, rcpl_v_hats)
        torch._foreach_mul_(gammas, g2s)
        torch._foreach_mul_(gammas, math.sqrt(fr) * lr**2)
        coef_gs = rcpl_v_hats
        torch._foreach_sqrt_(coef_gs)
        torch._foreach_mul_(coef_gs, decay_ds)
        coef_scales: list[Any] = [-(fr * lr * e) for e in device_etas]
        torch._foreach_mul_(coef_gs, coef_scales)
        coef_thetas = decay_ds
        torch._foreach_mul_(coef_thetas, gammas)
        torch._foreach_mul_(coef_thetas, -0.5 * fr)
        torch._foreach_addcmul_(device_bs, torch._foreach_add(device_bs, fr), gammas)
        deltas = list(torch._foreach_mul(gs, coef_gs))
        torch._foreach_addcmul_(deltas, device_params, coef_thetas)
        if center != 0:
            torch._foreach_sub_(deltas, torch._foreach_mul(coef_thetas, center))
        if momentum > 0:
            momenta = [m for m in device_exp_avgs if m is not None]
            torch._foreach_lerp_(
                momenta, [d.to(m.dtype) for d, m in zip(deltas, momenta, strict=True)], 1 - momentum
            )
            deltas = momenta
        torch._foreach_add_(device_params, deltas)

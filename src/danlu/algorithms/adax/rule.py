"""AdaX's reference rule: the hyper-parameters of one step and the update of one tensor.

docs/reference/algorithms.md#adax-rule; Li et al. 2020, "AdaX: Adaptive Gradient Descent with
Exponential Long Term Memory" (arXiv 2004.09740); kexue.fm/archives/7387; code bojone/adax.
Every other path (foreach, chunked, compiled, Triton) computes the same update and is held to
:func:`adax_update_` by a parity test.

The blog's v_t = (1+β2)·v + β2·g² grows like (1+β2)^t and overflows float32 after about
9·10⁵ steps at β2 = 1e-4, so the state is v̂ = v_t / ((1+β2)^t − 1) itself, in the equivalent
normalised EMA form of docs/reference/algorithms.md#adax-rule: a weighted average of the g²,
which cannot overflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from danlu.core.overflow import saturate, square_bound
from danlu.core.tensors import scalar_like

__all__ = [
    "AdaXHyper",
    "adax_beta2_hat",
    "adax_new_sample_weight",
    "adax_update_",
    "decay_factor",
    "denominator",
    "denominator_floor",
    "read_grad",
]

# expm1(x) overflows float64 beyond x ≈ 709.78; past that the weight is below 1e-300 anyway.
_MAX_EXPONENT = 700.0


@dataclass(frozen=True)
class AdaXHyper:
    """One AdaX step's hyper-parameters: the weight 1 − β̂_t of the newest g² in v̂ (a 0-d
    tensor inside ``torch.compile``), step size α, β1, ε (under the root with
    ``eps_inside_sqrt``), decoupled weight decay λ and ``maximize`` (the rule reads −g)."""

    new_sample_weight: float | Tensor
    lr: float | Tensor
    beta1: float
    eps: float
    eps_inside_sqrt: bool = False
    weight_decay: float = 0.0
    maximize: bool = False

    @classmethod
    def at_step(cls, step: float | Tensor, beta2: float, **fields: Any) -> AdaXHyper:
        """The hyper-parameters of step ``step`` (1-based): 1 − β̂_t from ``step`` and β2,
        the other ``fields`` as they are."""
        weight = (
            _new_sample_weight_tensor(step, beta2)
            if isinstance(step, Tensor)
            else adax_new_sample_weight(step, beta2)
        )
        return cls(new_sample_weight=weight, **fields)

    @classmethod
    def from_group(cls, group: Mapping[str, Any], step: float | Tensor) -> AdaXHyper:
        beta1, beta2 = group["betas"]
        return cls.at_step(
            step,
            beta2,
            lr=group["lr"],
            beta1=beta1,
            eps=group["eps"],
            eps_inside_sqrt=group["eps_inside_sqrt"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )


def adax_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, h: AdaXHyper
) -> None:
    """One AdaX step on one tensor, in place (docs/reference/algorithms.md#adax-rule)::

        m_t = β1·m_{t−1} + (1 − β1)·g_t                   (no bias correction)
        v̂_t = β̂_t·v̂_{t−1} + (1 − β̂_t)·g_t²,   1 − β̂_t = β2 / ((1+β2)^t − 1)
        θ_t = θ_{t−1}·(1 − αλ) − α·m_t / (√v̂_t + ε)

    with √(v̂_t + ε) under ``eps_inside_sqrt``. m has any float dtype (usually the
    parameter's), v̂ float32 or wider; g is read in v̂'s dtype (:func:`read_grad`), and the
    update reads the stored, rounded m.
    """
    g = read_grad(grad, exp_avg_sq.dtype, h.maximize)
    exp_avg.lerp_(g.to(exp_avg.dtype), 1 - h.beta1)  # m_t
    exp_avg_sq.lerp_(g * g, scalar_like(h.new_sample_weight, exp_avg_sq))  # v̂_t
    denom = denominator(exp_avg_sq, h)
    if h.weight_decay != 0:
        param.mul_(decay_factor(h))
    if isinstance(h.lr, Tensor):  # addcdiv_ takes a number as its factor
        param.addcmul_(exp_avg.div(denom), h.lr, value=-1.0)
    else:
        param.addcdiv_(exp_avg, denom, value=-h.lr)


def read_grad(grad: Tensor, v_dtype: torch.dtype, maximize: bool) -> Tensor:
    """g (−g with ``maximize``) in v̂'s dtype, saturated where g² would overflow it (about
    1.3e19 in float32): one huge finite gradient cannot turn v̂ into inf. A new tensor."""
    if maximize:
        grad = -grad
    g = grad.to(v_dtype)
    return saturate(g, square_bound(v_dtype), owned=maximize or g.dtype != grad.dtype)


def denominator(exp_avg_sq: Tensor, h: AdaXHyper) -> Tensor:
    """√v̂ + ε (the code), or √(v̂ + ε) with ``eps_inside_sqrt`` (the blog); a new tensor."""
    v = exp_avg_sq
    denom = v.add(h.eps).sqrt_() if h.eps_inside_sqrt else v.sqrt().add_(h.eps)
    floor = denominator_floor(h.eps, denom.dtype)
    return denom if floor is None else denom.clamp_min_(floor)


def denominator_floor(eps: float, dtype: torch.dtype) -> float | None:
    """Where ε is below the smallest normal number of ``dtype`` (ε = 0, or 1e-8 lost in fp16),
    that number, the denominator's floor: v̂ = 0 only where every gradient was 0 (so m = 0),
    and the step there is 0, not 0/0. ``None`` where ε keeps the denominator above it."""
    tiny = torch.finfo(dtype).tiny
    return tiny if eps < tiny else None


def decay_factor(h: AdaXHyper) -> float | Tensor:
    """1 − αλ: decoupled weight decay multiplies the old θ by it."""
    return 1 - h.lr * h.weight_decay


def adax_new_sample_weight(step: float, beta2: float) -> float:
    """1 − β̂_t = β2 / ((1+β2)^t − 1): the weight of the newest g² in v̂ (1 at t = 1).

    Evaluated as β2 / expm1(t·log1p(β2)) in float64: exact at t = 1 (β̂_1 = 0), and it
    underflows gracefully to 0 (β̂ = 1) for very large t."""
    if step <= 1:
        return 1.0  # (1+β2)^1 − 1 = β2 exactly
    exponent = float(step) * math.log1p(beta2)
    if exponent > _MAX_EXPONENT:
        return 0.0
    return min(1.0, beta2 / math.expm1(exponent))


def _new_sample_weight_tensor(step: Tensor, beta2: float) -> Tensor:
    """:func:`adax_new_sample_weight` of a 0-d tensor step (float64), on the tensor's device:
    the same formula in torch ops, so that the step count does not recompile a graph."""
    step = step.to(torch.float64)
    exponent = step * math.log1p(beta2)
    weight = (beta2 / torch.expm1(exponent)).clamp(max=1.0)
    weight = torch.where(exponent > _MAX_EXPONENT, 0.0, weight)
    return torch.where(step <= 1, 1.0, weight)


def adax_beta2_hat(step: float, beta2: float) -> float:
    """β̂_t = 1 − β2 / ((1+β2)^t − 1): 0 at t = 1, ≈ 1 − 1/t for t ≪ 1/β2, → 1."""
    return 1.0 - adax_new_sample_weight(step, beta2)

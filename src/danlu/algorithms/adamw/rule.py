"""AdamW's reference rule: one tensor, one micro-step (the foreach path in ``functional.py``
mirrors it line by line), then the named pieces the paths share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from danlu.core.overflow import saturate, square_bound

__all__ = [
    "AdamWHyper",
    "adamw_bias_corrections",
    "adamw_denominator",
    "adamw_gradient",
    "adamw_gradient_bound",
    "adamw_update_",
]


def adamw_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, h: AdamWHyper
) -> None:
    """One AdamW micro-step of one tensor, in place (Loshchilov & Hutter 2019, arXiv
    1711.05101; the accumulation: docs/reference/algorithms.md#hidden-accumulation-rule,
    kexue.fm/archives/8634). k = ``grad_accum_steps``; β' = β on a window's first micro-step
    (always when k = 1), else 1; n counts updates (``step``, advanced on the last micro-step)::

        m ← β1'·m + (1−β1)/k · g          v ← β2'·v + (1−β2)/k · g²
        on the last micro-step only (ε under the root, √(v̂ + ε), with eps_inside_sqrt):
        θ ← θ·(1 − η·λ) − η·m̂ / (√v̂ + ε)      m̂ = m / (1−β1^n),  v̂ = v / (1−β2^n)

    For k = 1 this is torch.optim.AdamW. A parameter narrower than v is updated in v's dtype
    and rounded once."""
    g = adamw_gradient(grad, exp_avg_sq, h)
    k = h.grad_accum_steps
    if k == 1:
        exp_avg.lerp_(g.to(exp_avg.dtype), 1 - h.beta1)
        exp_avg_sq.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    else:
        if h.first_micro_step:
            exp_avg.mul_(h.beta1)
            exp_avg_sq.mul_(h.beta2)
        exp_avg.add_(g.to(exp_avg.dtype), alpha=(1 - h.beta1) / k)
        exp_avg_sq.addcmul_(g, g, value=(1 - h.beta2) / k)
    if not h.last_micro_step:
        return
    step += 1
    step_size, bias_correction2 = adamw_bias_corrections(h, _count(step, param))
    wide = torch.promote_types(param.dtype, exp_avg_sq.dtype)  # bf16/fp16 θ, float32 v
    work = param if param.dtype == wide else param.to(wide)
    if h.weight_decay != 0:
        work.mul_(1 - h.lr * h.weight_decay)
    denom = adamw_denominator(exp_avg_sq, bias_correction2, h)
    if isinstance(step_size, Tensor):
        work.sub_(exp_avg.div(denom).mul_(step_size))
    else:
        work.addcdiv_(exp_avg, denom, value=-step_size)
    if work is not param:
        param.copy_(work)


@dataclass(frozen=True)
class AdamWHyper:
    """The hyper-parameters of one AdamW micro-step, the same for every tensor of a call;
    ``first_micro_step`` and ``last_micro_step`` place it in its accumulation window."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    eps_inside_sqrt: bool = False
    grad_accum_steps: int = 1
    first_micro_step: bool = True
    last_micro_step: bool = True
    maximize: bool = False

    @classmethod
    def of(cls, *, lr: float | Tensor, **hyper: Any) -> AdamWHyper:
        """The hyper-parameters from the functional's keywords. A tensor lr is read to the host
        once, except inside ``torch.compile``, where it stays a tensor (no host read)."""
        if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
            lr = float(lr.item())
        return cls(lr=lr, **hyper)


def adamw_bias_corrections(
    h: AdamWHyper, n: float | Tensor
) -> tuple[float | Tensor, float | Tensor]:
    """After n updates: the step size η / (1 − β1^n) and the second moment's 1 − β2^n."""
    return h.lr / (1 - h.beta1**n), 1 - h.beta2**n


def adamw_gradient(grad: Tensor, exp_avg_sq: Tensor, h: AdamWHyper) -> Tensor:
    """The gradient as the rule reads it: negated for ``maximize``, in v's dtype, saturated
    at :func:`adamw_gradient_bound` (a new tensor unless ``grad`` needed no change)."""
    if h.maximize:
        grad = -grad
    owned = h.maximize or grad.dtype != exp_avg_sq.dtype
    bound = adamw_gradient_bound(h, exp_avg_sq.dtype)
    return saturate(grad.to(exp_avg_sq.dtype), bound, owned=owned)


def adamw_denominator(
    exp_avg_sq: Tensor, bias_correction2: float | Tensor, h: AdamWHyper
) -> Tensor:
    """√v̂ + ε, or √(v̂ + ε) with ``eps_inside_sqrt`` (the blog post's form), a new tensor; at
    least the smallest normal number, so that v̂ = 0 (only where m = 0) gives a 0 step, not 0/0."""
    if h.eps_inside_sqrt:
        denom = (exp_avg_sq / bias_correction2).add_(h.eps).sqrt_()
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(h.eps)
    if h.eps < torch.finfo(denom.dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
        denom.clamp_min_(torch.finfo(denom.dtype).tiny)
    return denom


def adamw_gradient_bound(h: AdamWHyper, dtype: torch.dtype) -> float:
    """The largest |g| whose (1 − β2)·g² stays finite in v's ``dtype`` (``danlu.core.overflow``):
    about 1.3e19 in float32, 5.7e3 in float16 at β2 = 0.999."""
    return square_bound(dtype, weight=1 - h.beta2)


def _count(step: Tensor, like: Tensor) -> float | Tensor:
    """The update count for the bias corrections: a float, or inside ``torch.compile`` a float64
    tensor on the parameter's device (as torch.optim's capturable path: no host read)."""
    if torch.compiler.is_compiling():
        return step.to(device=like.device, dtype=torch.float64)
    return float(step.item())

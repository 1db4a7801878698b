"""Amos's reference rule: one tensor, one step (the other paths in ``functional.py`` and
``fast.py`` call it or mirror it line by line), then the named pieces they share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from danlu.core.overflow import square_bound
from danlu.core.tensors import scalar_like

__all__ = [
    "AMOS_EPS",
    "SLOT_RULES",
    "AmosHyper",
    "amos_bias_correction",
    "amos_decays",
    "amos_default_eta",
    "amos_gradient",
    "amos_slot_shape",
    "amos_update_",
    "fan_in",
    "reduced_axes",
    "slot_count",
    "slot_mean_square",
]

AMOS_EPS = 2.0**-125
SLOT_RULES = ("per_output", "scalar", "full")


def amos_update_(
    param: Tensor,
    grad: Tensor,
    v: Tensor,
    b: Tensor,
    exp_avg: Tensor | None,
    eta: float,
    h: AmosHyper,
    *,
    g2: Tensor | None = None,
    count: int | None = None,
) -> None:
    """One Amos step of one tensor, in place (docs/reference/algorithms.md#amos-optimizer;
    jestimator's ``scale_by_amos``; Tian & Parikh 2022, arXiv 2210.11693; kexue.fm/archives/9344),
    with ξ = ``h.lr``, f = ``h.finetune_rate``, t the 1-based step and v, b of the slot shape::

        g  ← clip(g, ±clip_value)         g2 = mean(g² over the axes where v has size 1)
        v  ← β v + (1−β) g2               1/v̂ = (1 − β^t) / max(v, ε)
        c  = (1 + ζ √ξ b)^(−1/2)          d  = 1 / (1 + ζ √(ξη) b)
        γ  = √f · c · ξ² · g2 / v̂
        δ  = f · d · (−ξη g / √v̂ − ½ γ (θ − center))       b ← b + γ (f + b)
        m  ← μ m + (1−μ) δ;  δ ← m        (only with momentum μ > 0; no debiasing)
        θ  ← θ + δ

    The DTensor path passes ``g2`` and ``count`` (entries of g per slot) of the whole tensor."""
    g = amos_gradient(grad, v, h, count)
    if g2 is None:
        g2 = slot_mean_square(g, v)
    v.lerp_(g2, 1 - h.beta)
    rcpl_v_hat = v.clamp_min(h.eps).reciprocal_().mul_(scalar_like(h.bias_correction, v))
    c, d = amos_decays(b, eta, h)
    gamma = c.mul_(rcpl_v_hat).mul_(g2).mul_(h.gamma_scale)
    # δ = coef_g·g + coef_θ·(θ − center), coef_g = −f·d·ξη/√v̂, coef_θ = −½·f·d·γ
    coef_g = rcpl_v_hat.sqrt_().mul_(d).mul_(h.coef_g_scale(eta))
    coef_theta = d.mul_(gamma).mul_(h.coef_theta_scale)
    b.addcmul_(b.add(h.finetune_rate), gamma)
    delta = g.mul_(coef_g).addcmul_(param, coef_theta)
    if h.center != 0:
        delta.sub_(coef_theta.mul(h.center))
    if h.momentum > 0:
        assert exp_avg is not None
        exp_avg.lerp_(delta.to(exp_avg.dtype), 1 - h.momentum)
        delta = exp_avg
    param.add_(delta)


@dataclass(frozen=True)
class AmosHyper:
    """The hyper-parameters of one Amos step, the same for every tensor of a call (η, the one
    per-tensor value, is passed beside it). ``lr`` and ``bias_correction`` (1 − β^t) are 0-d
    tensors inside ``torch.compile``, so that neither the step nor an lr schedule recompiles."""

    lr: float | Tensor
    bias_correction: float | Tensor
    beta: float = 0.999
    zeta: float = 0.25
    finetune_rate: float = 1.0
    center: float = 0.0
    momentum: float = 0.0
    clip_value: float | None = None
    eps: float = AMOS_EPS
    maximize: bool = False

    @classmethod
    def at_step(cls, step: float | Tensor, *, beta: float, **hyper: Any) -> AmosHyper:
        """The hyper-parameters of step ``step`` (1-based) from the functional's keywords."""
        return cls(bias_correction=amos_bias_correction(beta, step), beta=beta, **hyper)

    # The scalar factors of the rule, shared with the foreach path.
    @property
    def decay_c_scale(self) -> float | Tensor:
        """ζ √ξ, the factor of b in c."""
        return self.zeta * _sqrt(self.lr)

    def decay_d_scale(self, eta: float) -> float | Tensor:
        """ζ √(ξη), the factor of b in d."""
        return self.zeta * _sqrt(self.lr * eta)

    @property
    def gamma_scale(self) -> float | Tensor:
        """√f · ξ², the factor of c · g2 / v̂ in γ."""
        return math.sqrt(self.finetune_rate) * self.lr**2

    def coef_g_scale(self, eta: float) -> float | Tensor:
        """−f ξ η, the factor of d / √v̂ in δ's gradient term."""
        return -(self.finetune_rate * self.lr * eta)

    @property
    def coef_theta_scale(self) -> float:
        """−½ f, the factor of d · γ in δ's decay term."""
        return -0.5 * self.finetune_rate


def amos_bias_correction(beta: float, step: float | Tensor) -> float | Tensor:
    """1 − β^t (a float64 0-d tensor for a tensor step)."""
    if isinstance(step, Tensor):
        return 1.0 - torch.pow(beta, step.to(torch.float64))
    return 1.0 - beta ** float(step)


def amos_decays(b: Tensor, eta: float, h: AmosHyper) -> tuple[Tensor, Tensor]:
    """The decay factors c = (1 + ζ √ξ b)^(−1/2) and d = 1 / (1 + ζ √(ξη) b), new tensors."""
    c = b.mul(h.decay_c_scale).add_(1.0).rsqrt_()
    d = b.mul(h.decay_d_scale(eta)).add_(1.0).reciprocal_()
    return c, d


def amos_gradient(grad: Tensor, v: Tensor, h: AmosHyper, count: int | None = None) -> Tensor:
    """The gradient as the rule reads it, a new tensor: in v's dtype, negated for
    ``maximize``, clipped to ±``clip_value`` and saturated where the ``count`` squares behind
    one slot's mean (by default from the shapes of ``grad`` and ``v``) could overflow
    (``danlu.core.overflow``): one huge finite gradient cannot turn v into inf."""
    g = grad.to(v.dtype)
    if h.maximize:
        g = -g
    if count is None:
        count = slot_count(grad.shape, reduced_axes(grad, v))
    bound = square_bound(v.dtype, count)
    limit = bound if h.clip_value is None else min(h.clip_value, bound)
    return g.clamp(-limit, limit)


def slot_mean_square(g: Tensor, slot: Tensor) -> Tensor:
    """The reduced second moment g2: the mean of g² over the axes where ``slot`` has size 1
    (all of them for a 0-d slot), in the slot's shape."""
    axes = reduced_axes(g, slot)
    if axes is None:
        return (g * g).mean()
    if not axes:
        return g * g
    return (g * g).mean(dim=axes, keepdim=True)


def reduced_axes(grad: Tensor, slot: Tensor) -> list[int] | None:
    """Axes averaged into the slot (None: all of them, for a 0-d slot)."""
    if slot.dim() == 0:
        return None
    return [i for i, size in enumerate(grad.shape) if slot.shape[i] < size]


def slot_count(grad_shape: Sequence[int], axes: list[int] | None) -> int:
    """How many entries of the gradient go into one slot's mean square."""
    return math.prod(grad_shape if axes is None else [grad_shape[a] for a in axes])


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


def _sqrt(x: float | Tensor) -> float | Tensor:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)

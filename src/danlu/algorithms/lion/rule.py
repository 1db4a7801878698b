"""Lion's reference rule: the hyper-parameters of one step and the update of one tensor.

docs/reference/algorithms.md#lion-rule; Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms" (arXiv 2302.06675); kexue.fm/archives/9473. Every other path (foreach, chunked,
compiled, Triton) computes the same update and is held to :func:`lion_update_` by a parity test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from danlu.core.overflow import average_bound, saturate

__all__ = ["LionHyper", "decay_factor", "lion_update_", "read_grad"]


@dataclass(frozen=True)
class LionHyper:
    """One Lion step's hyper-parameters: step size η, interpolation β1, momentum decay β2,
    decoupled weight decay λ, and ``maximize`` (ascend: the rule reads −g)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool = False

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> LionHyper:
        beta1, beta2 = group["betas"]
        return cls(group["lr"], beta1, beta2, group["weight_decay"], group["maximize"])


def lion_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, h: LionHyper, grad_bound: float | None = None
) -> None:
    """One Lion step on one tensor, in place (docs/reference/algorithms.md#lion-rule)::

        c_t = β1·m_{t−1} + (1 − β1)·g_t
        θ_t = θ_{t−1}·(1 − ηλ) − η·sign(c_t)
        m_t = β2·m_{t−1} + (1 − β2)·g_t

    ``grad_bound``: where g is saturated (default :func:`~danlu.core.overflow.average_bound`
    of m's dtype; the upcast path passes the bound of the momentum it copied).
    """
    bound = average_bound(exp_avg.dtype, param.dtype) if grad_bound is None else grad_bound
    g = read_grad(grad, bound, h.maximize)
    update = torch.lerp(exp_avg, g, 1 - h.beta1).sign_()  # sign(c_t)
    if h.weight_decay != 0:
        param.mul_(decay_factor(h))
    param.sub_(update.mul_(h.lr))
    exp_avg.lerp_(g, 1 - h.beta2)  # m_t


def read_grad(grad: Tensor, bound: float, maximize: bool) -> Tensor:
    """g (−g with ``maximize``) saturated at ±``bound``, as a new tensor: with |g| ≤ half the
    largest value of m's dtype, both averages of the rule stay finite (±inf included)."""
    if maximize:
        grad = -grad
    return saturate(grad, bound, owned=maximize)


def decay_factor(h: LionHyper) -> float | Tensor:
    """1 − ηλ: decoupled weight decay multiplies the old θ by it (google/automl lion_pytorch)."""
    return 1 - h.lr * h.weight_decay

"""Tiger's reference rule: the settings of one micro-step and the update of one tensor.

docs/reference/algorithms.md#tiger-rule; blog kexue.fm/archives/9512; code bojone/tiger
``tiger.py``. Every other path (foreach, chunked, compiled, DTensor, Triton) is kept equal to
:func:`tiger_update_` by the parity tests and calls the named pieces below where it can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from danlu.core.overflow import average_bound, saturate
from danlu.core.row_norm import row_norm
from danlu.core.shell import KINDS

__all__ = [
    "TigerHyper",
    "accumulate_",
    "direction",
    "eta_from_rms_",
    "read_grad",
    "rms_root",
    "step_size",
    "tiger_update_",
]


@dataclass(frozen=True)
class TigerHyper:
    """The settings of one Tiger micro-step on tensors of one ``kind``."""

    lr: float | Tensor  # α, the global relative step
    beta: float  # β
    weight_decay: float  # λ as given; the rule applies :attr:`decay`
    kind: str  # "elementwise", "matrix" or "embedding": how η is computed
    rms_floor: float  # lower bound of the RMS factor
    grad_accum_steps: int = 1  # k, micro-steps per update
    first_micro_step: bool = True  # the momentum decays by β
    last_micro_step: bool = True  # the parameters move
    maximize: bool = False
    nonfinite: str = "shrink"  # a tensor with a non-finite gradient: "shrink" or "skip"
    center: float = 0.0  # where "shrink" pulls θ
    shrink_ratio: float = 0.99
    stochastic_rounding: bool | None = False  # None/True: on for bf16/fp16 parameters

    @classmethod
    def of(cls, **settings: Any) -> TigerHyper:
        """From the functional's keyword arguments, with its checks."""
        hyper = cls(**settings)
        if hyper.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {hyper.kind!r}")
        if hyper.nonfinite not in ("shrink", "skip"):
            raise ValueError(f"nonfinite must be 'shrink' or 'skip', got {hyper.nonfinite!r}")
        return hyper

    @classmethod
    def from_group(
        cls, group: Mapping[str, Any], *, kind: str, first: bool, last: bool
    ) -> TigerHyper:
        """From a ``danlu.Tiger`` param group (checked by the optimizer) at one position of the
        accumulation window. ``nonfinite="raise"`` has raised before any update: it is
        ``"skip"`` here."""
        return cls(
            lr=group["lr"],
            beta=group["beta"],
            weight_decay=group["weight_decay"],
            kind=kind,
            rms_floor=group["rms_floor"],
            grad_accum_steps=group["grad_accum_steps"],
            first_micro_step=first,
            last_micro_step=last,
            maximize=group["maximize"],
            nonfinite="skip" if group["nonfinite"] == "raise" else group["nonfinite"],
            center=float(group["center"]),
            shrink_ratio=group["shrink_ratio"],
            # absent from state dicts saved before it existed
            stochastic_rounding=group.get("stochastic_rounding"),
        )

    @property
    def decay(self) -> float:
        """λ as the rule applies it: 0 for element-wise tensors (biases, norm gains)."""
        return 0.0 if self.kind == "elementwise" else self.weight_decay

    @property
    def grad_weight(self) -> float:
        """(1 − β)/k, the weight of one micro-step's gradient in the momentum."""
        return (1 - self.beta) / self.grad_accum_steps


def tiger_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hyper: TigerHyper,
    *,
    eta: float | Tensor | None = None,
    grad_bound: float | None = None,
) -> None:
    r"""One Tiger micro-step on one tensor, in place (docs/reference/algorithms.md#tiger-rule)::

        ĝ = clamp(±g, −b, b)                   −g with maximize; b = grad_bound
        m ← β'·m + (1 − β)/k·ĝ                 β' = β on a window's first micro-step, else 1
        θ ← θ − η·(sign(m) + λ·θ)              on a window's last micro-step only

    η = :func:`step_size` of θ before the step (given as ``eta`` for a DTensor slice, whose
    RMS spans every rank); λ = :attr:`TigerHyper.decay`. ``grad_bound`` defaults to half the
    largest value of the momentum's dtype (:func:`~danlu.core.overflow.average_bound`), so m
    stays finite for every finite gradient; gradients within it are read unchanged.
    """
    if hyper.last_micro_step and eta is None:  # reads θ only, which m's update leaves alone
        eta = step_size(param, lr=hyper.lr, kind=hyper.kind, rms_floor=hyper.rms_floor)
    bound = average_bound(exp_avg.dtype, param.dtype) if grad_bound is None else grad_bound
    accumulate_(exp_avg, read_grad(grad, bound, hyper.maximize), hyper)
    if hyper.last_micro_step:
        assert eta is not None
        param.sub_(direction(exp_avg, param, hyper.decay).mul_(eta))


def step_size(param: Tensor, *, lr: float | Tensor, kind: str, rms_floor: float) -> float | Tensor:
    """η for one tensor: 0.5·α (elementwise), α·max(RMS(θ), floor) over the whole tensor
    (matrix), or a column of one such value per row (embedding, RMS over the last axis)."""
    if kind == "elementwise":
        return 0.5 * lr
    dtype = torch.promote_types(param.dtype, torch.float32)
    if kind == "matrix":
        norm = torch.linalg.vector_norm(param, dtype=dtype)
    elif kind == "embedding":
        # an opaque op inside torch.compile (Inductor's CPU code generation fails on the row
        # reduction fused with the update, pytorch#196570); the same call eagerly
        norm = row_norm(param, dtype)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return eta_from_rms_(norm / rms_root(param, kind), lr, rms_floor)


def rms_root(param: Tensor, kind: str) -> float:
    """√n for the RMS of ``kind``: n entries of the whole tensor, or of one row (embedding)."""
    count = param.shape[-1] if kind == "embedding" and param.dim() > 0 else param.numel()
    return math.sqrt(max(count, 1))


def eta_from_rms_(rms: Tensor, lr: float | Tensor, rms_floor: float) -> Tensor:
    """η = α·max(RMS, rms_floor), in place on ``rms``."""
    return rms.clamp_min_(rms_floor).mul_(lr)


def read_grad(grad: Tensor, bound: float, maximize: bool) -> Tensor:
    """ĝ: the gradient negated with ``maximize`` and saturated at ±``bound`` (a new tensor only
    where the values change)."""
    if maximize:
        grad = -grad
    return saturate(grad, bound, owned=maximize)


def accumulate_(exp_avg: Tensor, grad: Tensor, hyper: TigerHyper) -> None:
    """m ← β'·m + (1 − β)/k·ĝ in place (a lerp when k = 1)."""
    if hyper.grad_accum_steps == 1:
        exp_avg.lerp_(grad, 1 - hyper.beta)
        return
    if hyper.first_micro_step:
        exp_avg.mul_(hyper.beta)
    exp_avg.add_(grad, alpha=hyper.grad_weight)


def direction(exp_avg: Tensor, param: Tensor, decay: float, out: Tensor | None = None) -> Tensor:
    """sign(m) + λ·θ, in a new tensor or in ``out``."""
    update = torch.sign(exp_avg) if out is None else torch.sign(exp_avg, out=out)
    if decay != 0:
        update.add_(param, alpha=decay)
    return update

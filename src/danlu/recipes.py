"""Training recipes from the blog: docs/reference/algorithms.md#amos-recipes (kexue 9344,
Amos-derived) and docs/reference/algorithms.md#lion-defaults (Lion).

* :func:`sign_optimizer_hparams`: lr and weight decay of a sign update (Lion, Tiger) from the
  parameter's init std: η = α0·σ, λ = α0/(2qσ).
* :func:`adamw_to_lion`: lr ÷ factor, weight decay × factor, so that η·λ is unchanged.
* :class:`InverseSquareDecayLR`, :class:`InverseTimeDecayLR`: the Amos-derived schedules
  (defined in :mod:`danlu.schedules`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from danlu.schedules import (
    InverseSquareDecayLR,
    InverseTimeDecayLR,
    inverse_square_decay,
    inverse_time_decay,
)

__all__ = [
    "BLOG_ALPHA0",
    "ELEMENTWISE_CHANGE_SCALE",
    "HParams",
    "InverseSquareDecayLR",
    "InverseTimeDecayLR",
    "adamw_to_lion",
    "inverse_square_decay",
    "inverse_time_decay",
    "sign_optimizer_hparams",
]

#: α0 that the blog found best for BERT-base MLM pre-training with sign updates
#: (docs/reference/algorithms.md#lion-defaults).
BLOG_ALPHA0 = 1.11e-3
#: The change scale σ of biases and norm gains/offsets (Amos paper's choice,
#: docs/reference/algorithms.md#amos-recipes).
ELEMENTWISE_CHANGE_SCALE = 0.5


class HParams(NamedTuple):
    lr: float
    weight_decay: float


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def sign_optimizer_hparams(
    init_std: float,
    alpha0: float = BLOG_ALPHA0,
    *,
    q: float = 1.0,
    rms_relative: bool = False,
) -> HParams:
    """(lr, weight_decay) for a sign update θ ← θ − η(sign(·) + λθ) (Lion, Tiger),
    docs/reference/algorithms.md#lion-defaults, docs/reference/algorithms.md#amos-recipes: η = α0·σ
    and λ = α0/(2qσ), σ the init std (the change scale) of the matrix.

    From the Amos analysis: a step of relative size α0 (|Δθ| = α0·|ε0|, |ε0| ≈ √k·σ) with the
    absolute decay ρ = α0²/2q that cancels its second-order growth; λ = ρ/η is then constant in
    t, so an lr schedule carries the decay with it. BERT-base (σ = 1/√768, α0 = 1.11e-3):
    lr = 4.0054e-5, weight_decay = 0.015381.

    ``rms_relative=True`` is for optimizers whose lr is already relative to the parameter's RMS
    (Tiger's matrices, LAMB): it returns lr = α0 with the same λ. For biases and norm
    parameters use σ = :data:`ELEMENTWISE_CHANGE_SCALE` (0.5), which also matches Tiger's
    0.5·lr for element-wise parameters.
    """
    sigma = _positive("init_std", init_std)
    alpha0 = _positive("alpha0", alpha0)
    q = _positive("q", q)
    lr = alpha0 if rms_relative else alpha0 * sigma
    return HParams(lr, alpha0 / (2.0 * q * sigma))


def adamw_to_lion(lr: float, weight_decay: float, factor: float = 10.0) -> HParams:
    """Lion's (lr, weight_decay) from AdamW's (docs/reference/algorithms.md#lion-defaults): the lr
    ``factor`` times smaller and the decoupled weight decay ``factor`` times larger, so the
    effective decay η·λ is kept.

    The blog says factor ≥ 10; the Lion paper's README says 3–10 (ViT-B/16: AdamW 1e-3, 1.0 →
    Lion 1e-4, 10).
    """
    lr = _positive("lr", lr)
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, int | float)
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    factor = _positive("factor", factor)
    if factor < 1:
        raise ValueError(
            f"factor must be >= 1 (Lion needs a smaller lr than AdamW), got {factor!r}"
        )
    return HParams(lr / factor, float(weight_decay) * factor)

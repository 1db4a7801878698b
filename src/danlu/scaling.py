"""Learning rate against batch size, and the effect of Adam's ε:
docs/reference/algorithms.md#lr-batch-size (kexue 10542, 10563).

Rules of thumb
    :func:`scale_lr` (linear for SGD, square root for Adam-like optimizers).
SGD (McCandlish et al. 2018, arXiv 1812.06162)
    η*(B) = η_max / (1 + B_noise/B): :func:`opt_lr_sgd`, :func:`sgd_noise_scale`,
    :func:`steps_data_tradeoff`.
Sign updates (Adam as SignSGD, Lion, Tiger; the "surge" of arXiv 2405.14578 re-derived)
    :func:`opt_lr_sign`, :func:`surge_peak_batch`, :func:`expected_sign`.
Adam with ε (SoftSignSGD)
    :func:`opt_lr_softsign`, :func:`softsign_noise_scale`, :func:`clip_mean`.
Measuring the noise scale
    :func:`b_simple` from per-device gradients, :func:`noise_scale_from_norms` from squared
    norms at two batch sizes, :class:`NoiseScaleMonitor` during training (per-rank gradients
    under ``torch.distributed``, micro-batches on one process).

Batch sizes may be floats (``math.inf`` gives the large-batch limit) or tensors (evaluated
element-wise); bad input raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "NoiseScaleEstimate",
    "NoiseScaleMonitor",
    "SGDNoiseScale",
    "SignNoiseScale",
    "StepsAndSamples",
    "b_simple",
    "clip_mean",
    "clip_mean_approx",
    "estimate_noise_scale",
    "expected_sign",
    "noise_scale_from_norms",
    "opt_lr_sgd",
    "opt_lr_sign",
    "opt_lr_softsign",
    "scale_lr",
    "sgd_noise_scale",
    "softsign_noise_scale",
    "steps_data_tradeoff",
    "surge_peak_batch",
]

BatchT = TypeVar("BatchT", float, Tensor)
_PI = math.pi

# ----------------------------------------------------------------------------------------------
# Argument checks.


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(name: str, value: Any, *, low: float, strict: bool, allow_inf: bool) -> float:
    ok = _is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        what = f"a number {'>' if strict else '>='} {low:g}"
        if not allow_inf:
            what = "a finite " + what[2:]
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _check_batch(name: str, value: Any) -> Any:
    """B > 0 (``inf`` allowed: the large-batch limit), a number or a tensor of them."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
        if not value.is_floating_point():
            value = value.to(torch.float64)
        if value.numel() and not bool(((value > 0) & ~value.isnan()).all()):
            raise ValueError(f"{name} must be > 0 everywhere, got {value!r}")
        return value
    return _check_number(name, value, low=0.0, strict=True, allow_inf=True)


def _vector(name: str, value: Any) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if out.dim() != 1 or out.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(out.shape)}")
    if not bool(out.isfinite().all()):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _non_negative_vector(name: str, value: Any, size: int) -> Tensor:
    out = _vector(name, value)
    if out.numel() != size:
        raise ValueError(f"{name} must have {size} entries (one per coordinate), got {out.numel()}")
    if bool((out < 0).any()):
        raise ValueError(f"{name} must be >= 0 (variances), got negative entries in {value!r}")
    return out


def _hessian(value: Any, size: int) -> Tensor:
    """A 1-D value is the diagonal of a diagonal Hessian."""
    try:
        h = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"hessian must be a matrix of numbers: {exc}") from None
    if h.dim() == 1:
        h = torch.diag(h)
    if h.shape != (size, size):
        raise ValueError(
            f"hessian must have shape ({size}, {size}) or ({size},), got {tuple(h.shape)}"
        )
    if not bool(h.isfinite().all()):
        raise ValueError("hessian must be finite")
    if bool((torch.diagonal(h) < 0).any()):
        raise ValueError("hessian must have a non-negative diagonal (a positive semi-definite H)")
    return h


def _covariance(value: Any, size: int) -> Tensor:
    """Per-sample gradient covariance Σ; a 1-D value holds the variances of a diagonal Σ."""
    try:
        s = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"sigma must be a matrix or vector of numbers: {exc}") from None
    if s.dim() == 1:
        s = torch.diag(s)
    if s.shape != (size, size):
        raise ValueError(
            f"sigma must have shape ({size}, {size}) or ({size},), got {tuple(s.shape)}"
        )
    if not bool(s.isfinite().all()):
        raise ValueError("sigma must be finite")
    if bool((torch.diagonal(s) < 0).any()):
        raise ValueError("sigma must have a non-negative diagonal (variances >= 0)")
    return s


def _sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _erf(x: Any) -> Any:
    return torch.erf(x) if isinstance(x, Tensor) else math.erf(x)


def _exp(x: Any) -> Any:
    return torch.exp(x) if isinstance(x, Tensor) else math.exp(x)


# ----------------------------------------------------------------------------------------------
# Rules of thumb and the SGD analysis.


def scale_lr(base_lr: float, base_batch: float, batch: BatchT, rule: str) -> BatchT:
    """The lr for ``batch`` given a tuned ``base_lr`` at ``base_batch``
    (docs/reference/algorithms.md#lr-batch-size).

    ``rule="linear"``: η ∝ B (SGD seen as an SDE; Goyal et al.). ``rule="sqrt"``: η ∝ √B
    (constant-noise SGD; the SDE analysis of Adam/RMSProp, Malladi et al. 2022; LAMB). There
    is no default: which one applies depends on the optimizer, and both saturate once B is
    past the noise scale (see :func:`opt_lr_sgd` and :func:`opt_lr_sign`).
    """
    base_lr = _check_number("base_lr", base_lr, low=0.0, strict=True, allow_inf=False)
    base_batch = _check_number("base_batch", base_batch, low=0.0, strict=True, allow_inf=False)
    batch = _check_batch("batch", batch)
    if rule == "linear":
        return base_lr * (batch / base_batch)
    if rule == "sqrt":
        return base_lr * _sqrt(batch / base_batch)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


def opt_lr_sgd(batch: BatchT, eta_max: float, b_noise: float) -> BatchT:
    """SGD's optimal lr at batch size B: η_max / (1 + B_noise/B)
    (docs/reference/algorithms.md#lr-batch-size, OpenAI).

    Linear in B for B ≪ B_noise, saturating at η_max above it.
    """
    batch = _check_batch("batch", batch)
    eta_max = _check_number("eta_max", eta_max, low=0.0, strict=True, allow_inf=False)
    b_noise = _check_number("b_noise", b_noise, low=0.0, strict=False, allow_inf=False)
    return eta_max / (1.0 + b_noise / batch)


def _sign_beta(batch: Any, kappa2: float) -> Any:
    """β = (1 + πκ²/2B)^(−1/2), the mean-field shrink of E[sign]
    (docs/reference/algorithms.md#lr-batch-size)."""
    return 1.0 / _sqrt(1.0 + _PI * kappa2 / (2.0 * batch))


def opt_lr_sign(
    batch: BatchT, eta_max: float, kappa2: float, beta_noise: float | None = None
) -> BatchT:
    """Optimal lr of a sign update (Adam as SignSGD, Lion, Tiger) at batch size B
    (docs/reference/algorithms.md#lr-batch-size).

    With β = (1 + πκ²/2B)^(−1/2) and κ² the common noise-to-signal ratio (σ_i/g_i)²:

    * ``beta_noise=None`` (diagonal Hessian): η* = η_max·β with η_max = Σ|g_i| / Σ H_ii;
      ∝ √B for B ≪ πκ²/2.
    * otherwise (general Hessian): η* = η_max / (½(β_noise/β + β/β_noise)) with
      η_max = Σ|g_i| / (2√(Σ H_ii · Σ_{i≠j} sign(g_i g_j) H_ij)) and
      β_noise = √(Σ H_ii / Σ_{i≠j} sign(g_i g_j) H_ij). When β_noise < 1 the lr rises to η_max
      at B = :func:`surge_peak_batch` and then falls to 2η_max·β_noise/(1 + β_noise²): the surge.

    :func:`softsign_noise_scale` computes these constants from g, the variances and H.
    """
    batch = _check_batch("batch", batch)
    eta_max = _check_number("eta_max", eta_max, low=0.0, strict=True, allow_inf=False)
    kappa2 = _check_number("kappa2", kappa2, low=0.0, strict=False, allow_inf=False)
    beta = _sign_beta(batch, kappa2)
    if beta_noise is None:
        return eta_max * beta
    beta_noise = _check_number("beta_noise", beta_noise, low=0.0, strict=True, allow_inf=False)
    return eta_max / (0.5 * (beta_noise / beta + beta / beta_noise))


def surge_peak_batch(kappa2: float, beta_noise: float) -> float:
    """The batch size where a sign update's optimal lr peaks
    (docs/reference/algorithms.md#lr-batch-size): B_noise = πκ²β_noise² / (2(1 − β_noise²)); ``inf``
    when β_noise ≥ 1 (no surge: the lr grows with B all the way). κ² = 100, β_noise = 0.5 gives
    52.3598776.
    """
    kappa2 = _check_number("kappa2", kappa2, low=0.0, strict=False, allow_inf=False)
    beta_noise = _check_number("beta_noise", beta_noise, low=0.0, strict=True, allow_inf=True)
    if beta_noise >= 1.0:
        return math.inf
    b2 = beta_noise * beta_noise
    return _PI * kappa2 * b2 / (2.0 * (1.0 - b2))


class StepsAndSamples(NamedTuple):
    steps: float
    samples: float


def steps_data_tradeoff(min_steps: float, min_samples: float, batch: float) -> StepsAndSamples:
    """Steps S and samples E to reach a given loss at batch size B
    (docs/reference/algorithms.md#lr-batch-size, OpenAI): S = (1 + B_noise/B)·S_min and E = B·S,
    with B_noise = E_min/S_min, so that (S/S_min − 1)(E/E_min − 1) = 1. For sign updates use
    E_min/S_min = B_noise-2 (:attr:`SignNoiseScale.b_noise_2`).
    """
    min_steps = _check_number("min_steps", min_steps, low=0.0, strict=True, allow_inf=False)
    min_samples = _check_number("min_samples", min_samples, low=0.0, strict=True, allow_inf=False)
    batch = _check_number("batch", batch, low=0.0, strict=True, allow_inf=False)
    steps = (1.0 + (min_samples / min_steps) / batch) * min_steps
    return StepsAndSamples(steps, batch * steps)


@dataclass(frozen=True)
class SGDNoiseScale:
    """The constants of SGD's lr-vs-batch law (docs/reference/algorithms.md#lr-batch-size), from
    :func:`sgd_noise_scale`.

    ``eta_max`` = gᵀg / gᵀHg, ``b_noise`` = tr(ΣH) / gᵀHg, ``b_simple`` = tr Σ / gᵀg (the
    estimate of B_noise that needs no Hessian), ``loss_drop_max`` = (gᵀg)² / 2gᵀHg.
    """

    eta_max: float
    b_noise: float
    b_simple: float
    loss_drop_max: float

    def lr(self, batch: BatchT) -> BatchT:
        """η*(B) = η_max / (1 + B_noise/B)."""
        return opt_lr_sgd(batch, self.eta_max, self.b_noise)

    def loss_drop(self, batch: BatchT) -> BatchT:
        """Loss decrease of one step at η*(B): ΔL_max / (1 + B_noise/B)."""
        batch = _check_batch("batch", batch)
        return self.loss_drop_max / (1.0 + self.b_noise / batch)


def sgd_noise_scale(g: Any, sigma: Any, hessian: Any) -> SGDNoiseScale:
    """SGD's η_max, B_noise and B_simple from the mean gradient ``g`` (n,), the per-sample
    gradient covariance ``sigma`` ((n, n), or (n,) variances for a diagonal Σ) and the Hessian
    ``hessian`` ((n, n) or its diagonal) (docs/reference/algorithms.md#lr-batch-size).
    """
    g = _vector("g", g)
    n = g.numel()
    cov = _covariance(sigma, n)
    h = _hessian(hessian, n)
    gg = float(g @ g)
    ghg = float(g @ h @ g)
    if gg <= 0:
        raise ValueError("g must not be all zeros")
    if ghg <= 0:
        raise ValueError("hessian must have gᵀHg > 0 (curvature along the gradient)")
    return SGDNoiseScale(
        eta_max=gg / ghg,
        b_noise=float(torch.trace(cov @ h)) / ghg,
        b_simple=float(torch.trace(cov)) / gg,
        loss_drop_max=gg * gg / (2.0 * ghg),
    )


# ----------------------------------------------------------------------------------------------
# Sign and soft-sign updates.


def expected_sign(g: Any, sigma2: Any, batch: Any, *, approx: bool = False) -> Any:
    """E[sign(g̃)] for g̃ ~ N(g, σ²/B) (docs/reference/algorithms.md#lr-batch-size):
    erf((g/σ)·√(B/2)).

    ``approx=True`` gives the algebraic form (g/σ) / √(π/2B + (g/σ)²) that the mean-field
    analysis uses (from erf(x) ≈ x/√(x² + π/4); erf(1) = 0.842701 against 0.748398).
    σ² = 0 gives sign(g).
    """
    batch = _check_batch("batch", batch)
    if isinstance(g, Tensor) or isinstance(sigma2, Tensor) or isinstance(batch, Tensor):
        g = torch.as_tensor(g, dtype=torch.float64)
        sigma2 = torch.as_tensor(sigma2, dtype=torch.float64)
        if bool((sigma2 < 0).any()):
            raise ValueError(f"sigma2 must be >= 0 (a variance), got {sigma2!r}")
        safe = torch.where(sigma2 > 0, sigma2, torch.ones_like(sigma2))
        ratio = g / safe.sqrt()
        if approx:
            mean = ratio / torch.sqrt(_PI / (2.0 * batch) + ratio * ratio)
        else:
            mean = torch.erf(ratio * torch.sqrt(torch.as_tensor(batch, dtype=torch.float64) / 2))
        return torch.where(sigma2 > 0, mean, torch.sign(g))
    g = _check_number("g", g, low=-math.inf, strict=True, allow_inf=False)
    sigma2 = _check_number("sigma2", sigma2, low=0.0, strict=False, allow_inf=False)
    if sigma2 == 0:
        return math.copysign(1.0, g) if g != 0 else 0.0
    ratio = g / math.sqrt(sigma2)
    if approx:
        return ratio / math.sqrt(_PI / (2.0 * batch) + ratio * ratio)
    return math.erf(ratio * math.sqrt(batch / 2.0))


_KAPPA2_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # mean over coordinates of σ_i² / (g_i² + ε²): the docs/reference/algorithms.md "avg".
    "mean": lambda var, sq: (var / sq).mean(),
    # Σσ_i² / Σ(g_i² + ε²): weighted like B_simple = tr Σ / |g|².
    "ratio": lambda var, sq: var.sum() / sq.sum(),
    "median": lambda var, sq: (var / sq).median(),
}


@dataclass(frozen=True)
class SignNoiseScale:
    """Constants of the lr-vs-batch law of a (soft-)sign update
    (docs/reference/algorithms.md#lr-batch-size), from :func:`softsign_noise_scale`. With ν_i =
    g_i/√(g_i² + ε²), N = Σ ν_i g_i, Q = Σ_ij ν_i ν_j H_ij, T = Σ H_ii and β(B) = (1 +
    πκ²/2B)^(−1/2):

        η*(B) = β N / (β² Q + (1 − β²) T).

    ``beta_noise`` = √(T/(Q − T)) (``inf`` when Q ≤ T); the lr peaks at β = β_noise, i.e. at
    ``b_noise`` = :func:`surge_peak_batch`, when β_noise < 1 (the surge), and ``eta_max`` is
    that peak (the large-batch limit N/Q otherwise). ``b_noise_2`` = πκ²T/(2Q) sets the
    per-step loss drop ΔL_max/(1 + B_noise-2/B), ΔL_max = N²/2Q, and plays B_noise's role in
    :func:`steps_data_tradeoff`.
    """

    kappa2: float
    nu_dot_g: float
    quad: float
    trace: float
    beta_noise: float
    eta_max: float
    b_noise: float
    b_noise_2: float
    loss_drop_max: float

    def lr(self, batch: BatchT) -> BatchT:
        """η*(B); with x = πκ²/2B (β² = 1/(1 + x)) it reads N√(1 + x) / (Q + xT), which
        avoids the cancellation in 1 − β² when x is tiny (large ε or large B)."""
        batch = _check_batch("batch", batch)
        x = _PI * self.kappa2 / (2.0 * batch)
        return self.nu_dot_g * _sqrt(1.0 + x) / (self.quad + x * self.trace)

    def loss_drop(self, batch: BatchT) -> BatchT:
        batch = _check_batch("batch", batch)
        return self.loss_drop_max / (1.0 + self.b_noise_2 / batch)


def softsign_noise_scale(
    g: Any,
    sigma2: Any,
    hessian: Any,
    eps: float = 0.0,
    kappa2_reduce: str | Callable[[Tensor, Tensor], Any] = "mean",
) -> SignNoiseScale:
    """The constants of Adam-with-ε seen as SoftSignSGD, φ = g̃/√(g̃² + ε²)
    (docs/reference/algorithms.md#lr-batch-size); ``eps=0`` is the pure sign update (Adam as
    SignSGD, Lion, Tiger).

    ``g`` (n,) is the mean gradient, ``sigma2`` (n,) the per-sample gradient variances (a batch
    of B has σ²/B), ``hessian`` (n, n) or its diagonal (n,). κ² averages σ_i²/(g_i² + ε²)
    over the coordinates; the blog leaves the average open, so ``kappa2_reduce`` picks it:
    ``"mean"`` (default), ``"ratio"`` (Σσ²/Σ(g² + ε²), weighted like B_simple), ``"median"``,
    or a callable ``(sigma2, g**2 + eps**2) -> float``.
    """
    g = _vector("g", g)
    n = g.numel()
    var = _non_negative_vector("sigma2", sigma2, n)
    h = _hessian(hessian, n)
    eps = _check_number("eps", eps, low=0.0, strict=False, allow_inf=False)
    sq = g * g + eps * eps
    if bool((sq == 0).any()):
        raise ValueError("g must have no zero entries when eps = 0 (ν = g/√(g² + ε²) is 0/0)")
    if callable(kappa2_reduce):
        reduce = kappa2_reduce
    elif kappa2_reduce in _KAPPA2_REDUCTIONS:
        reduce = _KAPPA2_REDUCTIONS[kappa2_reduce]
    else:
        allowed = ", ".join(map(repr, _KAPPA2_REDUCTIONS))
        raise ValueError(
            f"kappa2_reduce must be one of {allowed} or a callable, got {kappa2_reduce!r}"
        )
    kappa2 = float(reduce(var, sq))
    if not math.isfinite(kappa2) or kappa2 < 0:
        raise ValueError(f"kappa2 must be a finite number >= 0, got {kappa2!r} from kappa2_reduce")
    nu = g / sq.sqrt()
    nu_dot_g = float(nu @ g)
    quad = float(nu @ h @ nu)
    trace = float(torch.trace(h))
    if trace <= 0 or quad < 0:
        raise ValueError("hessian must be positive semi-definite with a positive trace")
    beta_noise = math.sqrt(trace / (quad - trace)) if quad > trace else math.inf
    if beta_noise < 1.0:
        eta_max = nu_dot_g / (2.0 * math.sqrt(trace * (quad - trace)))
    else:
        eta_max = nu_dot_g / quad if quad > 0 else math.inf
    return SignNoiseScale(
        kappa2=kappa2,
        nu_dot_g=nu_dot_g,
        quad=quad,
        trace=trace,
        beta_noise=beta_noise,
        eta_max=eta_max,
        b_noise=surge_peak_batch(kappa2, beta_noise),
        b_noise_2=_PI * kappa2 * trace / (2.0 * quad) if quad > 0 else math.inf,
        loss_drop_max=nu_dot_g * nu_dot_g / (2.0 * quad) if quad > 0 else math.inf,
    )


def opt_lr_softsign(
    batch: BatchT,
    g: Any,
    sigma2: Any,
    hessian: Any,
    eps: float,
    kappa2_reduce: str | Callable[[Tensor, Tensor], Any] = "mean",
) -> BatchT:
    """Optimal lr of Adam with ε (SoftSignSGD) at batch size B
    (docs/reference/algorithms.md#lr-batch-size):

        η* ≈ β Σ ν_i g_i / (β² Σ_ij ν_i ν_j H_ij + (1 − β²) Σ H_ii),

    ν_i = g_i/√(g_i² + ε²), β = (1 + πκ²/2B)^(−1/2), κ² = avg σ_i²/(g_i² + ε²). A larger ε
    shrinks ν and removes the surge; as ε → ∞, η*/ε tends to SGD's with noise (πσ²/2B)·I.
    See :func:`softsign_noise_scale` for the arguments.
    """
    return softsign_noise_scale(g, sigma2, hessian, eps, kappa2_reduce).lr(batch)


def clip_mean(a: Any, b: Any) -> Any:
    """E[clip(z/b, −1, 1)] for z ~ N(a, 1), in closed form
    (docs/reference/algorithms.md#lr-batch-size).

    This is the mean of the clip approximation of softsign(g̃, ε) with a = g√B/σ and
    b = ε√B/σ. b = 0 gives E[sign(z)] = erf(a/√2). Floats or tensors.
    """
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        if bool((b < 0).any()) or not bool(b.isfinite().all()):
            raise ValueError(f"b must be finite and >= 0, got {b!r}")
        safe_b = torch.where(b > 0, b, torch.ones_like(b))
        value = _clip_mean_positive(a, safe_b)
        return torch.where(b > 0, value, torch.erf(a / math.sqrt(2.0)))
    a = _check_number("a", a, low=-math.inf, strict=True, allow_inf=False)
    b = _check_number("b", b, low=0.0, strict=False, allow_inf=False)
    if b == 0:
        return math.erf(a / math.sqrt(2.0))
    return _clip_mean_positive(a, b)


def _clip_mean_positive(a: Any, b: Any) -> Any:
    root2 = math.sqrt(2.0)
    upper = _erf((a + b) / root2)
    lower = _erf((a - b) / root2)
    tails = _exp(-((a + b) ** 2) / 2.0) - _exp(-((a - b) ** 2) / 2.0)
    return (
        0.5 * (upper + lower) + a / (2.0 * b) * (upper - lower) + tails / (b * math.sqrt(2 * _PI))
    )


def clip_mean_approx(a: Any, b: Any) -> Any:
    """The algebraic approximation a/√(a² + b² + π/2) of :func:`clip_mean`
    (docs/reference/algorithms.md#lr-batch-size)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        return a / torch.sqrt(a * a + b * b + _PI / 2.0)
    a = _check_number("a", a, low=-math.inf, strict=True, allow_inf=False)
    b = _check_number("b", b, low=0.0, strict=False, allow_inf=False)
    return a / math.sqrt(a * a + b * b + _PI / 2.0)


# ----------------------------------------------------------------------------------------------
# Measuring the noise scale.


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """Unbiased estimates of tr Σ (per-sample gradient covariance) and |g|² (squared norm of the
    true gradient), and their ratio B_simple = tr Σ / |g|² (``inf`` when the |g|² estimate is
    ≤ 0, i.e. the gradient is lost in the noise)."""

    trace_sigma: float
    grad_sq_norm: float

    @property
    def b_simple(self) -> float:
        if self.grad_sq_norm <= 0:
            return math.inf
        return self.trace_sigma / self.grad_sq_norm


def noise_scale_from_norms(
    small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float
) -> NoiseScaleEstimate:
    """tr Σ and |g|² from the mean squared norm of gradients over ``small_batch`` samples and
    the squared norm of one over ``big_batch`` samples (arXiv 1812.06162 appendix A), using
    E|G_B|² = |g|² + tr Σ / B at both sizes."""
    small_sq_norm = _check_number(
        "small_sq_norm", small_sq_norm, low=0, strict=False, allow_inf=False
    )
    big_sq_norm = _check_number("big_sq_norm", big_sq_norm, low=0, strict=False, allow_inf=False)
    small_batch = _check_number("small_batch", small_batch, low=0, strict=True, allow_inf=False)
    big_batch = _check_number("big_batch", big_batch, low=0, strict=True, allow_inf=False)
    if big_batch <= small_batch:
        raise ValueError(f"big_batch must be > small_batch, got {big_batch!r} <= {small_batch!r}")
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    return NoiseScaleEstimate(trace, grad_sq)


def _device_tensors(device_grads: Sequence[Any]) -> list[list[Tensor]]:
    if isinstance(device_grads, Tensor) or not isinstance(device_grads, Sequence):
        raise ValueError("device_grads must be a sequence with one gradient per device")
    out: list[list[Tensor]] = []
    for grads in device_grads:
        tensors = [grads] if isinstance(grads, Tensor) else list(grads)
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise ValueError(
                "device_grads must hold a tensor, or a sequence of tensors, per device"
            )
        out.append(tensors)
    if len(out) < 2:
        raise ValueError(f"device_grads must hold at least 2 devices' gradients, got {len(out)}")
    shapes = [tuple(t.shape) for t in out[0]]
    for i, tensors in enumerate(out[1:], start=1):
        if [tuple(t.shape) for t in tensors] != shapes:
            raise ValueError(f"device_grads[{i}] has shapes that differ from device_grads[0]")
    return out


def estimate_noise_scale(device_grads: Sequence[Any], per_device_batch: int) -> NoiseScaleEstimate:
    """tr Σ and |g|² from K ≥ 2 device gradients, each the mean over ``per_device_batch``
    samples (covariance Σ/b) (docs/reference/algorithms.md#lr-batch-size-helpers): tr Σ ≈ b Σ_i
    s_i², s_i² the unbiased across-device variance of coordinate i, and |g|² ≈ |ḡ|² − tr Σ/(Kb).

    Each entry of ``device_grads`` is one device's gradient: a tensor, or a sequence of
    tensors (one per parameter). Computed in float64.
    """
    per_device = _check_number(
        "per_device_batch", per_device_batch, low=0, strict=True, allow_inf=False
    )
    devices = _device_tensors(device_grads)
    k = len(devices)
    variance_sum = 0.0
    mean_sq = 0.0
    for j in range(len(devices[0])):
        stacked = torch.stack([d[j].detach().to(torch.float64).reshape(-1) for d in devices])
        if not bool(stacked.isfinite().all()):
            raise ValueError(f"device_grads must be finite (tensor {j} is not)")
        variance_sum += float(stacked.var(dim=0, correction=1).sum())
        mean_sq += float(stacked.mean(dim=0).square().sum())
    trace = per_device * variance_sum
    return NoiseScaleEstimate(trace, mean_sq - trace / (k * per_device))


def b_simple(device_grads: Sequence[Any], per_device_batch: int) -> float:
    """B_simple = tr Σ / |g|² from per-device gradients
    (docs/reference/algorithms.md#lr-batch-size); see :func:`estimate_noise_scale`. ``inf`` when the
    gradient is lost in the noise."""
    return estimate_noise_scale(device_grads, per_device_batch).b_simple


class NoiseScaleMonitor:
    """Estimates B_simple = tr Σ / |g|² during training from the gradients of the individual
    backward passes (docs/reference/algorithms.md#lr-batch-size: "monitoring it during training is
    suggested").

    It hooks every parameter (``Tensor.register_hook``) and records the squared norm of each
    backward pass's own gradient, before it is accumulated into ``.grad`` and before DDP
    averages it. At :meth:`update` it compares the mean of these squared norms (``micro_batch_size``
    samples each) with the squared norm of the step's averaged gradient (K times as many
    samples) — :func:`noise_scale_from_norms`.

    * Under ``torch.distributed`` (DDP, or any setup that leaves ``.grad`` averaged over the
      ranks) the per-rank squared norms are gathered with ``torch.distributed.all_gather``;
      every rank must call :meth:`update`. With W ranks and k micro-batches each, K = W·k.
    * On one process the step needs k ≥ 2 backward passes: accumulate gradients over
      micro-batches yourself, or let :meth:`backward_micro_batches` split the batch.

    Call :meth:`update` once per optimizer step, right after the last backward: before
    anything rewrites ``.grad`` (``GradScaler.unscale_``, gradient clipping, ``zero_grad``).
    Each backward pass must cover ``micro_batch_size`` samples, with the same loss scaling.
    ``accumulation="mean"`` (the default) means each of the k backward passes of a step
    computes loss/k, so ``.grad`` holds the batch's mean gradient; ``"sum"`` means they do not
    divide. It only sets the units of :attr:`trace_sigma` and :attr:`grad_sq_norm` (per-sample
    gradients); a GradScaler's factor S multiplies both by S². :attr:`b_simple` is a ratio and
    depends on neither.

    The two parts are smoothed by separate bias-corrected EMAs (as the paper recommends) and
    :attr:`b_simple` is their ratio. Not for sharded parameters (FSDP), whose hooks see
    reduced shards.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor],
        micro_batch_size: int,
        *,
        ema: float = 0.95,
        interval: int = 1,
        accumulation: str = "mean",
        process_group: Any = None,
    ) -> None:
        if (
            isinstance(micro_batch_size, bool)
            or not isinstance(micro_batch_size, int)
            or micro_batch_size < 1
        ):
            raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        if not _is_real(ema) or not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        tensors = params.parameters() if isinstance(params, nn.Module) else params
        self.params = [p for p in dict.fromkeys(tensors) if p.requires_grad]
        if not self.params:
            raise ValueError("params must contain at least one tensor that requires grad")
        self.micro_batch_size = micro_batch_size
        self.ema = float(ema)
        self.interval = interval
        if accumulation not in ("mean", "sum"):
            raise ValueError(f"accumulation must be 'mean' or 'sum', got {accumulation!r}")
        self.accumulation = accumulation
        self.process_group = process_group
        self.steps = 0
        self.last: NoiseScaleEstimate | None = None
        self._ema_trace = 0.0
        self._ema_grad_sq = 0.0
        self._ema_weight = 0.0
        self._device = self.params[0].device
        self._sq_norms: list[Tensor] = []
        self._fired: dict[int, int] = {}
        self._handles = [p.register_hook(self._make_hook(p)) for p in self.params]

    # -- hooks --------------------------------------------------------------------------------
    def _make_hook(self, p: Tensor) -> Callable[[Tensor], None]:
        key = id(p)

        def hook(grad: Tensor) -> None:
            if self.steps % self.interval == 0:
                norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
                self._sq_norms.append(norm.square().to(self._device))
                self._fired[key] = self._fired.get(key, 0) + 1

        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> NoiseScaleMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- measurement --------------------------------------------------------------------------
    def backward_micro_batches(self, loss_fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        """Split ``inputs`` along dim 0 into micro-batches of ``micro_batch_size`` and run
        ``loss_fn(*micro_inputs).backward()`` on each, the loss divided by their number under
        ``accumulation="mean"`` (so ``.grad`` ends up as the full-batch gradient of a mean
        loss). Returns the sum of the losses backpropagated (detached): the full-batch loss
        under ``"mean"``. Batch-norm statistics see micro-batches."""
        if not inputs:
            raise ValueError("inputs must contain at least one tensor")
        size = inputs[0].shape[0]
        if any(x.shape[0] != size for x in inputs):
            raise ValueError("inputs must all have the same size along dim 0")
        if size % self.micro_batch_size or size // self.micro_batch_size < 2:
            raise ValueError(
                f"inputs must hold a multiple (>= 2) of micro_batch_size={self.micro_batch_size} "
                f"samples, got {size}"
            )
        count = size // self.micro_batch_size
        losses = []
        for chunk in zip(*(x.split(self.micro_batch_size) for x in inputs), strict=True):
            loss = loss_fn(*chunk)
            if self.accumulation == "mean":
                loss = loss / count
            loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses).sum()

    def update(self) -> NoiseScaleEstimate | None:
        """Fold this step's backward passes into the estimate; returns this step's raw
        estimate (``None`` when this step was not measured, had fewer than two backward
        passes in all, or a non-finite gradient)."""
        measured = self.steps % self.interval == 0
        self.steps += 1
        if not measured:
            return None
        local_passes = max(self._fired.values(), default=0)
        local_sum = torch.zeros((), dtype=torch.float32, device=self._device)
        if self._sq_norms:
            local_sum = torch.stack(self._sq_norms).sum()
        self._sq_norms, self._fired = [], {}
        # float32 (not float64) so that every backend can gather it; counts stay exact.
        stats = torch.stack([local_sum, torch.full_like(local_sum, float(local_passes))])
        world = self._world_size()
        if world > 1:
            import torch.distributed as dist

            gathered = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(gathered, stats, group=self.process_group)
            table = torch.stack(gathered).double().cpu()
            counts = table[:, 1]
            if bool((counts != counts[0]).any()):
                raise RuntimeError(
                    "NoiseScaleMonitor: ranks ran different numbers of backward passes this "
                    f"step ({counts.tolist()}); every rank must run the same number"
                )
            total_sq, total_passes = float(table[:, 0].sum()), float(counts.sum())
        else:
            total_sq, total_passes = float(stats[0]), float(local_passes)
        if total_passes < 2:
            return None
        # .grad holds the sum of this rank's passes, averaged over ranks: divide by the
        # local count to get the mean of all K = world · local_passes gradients.
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        if not grads:
            return None
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(self._device) for g in grads]
        mean_sq = float(torch.stack(norms).double().square().sum()) / local_passes**2
        small_sq = total_sq / total_passes
        if self.accumulation == "mean":  # each pass saw G_i / k: back to per-sample units
            small_sq *= local_passes**2
            mean_sq *= local_passes**2
        if not (math.isfinite(small_sq) and math.isfinite(mean_sq)):
            return None
        estimate = noise_scale_from_norms(
            small_sq, mean_sq, self.micro_batch_size, self.micro_batch_size * total_passes
        )
        self.last = estimate
        self._ema_weight = self.ema * self._ema_weight + (1.0 - self.ema)
        self._ema_trace = self.ema * self._ema_trace + (1.0 - self.ema) * estimate.trace_sigma
        self._ema_grad_sq = self.ema * self._ema_grad_sq + (1.0 - self.ema) * estimate.grad_sq_norm
        return estimate

    def _world_size(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    # -- results ------------------------------------------------------------------------------
    @property
    def trace_sigma(self) -> float:
        """Smoothed estimate of tr Σ (``nan`` before the first measured step)."""
        return self._ema_trace / self._ema_weight if self._ema_weight else math.nan

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed estimate of |g|² (``nan`` before the first measured step)."""
        return self._ema_grad_sq / self._ema_weight if self._ema_weight else math.nan

    @property
    def b_simple(self) -> float:
        """Smoothed B_simple = EMA(tr Σ) / EMA(|g|²) (``nan`` before the first measured
        step, ``inf`` while the smoothed |g|² is ≤ 0)."""
        if not self._ema_weight:
            return math.nan
        if self._ema_grad_sq <= 0:
            return math.inf
        return self._ema_trace / self._ema_grad_sq

    def state_dict(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "ema_trace": self._ema_trace,
            "ema_grad_sq": self._ema_grad_sq,
            "ema_weight": self._ema_weight,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.steps = int(state["steps"])
        self._ema_trace = float(state["ema_trace"])
        self._ema_grad_sq = float(state["ema_grad_sq"])
        self._ema_weight = float(state["ema_weight"])

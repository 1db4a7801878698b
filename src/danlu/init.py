"""Initialisation helpers, docs/reference/algorithms.md#initialisation (kexue 8747 "why BERT uses
std 0.02", 8620, 9698).

* :func:`trunc_normal_tf_`: the TensorFlow truncated normal (cut at ±2 standard deviations of
  the *requested* std, not at absolute bounds: ``torch.nn.init.trunc_normal_(w, std=0.02)``
  cuts at ±2, i.e. not at all, docs/reference/algorithms.md#initialisation-edge-cases), optionally
  corrected so that the result has the requested std.
* :func:`bert_init_`: BERT's recipe for a whole module.
* LeCun / He / Xavier stds "in the blog's terms" (variance 1/fan_in, 2/fan_in,
  2/(fan_in + fan_out)) and :func:`variance_scaling_`, which draws from them.
* Tied embeddings: :func:`tied_embedding_std` (σ = ln n / d) and
  :func:`expected_initial_loss_tied` (≈ log(e^{dσ} + n − 1)).
* :func:`activation_second_moment` (E[f(x)²], x ~ N(0, 1)): 0.2933790 for the sigmoid, so
  ``sigmoid(x) / sqrt(0.2933790)`` keeps the second moment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from danlu.params import is_norm_layer

__all__ = [
    "SIGMOID_SECOND_MOMENT",
    "TRUNCATED_NORMAL_STD_FACTOR",
    "TRUNCATED_NORMAL_VARIANCE",
    "activation_second_moment",
    "bert_init_",
    "expected_initial_loss_tied",
    "fans",
    "he_normal_",
    "he_std",
    "lecun_normal_",
    "lecun_std",
    "tied_embedding_std",
    "trunc_normal_tf_",
    "truncated_normal_variance",
    "uniform_bound",
    "variance_scaling_",
    "xavier_normal_",
    "xavier_std",
]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def truncated_normal_variance(bound: float = 2.0) -> float:
    """Variance of a standard normal truncated to [−bound, bound]
    (docs/reference/algorithms.md#initialisation):

    γ = ∫x²φ / ∫φ over [−c, c] = 1 − 2c·φ(c) / erf(c/√2);  γ(2) = 0.7737413.
    """
    c = _check_positive("bound", bound)
    density = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    return 1.0 - 2.0 * c * density / math.erf(c / math.sqrt(2.0))


#: γ of docs/reference/algorithms.md#initialisation: a ±2σ truncated normal has variance γσ²
#: (0.7737413).
TRUNCATED_NORMAL_VARIANCE: float = truncated_normal_variance(2.0)
#: 1/√γ = 1.1368472: pass σ·1.1368472 to a ±2σ truncated normal to get std σ.
TRUNCATED_NORMAL_STD_FACTOR: float = 1.0 / math.sqrt(TRUNCATED_NORMAL_VARIANCE)


@torch.no_grad()
def trunc_normal_tf_(
    tensor: Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    bound: float = 2.0,
    *,
    correct_std: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill ``tensor`` in place with TensorFlow's truncated normal
    (docs/reference/algorithms.md#initialisation, #initialisation-edge-cases).

    Draws N(mean, s²) and keeps only values within ``mean ± bound·s``, where s = ``std``, or
    s = std/√γ(bound) with ``correct_std=True`` so that the *result* has standard deviation
    ``std`` (TF's ``variance_scaling`` does the same). Without the correction the result's std
    is std·√γ: 0.0175925 for BERT's std = 0.02.

    Sampled by inverting the normal CDF (no rejection loop, so no host synchronisation) in
    float32 (float64 for float64 tensors) and rounded once into the tensor's dtype; the result
    is clamped so that no value lies outside the bounds after rounding.
    """
    std = _check_positive("std", std)
    bound = _check_positive("bound", bound)
    if isinstance(mean, bool) or not isinstance(mean, int | float) or not math.isfinite(mean):
        raise ValueError(f"mean must be a finite number, got {mean!r}")
    if not tensor.is_floating_point():
        raise ValueError(f"tensor must have a floating-point dtype, got {tensor.dtype}")
    if tensor.is_meta or tensor.numel() == 0:
        return tensor
    scale = std / math.sqrt(truncated_normal_variance(bound)) if correct_std else std
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    # u uniform on (erf(-c/√2), erf(c/√2)) maps through √2·erfinv onto N(0, 1) cut at ±c.
    edge = math.erf(bound / math.sqrt(2.0))
    sample = torch.empty(tensor.shape, dtype=work_dtype, device=tensor.device)
    sample.uniform_(-edge, edge, generator=generator)
    sample.erfinv_().mul_(math.sqrt(2.0)).clamp_(-bound, bound)
    sample.mul_(scale).add_(mean)
    tensor.copy_(sample)
    low = _representable_inside(mean - bound * scale, tensor.dtype, toward=math.inf)
    high = _representable_inside(mean + bound * scale, tensor.dtype, toward=-math.inf)
    return tensor.clamp_(low, high)


def _representable_inside(value: float, dtype: torch.dtype, toward: float) -> float:
    """``value`` rounded to ``dtype``, stepped once toward ``toward`` if rounding crossed it."""
    rounded = torch.tensor(value, dtype=dtype)
    crossed = float(rounded) > value if toward < value else float(rounded) < value
    if crossed:
        rounded = torch.nextafter(rounded, torch.tensor(toward, dtype=dtype))
    return float(rounded)


def fans(tensor: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) in torch's layout: weight (out, in, *kernel) → (in·k, out·k)."""
    if tensor.dim() < 2:
        raise ValueError(
            "fan_in and fan_out need a tensor with at least 2 dims, "
            f"got shape {tuple(tensor.shape)}"
        )
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def lecun_std(fan_in: int) -> float:
    """LeCun: variance 1/fan_in (docs/reference/algorithms.md#initialisation); 1/√768 =
    0.0360844."""
    return 1.0 / math.sqrt(_check_count("fan_in", fan_in))


def he_std(fan_in: int) -> float:
    """He (Kaiming) for ReLU: variance 2/fan_in (docs/reference/algorithms.md#initialisation)."""
    return math.sqrt(2.0 / _check_count("fan_in", fan_in))


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Xavier (Glorot): variance 2/(fan_in + fan_out); 1/√n for an n×n matrix."""
    return math.sqrt(2.0 / (_check_count("fan_in", fan_in) + _check_count("fan_out", fan_out)))


def uniform_bound(std: float) -> float:
    """U[−a, a] has std σ when a = √3·σ (docs/reference/algorithms.md#initialisation)."""
    return math.sqrt(3.0) * _check_positive("std", std)


_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")


@torch.no_grad()
def variance_scaling_(
    tensor: Tensor,
    scale: float = 1.0,
    mode: str = "fan_in",
    distribution: str = "truncated_normal",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill ``tensor`` with zero-mean values of variance ``scale / n``
    (docs/reference/algorithms.md#initialisation), n the fan_in, fan_out or their average (see
    :func:`fans`).

    ``distribution`` is ``"truncated_normal"`` (±2 std, std corrected for the truncation, as in
    TF), ``"normal"`` or ``"uniform"`` (U[−√3σ, √3σ]). The variance is exact for all three.
    """
    scale = _check_positive("scale", scale)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
    if distribution not in _DISTRIBUTIONS:
        allowed = ", ".join(map(repr, _DISTRIBUTIONS))
        raise ValueError(f"distribution must be one of {allowed}, got {distribution!r}")
    fan_in, fan_out = fans(tensor)
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    if n == 0:
        return tensor
    std = math.sqrt(scale / n)
    if distribution == "truncated_normal":
        return trunc_normal_tf_(tensor, std=std, correct_std=True, generator=generator)
    if distribution == "normal":
        return tensor.normal_(0.0, std, generator=generator)
    bound = uniform_bound(std)
    return tensor.uniform_(-bound, bound, generator=generator)


def lecun_normal_(
    tensor: Tensor,
    distribution: str = "truncated_normal",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Variance 1/fan_in (LeCun; what the blog calls the standard initialisation)."""
    return variance_scaling_(tensor, 1.0, "fan_in", distribution, generator=generator)


def he_normal_(
    tensor: Tensor,
    distribution: str = "truncated_normal",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Variance 2/fan_in (He, for ReLU)."""
    return variance_scaling_(tensor, 2.0, "fan_in", distribution, generator=generator)


def xavier_normal_(
    tensor: Tensor,
    distribution: str = "truncated_normal",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Variance 2/(fan_in + fan_out) (Xavier/Glorot)."""
    return variance_scaling_(tensor, 1.0, "fan_avg", distribution, generator=generator)


@torch.no_grad()
def bert_init_(
    module: nn.Module,
    std: float = 0.02,
    *,
    correct_std: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise ``module`` (and its children) as BERT does
    (docs/reference/algorithms.md#initialisation); returns ``module``.

    * every parameter with ≥ 2 dims (linear and conv kernels, embeddings, position tables) gets
      :func:`trunc_normal_tf_` with ``std`` (effective std 0.0176 for 0.02; ``correct_std=True``
      makes it exactly ``std``); an ``nn.Embedding``'s ``padding_idx`` row is then zeroed, as
      torch's own initialisation does;
    * norm-layer gains (any module :func:`danlu.params.is_norm_layer` recognises) are set to 1;
    * biases are set to 0;
    * any other parameter (a 1-D parameter not called ``bias``, e.g. a learned temperature) is
      left as it is.

    Shared (tied) parameters are initialised once. Frozen parameters are initialised too.
    """
    std = _check_positive("std", std)
    done: set[int] = set()
    for child in module.modules():
        for name, p in child.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if is_norm_layer(child) and name == "weight":
                p.fill_(1.0)
            elif name == "bias":
                p.zero_()
            elif p.dim() >= 2:
                trunc_normal_tf_(p, std=std, correct_std=correct_std, generator=generator)
                padding_idx = getattr(child, "padding_idx", None)
                if isinstance(child, nn.Embedding) and padding_idx is not None and name == "weight":
                    p[padding_idx].zero_()
    return module


def tied_embedding_std(vocab_size: int, dim: int) -> float:
    """σ = ln(n)/d for an embedding shared with the output layer
    (docs/reference/algorithms.md#initialisation, kexue 9698).

    It makes the self-logit dσ = ln n, so the initial loss is ≈ log(2n − 1) instead of ≈ dσ.
    ln(50000)/768 = 0.0140883.
    """
    return math.log(_check_count("vocab_size", vocab_size, 2)) / _check_count("dim", dim)


def expected_initial_loss_tied(vocab_size: int, dim: int, std: float) -> float:
    """Initial cross-entropy of a model whose output layer reuses its input embedding
    (docs/reference/algorithms.md#initialisation, kexue 9698): ≈ log(e^{dσ} + n − 1).

    With a final norm the hidden state of a token is ≈ its own embedding e scaled to unit RMS,
    so its own logit is |e|²/σ ≈ dσ while the other n − 1 logits are ≈ 0; the next token is
    almost never the same one, so the loss is log(e^{dσ} + n − 1). For d = 768, σ = 1/√768,
    n = 50000 that is 27.71, against log n = 10.82 for an untied output layer.
    """
    n = _check_count("vocab_size", vocab_size, 2)
    d = _check_count("dim", dim)
    self_logit = d * _check_positive("std", std)
    others = math.log(n - 1)
    high, low = max(self_logit, others), min(self_logit, others)
    return high + math.log1p(math.exp(low - high))


def activation_second_moment(
    fn: Callable[[Tensor], Tensor], *, points: int = 20001, limit: float = 12.0
) -> float:
    """E[fn(x)²] for x ~ N(0, 1), by the trapezoid rule in float64 on [−limit, limit].

    Dividing an activation by the square root keeps unit second moment
    (docs/reference/algorithms.md#initialisation): ``activation_second_moment(torch.sigmoid)`` =
    0.2933790, hence ``sigmoid(x) / sqrt(0.2933790)``. The Gaussian tails beyond ±12 are below
    1e-30.
    """
    _check_count("points", points, 3)
    limit = _check_positive("limit", limit)
    x = torch.linspace(-limit, limit, points, dtype=torch.float64)
    density = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    values = fn(x).to(torch.float64)
    return float(torch.trapezoid(values * values * density, x))


#: E[sigmoid(x)²] for x ~ N(0, 1) (docs/reference/algorithms.md#initialisation: 0.2933790; more
#: digits by adaptive quadrature).
SIGMOID_SECOND_MOMENT: float = 0.293379035858093

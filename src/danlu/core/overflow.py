"""Second-moment statistics and momenta that stay finite for every finite gradient.

The square of a float32 gradient beyond about 1.8e19 is not representable: g² overflows to
inf, the statistic (v, v̂, AdaFactor's row and column means, Amos's mean square) stays inf,
and the next update is inf/inf = NaN. A gradient that large is finite, so a non-finite check
cannot catch it. The optimizers with second moments therefore read each gradient saturated at
a bound (:func:`square_bound`) below which every square, and every sum of squares that goes
into a mean, stays finite with room to spare (half the dtype's largest value). Gradients
within the bound, i.e. every gradient that training can meaningfully produce, are read
unchanged, bit for bit; a larger one acts as a gradient of the bound's size with its sign, so
the first moment and the second moment see the same number and their ratio keeps its
designed range (e.g. Adam's first step is exactly lr·sign(g)).

:func:`average_bound` is the same idea for a first moment alone (Lion's and Tiger's momentum
m ← β·m + (1−β)·g, which torch.lerp computes as m + (1−β)·(g − m)): g − m overflows when m
and g are huge with opposite signs (+max then −max), the momentum becomes ±inf and the next
step inf − inf = NaN. With |g| ≤ half the largest value of the momentum's dtype, |m| stays
within that half too (an average of such values), |g − m| within the whole range, and a
low-precision momentum (fp16, bf16) never overflows when it is stored.

:func:`finite_norm` is the 2-norm for quantities that are formed from the statistics and can
legitimately exceed √max (AdaFactor's unit update in a row next to a huge one): the plain
norm, recomputed with a max-abs scale where the sum of squares overflowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "average_bound",
    "average_bounds",
    "finite_norm",
    "finite_norms",
    "finite_sum_of_squares",
    "saturate",
    "saturate_all",
    "square_bound",
]


def square_bound(dtype: torch.dtype, count: int = 1, weight: float = 1.0) -> float:
    """The largest |g| for which ``count`` values ``weight``·g² sum to at most half of
    ``dtype``'s largest finite value (and g² itself stays below half of float32's, the
    precision that fp16 and bf16 math runs in), and never beyond ``dtype``'s largest value (a
    tiny ``weight`` such as 1 − β₂ = 1e-16 would allow more: a clamp bound that ``dtype``
    cannot hold is an error in torch)."""
    finfo_max = torch.finfo(dtype).max
    opmath_max = torch.finfo(torch.promote_types(dtype, torch.float32)).max
    bound = math.sqrt(finfo_max / (2.0 * max(count, 1) * max(weight, 1e-300)))
    return min(bound, math.sqrt(opmath_max / 2.0), finfo_max)


def _fit(bound: float, dtype: torch.dtype) -> float:
    """``bound``, or ``dtype``'s largest value if that is smaller (torch refuses a clamp bound
    that the tensor's dtype cannot hold)."""
    return min(bound, torch.finfo(dtype).max)


def average_bound(state_dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> float:
    """The largest |g| for which a moving average β·m + (1−β)·g (any form, torch.lerp's
    included) of such values stays finite: half the largest value of the momentum's dtype
    ``state_dtype``, or of the math's precision (``param_dtype`` promoted to fp32 at least)
    where that is smaller."""
    compute = torch.promote_types(param_dtype or state_dtype, torch.float32)
    return min(torch.finfo(state_dtype).max, torch.finfo(compute).max) / 2.0


def average_bounds(params: Sequence[Tensor], states: Sequence[Tensor]) -> float | list[float]:
    """:func:`average_bound` of each (parameter, momentum) pair: one number when they agree
    (the usual case: one dtype per group), else one per tensor (for :func:`saturate_all`)."""
    bounds = [average_bound(s.dtype, p.dtype) for p, s in zip(params, states, strict=True)]
    return bounds[0] if bounds and all(b == bounds[0] for b in bounds) else bounds


def saturate(grad: Tensor, bound: float, *, owned: bool = False) -> Tensor:
    """``grad`` clamped to ±``bound`` (in place when ``owned``: a copy the caller made).
    NaN is kept; ±inf becomes ±bound (at most ±the largest value of ``grad``'s dtype)."""
    bound = _fit(bound, grad.dtype)
    return grad.clamp_(-bound, bound) if owned else grad.clamp(-bound, bound)


def saturate_all(
    grads: Sequence[Tensor], bounds: float | Sequence[float], *, owned: bool = False
) -> list[Tensor]:
    """:func:`saturate` for a list, one bound for all or one per tensor: new tensors, or the
    tensors themselves clamped in place when ``owned`` (copies the caller made)."""
    if isinstance(bounds, int | float):
        if any(_fit(bounds, g.dtype) < bounds for g in grads):
            return [saturate(g, bounds, owned=owned) for g in grads]
        if owned:
            clamped = list(grads)
            torch._foreach_clamp_min_(clamped, -bounds)
        else:
            clamped = list(torch._foreach_clamp_min(list(grads), -bounds))
        torch._foreach_clamp_max_(clamped, bounds)
        return clamped
    return [saturate(g, b, owned=owned) for g, b in zip(grads, bounds, strict=True)]


def _scaled_norm(x: Tensor) -> Tensor:
    """‖x‖ as s·‖x/s‖ with s = max|x|: no overflow in the sum of squares."""
    scale = torch.linalg.vector_norm(x, float("inf"))
    if torch.compiler.is_compiling():
        # the same value without reading the scale to the host: s = 1 where it is 0 or not
        # finite (then ‖x‖ is 0, inf or NaN either way)
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, 1.0)
        return torch.linalg.vector_norm(x / scale).mul_(scale)
    if not bool(scale > 0) or not bool(torch.isfinite(scale)):
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x / scale).mul_(scale)


def finite_norm(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.linalg.vector_norm(x, dtype=dtype)``, except that a norm that overflowed
    while ``x`` is finite is recomputed with a scale (it is inf only when the norm itself
    exceeds the dtype's range). The check reads one flag on the host; inside
    ``torch.compile`` nothing is read back (see :func:`_compiled_finite_norm`)."""
    if torch.compiler.is_compiling():
        return _compiled_finite_norm(x, dtype)
    norm = torch.linalg.vector_norm(x, dtype=dtype)
    if bool(torch.isfinite(norm)):
        return norm
    return _scaled_norm(x if dtype is None else x.to(dtype)).to(norm.dtype)


def _compiled_finite_norm(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """:func:`finite_norm` inside ``torch.compile``, without a host read: the sum of squares of
    a float32 (or narrower) tensor accumulated in float64, where it cannot overflow (one
    reduction, the result rounded to the norm's dtype); a float64 tensor gets the scaled norm
    where the plain one overflowed, selected on the device."""
    compute = dtype if dtype is not None else x.dtype
    out = compute if compute.is_floating_point else torch.float32
    if compute != torch.float64:
        return torch.linalg.vector_norm(x, dtype=torch.float64).to(out)
    norm = torch.linalg.vector_norm(x, dtype=dtype)
    return torch.where(torch.isfinite(norm), norm, _scaled_norm(x.to(compute)).to(norm.dtype))


def finite_norms(xs: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """``torch._foreach_norm(xs, 2, dtype=dtype)`` with :func:`finite_norm`'s repair; one host
    read for the whole list (none inside ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return [_compiled_finite_norm(x, dtype) for x in xs]
    norms = list(torch._foreach_norm(list(xs), 2, dtype=dtype))
    if not norms or bool(torch.isfinite(torch.stack(norms)).all()):
        return norms
    for i, (x, norm) in enumerate(zip(xs, norms, strict=True)):
        if not bool(torch.isfinite(norm)):
            norms[i] = _scaled_norm(x if dtype is None else x.to(dtype)).to(norm.dtype)
    return norms


def finite_sum_of_squares(x: Tensor) -> Tensor:
    """Σx² as a float64 0-d tensor: the sum in ``x``'s dtype when it is finite (the same bits
    as before, widened), otherwise ‖x‖² from :func:`finite_norm` in float64."""
    total = x.square().sum()
    if torch.compiler.is_compiling():
        repaired = finite_norm(x).to(torch.float64).square()
        return torch.where(torch.isfinite(total), total.to(torch.float64), repaired)
    if bool(torch.isfinite(total)):
        return total.to(torch.float64)
    return finite_norm(x).to(torch.float64).square()

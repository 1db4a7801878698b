"""Low-precision parameters and state: fp32 math, stochastic rounding to bf16.

``state_dtype`` (e.g. bf16 momentum for fp32 parameters, halving Lion's and Tiger's state) and
``stochastic_rounding`` (bf16 parameters whose tiny updates would otherwise round away,
pytorch#120376) both run the optimizer's math in fp32 on upcast copies and write the results
back: the state with round-to-nearest, bf16 parameters with stochastic rounding when asked.
The Triton kernels of Lion and Tiger do the same in one pass
(``danlu.algorithms.<name>.triton``); this module is the path everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "check_stochastic_rounding",
    "needs_upcast",
    "needs_upcast_copies",
    "rounds_stochastically",
    "saturating_cast",
    "stochastic_round_",
    "stochastically_rounded_params",
    "store_state_",
    "upcast_step",
]


#: Parameter dtypes that stochastic rounding applies to.
LOW_PRECISION = (torch.bfloat16, torch.float16)

_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_TINY = float(torch.finfo(torch.float16).tiny)  # 2^-14, the smallest normal number
_FP16_SUBNORMAL_SPACING = 2.0**-24


def rounds_stochastically(stochastic_rounding: bool | None, dtype: torch.dtype) -> bool:
    """Whether a parameter of ``dtype`` is written with stochastic rounding: ``None`` (the
    optimizers' default) and ``True`` mean yes for bf16 and fp16, ``False`` means never;
    fp32 and fp64 parameters are never rounded stochastically."""
    return stochastic_rounding is not False and dtype in LOW_PRECISION


def check_stochastic_rounding(value: Any, *, where: str = "") -> None:
    """The optimizers' ``stochastic_rounding`` is None, True or False."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where}stochastic_rounding must be None, True or False, got {value!r}")


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write fp32 ``src`` into bf16 or fp16 ``dst`` with stochastic rounding: round the
    magnitude up with probability equal to the discarded fraction of the spacing, so that
    E[dst] = src. The noise is drawn from ``generator`` (default: torch's global generator of
    ``src``'s device, so ``torch.manual_seed`` makes it reproducible). Inf and NaN are kept;
    for fp16, finite values beyond its range saturate at ±65504 (as ``saturating_cast``) and
    values in the subnormal range are rounded on the subnormal grid (spacing 2^-24)."""
    if dst.dtype not in LOW_PRECISION or src.dtype != torch.float32:
        raise ValueError("stochastic_round_ writes fp32 values into a bf16 or fp16 tensor")
    if dst.dtype == torch.float16:
        dst.copy_(_stochastic_round_fp16(src, generator).view_as(dst))
        return dst
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=src.device, generator=generator
    )
    # bf16 is the top half of fp32: adding uniform noise to the discarded half and truncating
    # rounds the magnitude up with the right probability (the sign bit is untouched)
    rounded = (bits + noise).bitwise_and_(-65536)
    finite = torch.isfinite(src)
    dst.copy_(torch.where(finite, rounded.view(torch.float32), src).view_as(dst))
    return dst


def _stochastic_round_fp16(src: Tensor, generator: torch.Generator | None) -> Tensor:
    """fp32 values on fp16's grid (stochastically rounded), as an fp16 tensor."""
    src = src.contiguous()
    noise = torch.randint(
        0, 1 << 24, src.shape, dtype=torch.int32, device=src.device, generator=generator
    )
    # normal range: fp16 keeps 10 of fp32's 23 mantissa bits; noise in the 13 discarded bits
    # and truncation rounds the magnitude up with the right probability (sign untouched)
    normal = (src.view(torch.int32) + noise.bitwise_and(0x1FFF)).bitwise_and_(~0x1FFF)
    rounded = normal.view(torch.float32)
    # subnormal range: a fixed spacing of 2^-24; |x|·2^24 = n + f exactly, up with chance f
    scaled = src.abs() * (1.0 / _FP16_SUBNORMAL_SPACING)
    whole = scaled.floor()
    up = noise.to(torch.float32) < (scaled - whole) * float(1 << 24)
    subnormal = (whole + up).mul_(_FP16_SUBNORMAL_SPACING).copysign_(src)
    rounded = torch.where(src.abs() < _FP16_TINY, subnormal, rounded)
    # a finite value never becomes ±inf: saturate at ±65504 (the largest finite fp16)
    rounded = rounded.clamp_(-_FP16_MAX, _FP16_MAX)
    return torch.where(torch.isfinite(src), rounded, src).to(torch.float16)


def saturating_cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, except that finite values beyond fp16's range saturate at ±65504
    instead of overflowing to ±inf (which a later opposite value turns into NaN in a moving
    average); ±inf and NaN from the math itself are kept."""
    if dtype != torch.float16 or tensor.dtype == torch.float16:
        return tensor.to(dtype)
    limit = torch.finfo(torch.float16).max
    return torch.where(torch.isfinite(tensor), tensor.clamp(-limit, limit), tensor).to(dtype)


def needs_upcast_copies(
    path: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    stochastic_rounding: bool | None,
) -> bool:
    """Whether a step on ``path`` must run on whole-tensor upcast copies (``upcast_step``):
    :func:`needs_upcast`, except where the chunked CPU loop upcasts a low-precision state
    slice by slice itself (fp32/fp64 parameters with gradients of the same dtype)."""
    if not needs_upcast(params, states, stochastic_rounding):
        return False
    return path != "chunked" or not all(
        p.dtype in (torch.float32, torch.float64) and g.dtype == p.dtype
        for p, g in zip(params, grads, strict=True)
    )


def store_state_(dst: Tensor, src: Tensor) -> None:
    """Write upcast state back into its own dtype (fp16 saturating, see saturating_cast)."""
    dst.copy_(saturating_cast(src, dst.dtype) if dst.dtype == torch.float16 else src)


def needs_upcast(
    params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], stochastic_rounding: bool | None
) -> bool:
    """Whether a state dtype differs from its parameter, or bf16/fp16 parameters are to be
    stochastically rounded (see :func:`rounds_stochastically`)."""
    if any(rounds_stochastically(stochastic_rounding, p.dtype) for p in params):
        return True
    return any(s.dtype != p.dtype for state in states for p, s in zip(params, state, strict=True))


def upcast_step(
    fn: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    *,
    stochastic_rounding: bool | None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> None:
    """Run ``fn(params, grads, *states, **kwargs)`` one tensor at a time in (at least) fp32 and
    write the results back in each tensor's own dtype: states rounded to nearest, bf16/fp16
    parameters stochastically where :func:`rounds_stochastically` says so."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        compute = torch.promote_types(p.dtype, torch.float32)
        p_hi = p.to(compute)
        state_hi = [state[i].to(compute) for state in states]
        fn([p_hi], [g.to(compute)], *[[s] for s in state_hi], **kwargs)
        for state, s_hi in zip(states, state_hi, strict=True):
            store_state_(state[i], s_hi)
        if p_hi is p:
            continue
        if rounds_stochastically(stochastic_rounding, p.dtype):
            stochastic_round_(p, p_hi, generator)
        else:
            p.copy_(p_hi)


#: Elements of fp32 parameter copies that :func:`stochastically_rounded_params` holds at once.
ROUNDING_BUCKET = 1 << 26


def stochastically_rounded_params(
    call: Callable[[list[int], list[Tensor]], None],
    params: Sequence[Tensor],
    stochastic_rounding: bool | None,
    *,
    bucket: int = ROUNDING_BUCKET,
) -> None:
    """Run one step as ``call(indices, work_params)`` so that only the parameter write changes:
    parameters that :func:`rounds_stochastically` selects are replaced by fp32 copies (in
    buckets of one dtype and at most ``bucket`` elements), which ``call`` updates with its usual
    math (states, gradients and their dtypes untouched); the copies are then written back with
    :func:`stochastic_round_`. Every other parameter is passed as it is, in one call.

    Plain tensors draw the noise from torch's global generator of their device. DTensor
    (FSDP2) parameters draw it from a generator seeded by one draw of torch's CPU generator per
    tensor, so that ranks seeded alike keep their streams in step whatever their local shapes
    (replicated slices round alike)."""
    from danlu.core.dtensor import is_dtensor, local

    chosen: dict[torch.dtype, list[int]] = {}
    plain = []
    for i, p in enumerate(params):
        if rounds_stochastically(stochastic_rounding, p.dtype):
            chosen.setdefault(p.dtype, []).append(i)
        else:
            plain.append(i)
    if plain:
        call(plain, [params[i] for i in plain])
    for indices in chosen.values():
        start = 0
        while start < len(indices):
            stop, size = start + 1, params[indices[start]].numel()
            while stop < len(indices) and size + params[indices[stop]].numel() <= bucket:
                size += params[indices[stop]].numel()
                stop += 1
            batch = indices[start:stop]
            work = [params[i].to(torch.float32) for i in batch]
            call(batch, work)
            for i, w in zip(batch, work, strict=True):
                generator = None
                if is_dtensor(params[i]):
                    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
                    generator = torch.Generator(device=local(w).device).manual_seed(seed)
                stochastic_round_(local(params[i]), local(w), generator)
            start = stop

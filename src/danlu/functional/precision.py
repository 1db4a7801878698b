"""Low-precision parameters and state: fp32 math, stochastic rounding to bf16.

``state_dtype`` (e.g. bf16 momentum for fp32 parameters, halving Lion's and Tiger's state) and
``stochastic_rounding`` (bf16 parameters whose tiny updates would otherwise round away,
pytorch#120376) both run the optimizer's math in fp32 on upcast copies and write the results
back: the state with round-to-nearest, bf16 parameters with stochastic rounding when asked.
The Triton kernels of Lion and Tiger do the same in one pass (``danlu.kernels``); this module
is the path everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "needs_upcast",
    "needs_upcast_copies",
    "saturating_cast",
    "stochastic_round_",
    "store_state_",
    "upcast_step",
]


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write fp32 ``src`` into bf16 ``dst`` with stochastic rounding: round up with probability
    equal to the discarded fraction, so that E[dst] = src. Inf and NaN are kept."""
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        raise ValueError("stochastic_round_ writes fp32 values into a bf16 tensor")
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
    stochastic_rounding: bool,
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
    params: Sequence[Tensor], states: Sequence[Sequence[Tensor]], stochastic_rounding: bool
) -> bool:
    """Whether a state dtype differs from its parameter, or bf16 parameters are to be
    stochastically rounded."""
    if stochastic_rounding and any(p.dtype == torch.bfloat16 for p in params):
        return True
    return any(s.dtype != p.dtype for state in states for p, s in zip(params, state, strict=True))


def upcast_step(
    fn: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    *,
    stochastic_rounding: bool,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> None:
    """Run ``fn(params, grads, *states, **kwargs)`` one tensor at a time in (at least) fp32 and
    write the results back in each tensor's own dtype."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        compute = torch.promote_types(p.dtype, torch.float32)
        p_hi = p.to(compute)
        state_hi = [state[i].to(compute) for state in states]
        fn([p_hi], [g.to(compute)], *[[s] for s in state_hi], **kwargs)
        for state, s_hi in zip(states, state_hi, strict=True):
            store_state_(state[i], s_hi)
        if p_hi is p:
            continue
        if stochastic_rounding and p.dtype == torch.bfloat16:
            stochastic_round_(p, p_hi, generator)
        else:
            p.copy_(p_hi)

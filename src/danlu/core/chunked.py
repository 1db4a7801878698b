"""The CPU for-loop path: the single-tensor math applied to cache-sized slices.

Each tensor is processed in slices of ``CHUNK`` elements with reusable scratch buffers, so
every byte of p, g and m comes from memory once and stays in cache for the few elementwise
ops of the update; no parameter-sized temporary is allocated. The ops are those of
``functional/<name>._single_tensor_<name>``, elementwise and in the same order, so the
results are bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from danlu.core.precision import upcast_step

#: Elements per slice: a few tensors × 1 MiB (fp32) sit in the L2/L3 caches of common CPUs.
CHUNK = 1 << 18

_scratch: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}


def scratch_buffer(like: Tensor, size: int, slot: int = 0) -> Tensor:
    """A reusable 1-D buffer of at least ``size`` elements (one per device, dtype and slot)."""
    key = (like.device, like.dtype, slot)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=like.dtype, device=like.device)
        _scratch[key] = buf
    return buf[:size]


def slices(t: Tensor, size: int) -> list[Tensor]:
    flat = t.view(-1)
    return [flat[i : i + size] for i in range(0, flat.numel(), size)]


def all_contiguous(*tensors: Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


def small_tensor(
    fn: Callable[..., None], param: Tensor, grad: Tensor, *states: Tensor, **kwargs: Any
):
    """One tensor through the single-tensor math (upcast when a state has another dtype)."""
    if any(state.dtype != param.dtype for state in states):
        upcast_step(
            fn, [param], [grad], [[state] for state in states], stochastic_rounding=False, **kwargs
        )
    else:
        fn([param], [grad], *[[state] for state in states], **kwargs)


def saturated(g: Tensor, bound: float, maximize: bool, out: Tensor) -> Tensor:
    """A gradient slice negated (``maximize``) and clamped to ±``bound`` into ``out``: the
    single-tensor loops' ``saturate(-grad)``, elementwise the same ops."""
    if maximize:
        return torch.neg(g, out=out).clamp_(-bound, bound)
    return torch.clamp(g, -bound, bound, out=out)

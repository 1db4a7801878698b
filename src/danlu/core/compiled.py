"""The fused path without Triton: the foreach math of ``danlu.functional`` compiled by
``torch.compile`` into one loop nest per param group (C++/OpenMP on CPU).

Shapes are static, so each distinct list of shapes compiles once (the first step of a
parameter set takes seconds; Inductor caches the result on disk for later processes). The lr
is passed as a 0-d tensor so that an LR scheduler does not trigger recompilation
(pytorch#133898). Compiled functions are built once per algorithm, never per step (ao#2500).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}

#: Each param group (a distinct list of shapes) is one cache entry of the compiled function.
_RECOMPILE_LIMIT = 256


def compiled_once(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        _compiled[fn] = compiled
    return compiled


@contextlib.contextmanager
def recompile_limit() -> Iterator[None]:
    config = torch._dynamo.config
    with config.patch(cache_size_limit=max(config.cache_size_limit, _RECOMPILE_LIMIT)):
        yield


def lr_tensor(lr: float | Tensor, like: Tensor) -> Tensor:
    """lr as a 0-d tensor in the parameter's precision (at least fp32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(lr, Tensor):
        return lr.to(device=like.device, dtype=dtype)
    return torch.full((), lr, dtype=dtype, device=like.device)  # a fill: no host-device copy


def no_zero_dim(tensors: list[Tensor]) -> list[Tensor]:
    """0-d tensors as 1-element views: Inductor (torch 2.13, CPU) loses in-place updates of
    0-d float64 inputs in the single-tensor code."""
    return [t.view(1) if t.dim() == 0 else t for t in tensors]

"""Helpers shared by the functional cores: foreach choice and device/dtype grouping."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "foreach_lerp_",
    "group_by_device_and_dtype",
    "resolve_foreach",
    "scalar_like",
    "statistics_dtype",
    "step_tensor",
]


def resolve_foreach(foreach: bool | None, tensors: Sequence[Tensor]) -> bool:
    """``foreach=None`` picks the way torch.optim does: foreach when every tensor is a plain
    tensor on a device with foreach kernels (CUDA and friends), the for-loop otherwise."""
    if foreach is not None:
        return foreach
    if torch.jit.is_scripting() or not tensors:
        return False
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # pragma: no cover - torch moved the helper
        return all(t.device.type == "cuda" for t in tensors)
    _, use_foreach = _default_to_fused_or_foreach(list(tensors), differentiable=False)
    return bool(use_foreach)


def group_by_device_and_dtype(
    tensor_lists: Sequence[Sequence[Any]],
) -> Iterator[tuple[list[list[Any]], list[int]]]:
    """Split parallel tensor lists by the (device, dtype) of the first list.

    Yields ``(lists, indices)`` where ``lists[j]`` holds the members of ``tensor_lists[j]``
    whose position is in ``indices``; foreach kernels need one device and dtype per call.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensor_lists[0]):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for indices in buckets.values():
        yield [[lst[i] for i in indices] for lst in tensor_lists], indices


def triton_available() -> bool:
    """Whether the Triton kernels can run (CUDA and an importable triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_path(foreach: bool | None, fused: bool | None, tensors: Sequence[Tensor]) -> str:
    """Which implementation runs: "triton", "compiled", "foreach", "chunked" or "single".

    * ``fused=True``: Triton kernels on CUDA when triton imports, otherwise the foreach math
      compiled by ``torch.compile`` (the CPU fast path; the first call compiles).
    * ``fused=None`` (default): Triton on CUDA when available; else ``foreach`` as torch.optim
      would choose it; else, on CPU, the chunked for-loop (the single-tensor math applied to
      cache-sized slices: bit-identical, no parameter-sized temporaries).
    * ``fused=False``: never a fused kernel.
    * inside ``torch.compile`` (Inductor generates the kernels): "foreach" where ``foreach``
      or ``fused`` is True or torch.optim would choose foreach, else "single".
    """
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True")
    if torch.compiler.is_compiling():
        # inside a torch.compile'd step Inductor fuses the math itself: the hand-written
        # kernels and the chunked loop (scratch buffers, slices) are not traced. The foreach
        # math where torch.optim would use it (or where asked for, fused=True included), else
        # the for-loop (on CPU: fewer, larger kernels)
        if foreach or (foreach is None and (fused or resolve_foreach(None, tensors))):
            return "foreach"
        return "single"
    on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
    if fused:
        return "triton" if on_cuda and triton_available() else "compiled"
    if fused is None and foreach is None and on_cuda and triton_available():
        return "triton"
    if resolve_foreach(foreach, tensors):
        return "foreach"
    if tensors and all(t.device.type == "cpu" for t in tensors):
        return "chunked"
    return "single"


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of second-moment statistics: float32, or float64 for float64 params (bf16 and
    fp16 are too coarse or too narrow for them)."""
    return torch.promote_types(dtype, torch.float32)


def scalar_like(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A scalar argument for an op on ``like``: a number as it is, a 0-d tensor (a value
    derived from a step counter inside ``torch.compile``) in ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return value


def foreach_lerp_(targets: list[Tensor], ends: list[Tensor], weight: float | Tensor) -> None:
    """``torch._foreach_lerp_`` with one weight for all: a number, or a 0-d tensor (in the
    targets' dtype and device)."""
    if isinstance(weight, Tensor):
        w = weight.to(device=targets[0].device, dtype=targets[0].dtype)
        torch._foreach_lerp_(targets, ends, [w] * len(targets))
    else:
        torch._foreach_lerp_(targets, ends, weight)


def step_tensor(counter: Tensor) -> Tensor:
    """The 1-based step a 0-based counter stands for, as a float64 0-d tensor: how the
    optimizers pass the step to the functional cores inside ``torch.compile``, where a Python
    number that changes on every step would recompile the graph."""
    return counter.detach().to(torch.float64) + 1

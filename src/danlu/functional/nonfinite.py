"""Non-finite gradient detection and Tiger's "shrink" fallback, SPEC.md §2(a) and §2(c).

Detection uses ``isfinite`` semantics (NaN and ±Inf), not the reference code's ``isnan``:
an Inf gradient that slips through turns the momentum into ±inf and later into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from danlu.functional._utils import group_by_device_and_dtype

__all__ = ["finite_flags", "shrink_"]


def finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """For each tensor, whether every entry is finite.

    One reduction per tensor (the max-abs norm, which is NaN or Inf exactly when an entry is,
    and cannot overflow) and a single host read for all of them.
    """
    flags = [True] * len(tensors)
    nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
    if not nonempty:
        return flags
    picked = [tensors[i] for i in nonempty]
    per_device: list[Tensor] = []
    order: list[int] = []
    for (group,), indices in group_by_device_and_dtype([picked]):
        norms = torch._foreach_norm(group, float("inf"))
        per_device.append(torch.isfinite(torch.stack(norms)).cpu())
        order.extend(nonempty[i] for i in indices)
    for i, ok in zip(order, torch.cat(per_device).tolist(), strict=True):
        flags[i] = bool(ok)
    return flags


def shrink_(params: Sequence[Tensor], *, center: float, ratio: float) -> None:
    """θ ← (θ − c)·s + c: pull each parameter toward its init centre c by the factor s."""
    for p in params:
        if center == 0:
            p.mul_(ratio)
        else:
            p.sub_(center).mul_(ratio).add_(center)

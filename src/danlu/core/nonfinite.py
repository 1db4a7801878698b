"""Non-finite gradient detection and Tiger's "shrink" fallback,
docs/reference/algorithms.md#tiger-rule and #tiger-edge-cases.

Detection uses ``isfinite`` semantics (NaN and ±Inf), not the reference code's ``isnan``:
an Inf gradient that slips through turns the momentum into ±inf and later into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from danlu.core.dtensor import agree, any_dtensor, local
from danlu.core.tensors import group_by_device_and_dtype

__all__ = ["finite_flags", "finite_mask", "shrink_"]


def finite_mask(tensors: Sequence[Tensor]) -> Tensor:
    """A bool tensor with one entry per tensor: whether all its entries are finite.

    One reduction per tensor (the max-abs norm, NaN or Inf exactly when an entry is, and it
    cannot overflow; on CPU a sum, see ``_finite_on_cpu``, except inside ``torch.compile``),
    computed on the tensors' device without synchronising with the host. Empty tensors count
    as finite. The result lives on the first tensor's device.

    A DTensor (FSDP2) is finite when every rank's slice is: its flag is agreed over the ranks
    that hold it (``danlu.distributed.agree``), so they all take the same action.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    if any_dtensor(tensors):
        return agree(finite_mask([local(t) for t in tensors]), tensors, op="min")
    device = tensors[0].device
    mask = torch.ones(len(tensors), dtype=torch.bool, device=device)
    nonempty = [i for i, t in enumerate(tensors) if t.numel() > 0]
    picked = [tensors[i] for i in nonempty]
    for (group,), indices in group_by_device_and_dtype([picked]) if picked else ():
        if group[0].device.type == "cpu" and not torch.compiler.is_compiling():
            finite = _finite_on_cpu(group)
        else:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf"))))
        # a non-blocking copy: torch.tensor(..., device=cuda) would wait for the stream
        where = torch.tensor([nonempty[i] for i in indices]).to(device, non_blocking=True)
        mask.index_copy_(0, where, finite.to(device))
    return mask


def _finite_on_cpu(tensors: list[Tensor]) -> Tensor:
    """On CPU the max-abs norm is not vectorised (10× slower than a sum). A sum is NaN or ±Inf
    when an entry is, and may overflow only for huge finite entries: the tensors whose sum is
    not finite are checked exactly, by their minimum and maximum (host reads cost nothing
    here)."""
    accumulate = torch.promote_types(tensors[0].dtype, torch.float32)
    finite = torch.isfinite(torch.stack([t.sum(dtype=accumulate) for t in tensors]))
    if not bool(finite.all()):
        for i in (~finite).nonzero().flatten().tolist():
            finite[i] = torch.isfinite(torch.stack(torch.aminmax(tensors[i].reshape(-1)))).all()
    return finite


def finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """:func:`finite_mask` read back to the host."""
    return [bool(x) for x in finite_mask(tensors).tolist()]


def shrink_(params: Sequence[Tensor], *, center: float, ratio: float) -> None:
    """θ ← (θ − c)·s + c: pull each parameter toward its init centre c by the factor s."""
    for p in params:
        p = local(p)
        if center == 0:
            p.mul_(ratio)
        else:
            p.sub_(center).mul_(ratio).add_(center)

"""danlu under ``torch.distributed``: FSDP2/DTensor parameters, decisions agreed across ranks,
gradient-sync switching for accumulation, and distributed checkpoints (docs/distributed.md).

Everything here goes through ``torch.distributed`` and ``torch.distributed.tensor``; nothing is
imported from them until a tensor or a process group asks for it, so plain single-process use
pays nothing.

**Sharded parameters.** Under FSDP2 (``torch.distributed.fsdp.fully_shard``) or tensor
parallelism, parameters, gradients and optimizer state are ``DTensor``\\s: each rank holds a
slice (``to_local()``) of a global tensor. Elementwise math runs on the local slices as it is.
Statistics over a whole tensor or a whole axis (Tiger's RMS and row RMS, AdaFactor's row and
column means, update clipping and parameter scale, Amos's reduced slots) are summed on the
local slice and all-reduced over the mesh dimensions that shard the reduced axes
(:func:`sharded_sum`), so they equal the unsharded statistic. State tensors are DTensors placed
like their parameter (:func:`new_state`): an axis the parameter shards is sharded the same way
in the state when the state keeps its full size, and replicated when the state reduces it to 1.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# DTensor plumbing


def _dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` was imported (no tensor can be one before)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 or TP parameter)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor (None entries are ignored)."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: Tensor) -> Tensor:
    """The rank's local slice of a DTensor (sharing its storage); any other tensor as is."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor); others as is."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _shard_dims(like: Any, axes: Sequence[int] | None) -> list[int]:
    """Mesh dimensions of DTensor ``like`` that shard one of ``axes`` (every axis when None)."""
    from torch.distributed.tensor import Replicate, Shard

    ndim = like.dim()
    wanted = None if axes is None else {a % ndim for a in axes} if ndim else set()
    out = []
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            if wanted is None or placement.dim % max(ndim, 1) in wanted:
                out.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"danlu: a parameter placed as {placement} (mesh dimension {mesh_dim}) is not "
                "supported; parameters must be sharded (Shard) or replicated (Replicate)"
            )
    return out


def check_placements(param: Tensor, label: str = "parameter") -> None:
    """Raise ValueError unless DTensor ``param`` is sharded or replicated on every mesh
    dimension (a ``Partial`` parameter has no values of its own to update)."""
    try:
        _shard_dims(param, None)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None


def _groups(like: Any, axes: Sequence[int] | None) -> list[Any]:
    """The process groups of the mesh dimensions that shard ``axes`` of DTensor ``like`` (the
    same group objects for every tensor on those ranks, whichever mesh object holds them)."""
    mesh = like.device_mesh
    return [mesh.get_group(mesh_dim) for mesh_dim in _shard_dims(like, axes)]


def _all_reduce_(x: Tensor, like: Any, axes: Sequence[int] | None, op: Any) -> Tensor:
    import torch.distributed as dist

    for group in _groups(like, axes):
        dist.all_reduce(x, op=op, group=group)
    return x


Axes = int | Sequence[int] | None


def _axes_list(dim: Axes) -> list[int] | None:
    return None if dim is None else [dim] if isinstance(dim, int) else list(dim)


def reduce_partial_sums(
    partials: Sequence[Tensor], likes: Sequence[Tensor], dims: Sequence[Axes]
) -> list[Tensor]:
    """Complete local sums: ``partials[i]`` is the sum over ``dims[i]`` (kept dims; None: all
    axes, 0-d) of the local slice of ``likes[i]``; each is all-reduced over the mesh dimensions
    that shard those axes, with one collective per group of tensors sharded alike (their
    partial sums concatenated) instead of one per tensor. Plain ``likes`` need nothing."""
    import torch.distributed as dist

    totals = list(partials)
    buckets: dict[tuple[Any, ...], tuple[list[Any], list[int]]] = {}
    for i, (total, like, dim) in enumerate(zip(totals, likes, dims, strict=True)):
        if not is_dtensor(like):
            continue
        groups = _groups(like, _axes_list(dim))
        if groups:
            key = (tuple(id(g) for g in groups), total.dtype, total.device)
            buckets.setdefault(key, (groups, []))[1].append(i)
    for groups, indices in buckets.values():
        flat = torch.cat([totals[i].reshape(-1) for i in indices])
        for group in groups:
            dist.all_reduce(flat, group=group)
        pieces = flat.split([totals[i].numel() for i in indices])
        for i, piece in zip(indices, pieces, strict=True):
            totals[i] = piece.view_as(totals[i])
    return totals


def sharded_sums(
    xs: Sequence[Tensor], likes: Sequence[Tensor], dims: Sequence[Axes]
) -> list[Tensor]:
    """:func:`sharded_sum` of several tensors, with one all-reduce per group of tensors
    sharded alike (see :func:`reduce_partial_sums`)."""
    partials = []
    for x, dim in zip(xs, dims, strict=True):
        axes = _axes_list(dim)
        if axes is not None and not axes:
            raise ValueError("dim must name at least one axis (or be None for all of them)")
        partials.append(x.sum() if axes is None else x.sum(dim=axes, keepdim=True))
    return reduce_partial_sums(partials, likes, dims)


def sharded_sum(x: Tensor, like: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Sum of ``x`` (a local tensor laid out like ``local(like)``) over ``dim`` of the *global*
    tensor: the local sum (kept dims) all-reduced over the mesh dimensions that shard ``dim``.
    ``dim=None`` sums everything into a 0-d tensor. For a plain ``like`` it is the local sum."""
    return sharded_sums([x], [like], [dim])[0]


def sharded_mean(x: Tensor, like: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Mean over ``dim`` of the global tensor (see :func:`sharded_sum`); keeps dims."""
    axes = range(like.dim()) if dim is None else [dim] if isinstance(dim, int) else dim
    count = math.prod(like.shape[a] for a in axes)
    return sharded_sum(x, like, dim).div_(max(count, 1))


def sharded_norm(x: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The 2-norm of the whole global tensor whose local slice is ``x`` (0-d, on every rank)."""
    if not is_dtensor(like):
        return torch.linalg.vector_norm(x, dtype=dtype)
    squares = x.to(dtype) if dtype is not None else x
    return sharded_sum(squares * squares, like).sqrt_()


def new_state(param: Tensor, shape: Sequence[int], dtype: torch.dtype, fill: float = 0.0) -> Tensor:
    """A state tensor of global ``shape`` filled with ``fill``, placed like ``param``.

    For a plain parameter: ``torch.full`` on its device. For a DTensor parameter: a DTensor on
    the same mesh where each parameter axis kept at full size in ``shape`` is sharded as the
    parameter shards it (so the local slices line up elementwise) and every reduced axis (size
    1, or absent) is replicated: AdaFactor's row and column statistics, Amos's slots.
    """
    if not is_dtensor(param):
        if fill == 0:
            return torch.zeros(tuple(shape), dtype=dtype, device=param.device)
        return torch.full(tuple(shape), fill, dtype=dtype, device=param.device)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = tuple(shape)
    aligned = len(shape) == param.dim()
    placements = []
    for placement in param.placements:  # type: ignore[attr-defined]
        keep = (
            aligned
            and isinstance(placement, Shard)
            and shape[placement.dim] == param.shape[placement.dim]
        )
        placements.append(placement if keep else Replicate())
    _shard_dims(param, None)  # rejects Partial and other placements with a clear message
    param_local = param.to_local()  # type: ignore[attr-defined]
    local_shape = [
        param_local.shape[d]
        if any(isinstance(pl, Shard) and pl.dim == d for pl in placements)
        else size
        for d, size in enumerate(shape)
    ]
    data = torch.full(local_shape, fill, dtype=dtype, device=param_local.device)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    return DTensor.from_local(
        data,
        param.device_mesh,  # type: ignore[attr-defined]
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=tuple(strides),
    )


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's slice of ``full`` (a whole tensor, the same on every rank) when laid out as
    DTensor ``like`` is; no communication. ``full`` itself for a plain ``like``."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    ).to_local()


# ----------------------------------------------------------------------------------------------
# Decisions agreed across ranks


def agree(values: Tensor, tensors: Sequence[Tensor], *, op: str = "min") -> Tensor:
    """Make per-tensor decisions the same on every rank that holds part of a tensor.

    ``values[i]`` (bool or number, one per entry of ``tensors``) was computed from this rank's
    local slice of ``tensors[i]``. For each DTensor entry it is reduced over the mesh
    dimensions that shard it: ``"min"`` when every rank must agree that it is fine ("finite"),
    ``"max"`` when any rank may set it. Plain tensors need no communication (under DDP their
    gradients are already the same on every rank) and keep their values. Returns a tensor like
    ``values``.
    """
    if op not in ("min", "max"):
        raise ValueError(f"op must be 'min' or 'max', got {op!r}")
    sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
    if not sharded:
        return values
    import torch.distributed as dist

    reduce_op = dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX
    work = values.to(torch.int32)
    buckets: dict[tuple[int, ...], tuple[list[Any], list[int]]] = {}
    for i in sharded:
        groups = _groups(tensors[i], None)
        buckets.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
    for groups, indices in buckets.values():
        if not groups:  # replicated on every mesh dimension: the same values everywhere
            continue
        index = torch.tensor(indices, device=work.device)
        part = work.index_select(0, index)
        for group in groups:
            dist.all_reduce(part, op=reduce_op, group=group)
        work.index_copy_(0, index, part)
    return work.to(values.dtype)


def any_over_shards(flags: Tensor, like: Tensor, dim: int) -> Tensor:
    """``flags`` (bool, laid out like the local slice of ``like`` reduced over ``dim``) OR-ed
    over the ranks that shard ``dim`` of DTensor ``like``: e.g. "this row has a non-zero
    gradient entry" when the row is split over ranks. As is for a plain ``like``."""
    if not is_dtensor(like):
        return flags
    import torch.distributed as dist

    work = flags.to(torch.int32)
    return _all_reduce_(work, like, [dim], dist.ReduceOp.MAX).to(torch.bool)


# ----------------------------------------------------------------------------------------------
# Gradient synchronisation of DDP / FSDP2 modules


def _is_ddp(module: Any) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _is_fsdp2(module: Any) -> bool:
    return callable(getattr(module, "set_requires_gradient_sync", None))


def check_sync_module(name: str, module: Any) -> None:
    """Raise ValueError unless ``module`` is None, a DDP module or an FSDP2 module."""
    if module is not None and not (_is_ddp(module) or _is_fsdp2(module)):
        raise ValueError(
            f"{name} must be a DistributedDataParallel module or a module passed to "
            f"torch.distributed.fsdp.fully_shard, got {type(module).__name__}"
        )


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Switch gradient synchronisation of a DDP or FSDP2 module for the *next* forward and
    backward: what ``ddp.no_sync()`` does for DDP (its flag is read by ``forward``), and
    ``set_requires_gradient_sync`` for FSDP2."""
    check_sync_module("module", module)
    if _is_ddp(module):
        module.require_backward_grad_sync = bool(enabled)  # type: ignore[assignment]
    else:
        module.set_requires_gradient_sync(bool(enabled))  # type: ignore[operator]

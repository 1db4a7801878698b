"""Shared plumbing for the Triton kernels: several tensors per launch through address tables.

A launch covers every tensor of one dtype: each program handles ``BLOCK`` elements of one
tensor, found through a per-program (tensor, block) map; the kernel turns the tensor's data
address (an int64 table entry) back into a typed pointer. Tables are cached by the tensors'
addresses and sizes, so after the first step a launch needs no host-to-device copy. There is
no autotuning: an in-place kernel must never be run several times on the same data
(lion-pytorch#36).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK", "LaunchTables", "launch_tables", "triton_dtype"]

BLOCK = 1024
_CACHE_SIZE = 64


@dataclass(frozen=True)
class LaunchTables:
    addresses: tuple[Tensor, ...]  # one int64 table of data addresses per tensor role
    sizes: Tensor  # int64 numel per tensor
    block_tensor: Tensor  # int32: which tensor each program works on
    block_index: Tensor  # int32: which block of that tensor
    num_programs: int


_cache: OrderedDict[tuple, LaunchTables] = OrderedDict()


def launch_tables(roles: Sequence[Sequence[Tensor]], block: int = BLOCK) -> LaunchTables:
    """Address tables for parallel tensor lists (params, grads, state...), all contiguous,
    on one device; the first list's sizes define the blocks."""
    first = roles[0]
    device = first[0].device
    key = (device, block, tuple(tuple((t.data_ptr(), t.numel()) for t in role) for role in roles))
    tables = _cache.get(key)
    if tables is not None:
        _cache.move_to_end(key)
        return tables
    block_tensor: list[int] = []
    block_index: list[int] = []
    for i, t in enumerate(first):
        blocks = -(-t.numel() // block)
        block_tensor += [i] * blocks
        block_index += range(blocks)

    def table(values: list[int], dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    tables = LaunchTables(
        addresses=tuple(table([t.data_ptr() for t in role], torch.int64) for role in roles),
        sizes=table([t.numel() for t in first], torch.int64),
        block_tensor=table(block_tensor, torch.int32),
        block_index=table(block_index, torch.int32),
        num_programs=len(block_tensor),
    )
    _cache[key] = tables
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return tables


def triton_dtype(dtype: torch.dtype) -> object:
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }[dtype]


def contiguous_or_raise(tensors: Sequence[Tensor], what: str) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"the Triton {what} kernel needs contiguous tensors")

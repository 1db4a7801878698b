"""Shared plumbing for the Triton kernels: several tensors per launch through address tables.

A launch covers every tensor of one dtype: each program handles ``BLOCK`` elements of one
tensor, found through a per-program (tensor, block) map; the kernel turns the tensor's data
address (an int64 table entry) back into a typed pointer. Full blocks run without a mask and,
when every address is 16-byte aligned (``LaunchTables.aligned``), with that alignment
declared, so the compiler emits 128-bit loads and stores; only a tensor's last block is
masked. Tables are cached by the tensors' addresses and sizes, so after the first step a
launch needs no host-to-device copy. There is no autotuning: an in-place kernel must never be
run several times on the same data (lion-pytorch#36).

Hyper-parameters reach the kernels through a small device tensor in the compute dtype
(:func:`device_scalars`), never as Python floats: Triton passes those as fp32, which would
round the fp64 kernels' coefficients. Nothing here synchronises with the host: small tables
are copied with ``non_blocking=True`` and cached by value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "BLOCK",
    "LaunchTables",
    "compute_dtype",
    "contiguous_or_raise",
    "device_scalars",
    "div_rn",
    "group_by_dtypes",
    "int_table",
    "launch_tables",
    "lerp",
    "load",
    "lr_tensor",
    "round_to",
    "seed_tensor",
    "segment_sums",
    "sign",
    "sqrt_rn",
    "store_rounded",
    "triton_dtype",
    "typed_pointer",
]

BLOCK = 1024
_CACHE_SIZE = 64


@dataclass(frozen=True)
class LaunchTables:
    addresses: tuple[Tensor, ...]  # one int64 table of data addresses per tensor role
    sizes: Tensor  # int64 numel per tensor
    block_tensor: Tensor  # int32: which tensor each program works on
    block_index: Tensor  # int32: which block of that tensor
    block_offsets: Tensor  # int32, n + 1 entries: tensor i owns programs [o[i], o[i + 1])
    num_programs: int
    aligned: bool  # every data address is a multiple of 16 bytes (vector loads are safe)


class _LRU(OrderedDict[Hashable, Tensor | LaunchTables]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def lookup(self, key: Hashable) -> Tensor | LaunchTables | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def keep(self, key: Hashable, value: Tensor | LaunchTables) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


_tables = _LRU(_CACHE_SIZE)
_small = _LRU(4 * _CACHE_SIZE)  # hyper-parameters and small index tables


def _to_device(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device):
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)


def launch_tables(roles: Sequence[Sequence[Tensor]], block: int = BLOCK) -> LaunchTables:
    """Address tables for parallel tensor lists (params, grads, state...), all contiguous,
    on one device; the first list's sizes define the blocks."""
    first = roles[0]
    device = first[0].device
    key = (device, block, tuple(tuple((t.data_ptr(), t.numel()) for t in role) for role in roles))
    cached = _tables.lookup(key)
    if isinstance(cached, LaunchTables):
        return cached
    block_tensor: list[int] = []
    block_index: list[int] = []
    offsets = [0]
    for i, t in enumerate(first):
        blocks = -(-t.numel() // block)
        block_tensor += [i] * blocks
        block_index += range(blocks)
        offsets.append(offsets[-1] + blocks)
    tables = LaunchTables(
        addresses=tuple(
            _to_device([t.data_ptr() for t in role], torch.int64, device) for role in roles
        ),
        sizes=_to_device([t.numel() for t in first], torch.int64, device),
        block_tensor=_to_device(block_tensor, torch.int32, device),
        block_index=_to_device(block_index, torch.int32, device),
        block_offsets=_to_device(offsets, torch.int32, device),
        num_programs=len(block_tensor),
        aligned=all(t.data_ptr() % 16 == 0 for role in roles for t in role),
    )
    _tables.keep(key, tables)
    return tables


def device_scalars(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D tensor of ``dtype`` on ``device``, cached by value (constant
    hyper-parameters cost no copy after the first step)."""
    key = ("f", device, dtype, tuple(float(v) for v in values))
    cached = _small.lookup(key)
    if isinstance(cached, Tensor):
        return cached
    table = _to_device(values, dtype, device)
    _small.keep(key, table)
    return table


class ScalarTable:
    """The order of a kernel's scalar table (``hyper_ptr``): the one definition of both the
    offsets the kernel reads (:meth:`at`) and the table the host builds (:meth:`tensor`)."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self._offsets = {name: offset for offset, name in enumerate(names)}

    def at(self, name: str) -> tl.constexpr:
        """The offset of ``name``, as a compile-time constant of the kernel."""
        return tl.constexpr(self._offsets[name])

    def tensor(
        self, values: Mapping[str, float], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``values`` (by name) in this order, as a cached device tensor
        (:func:`device_scalars`)."""
        return device_scalars([values[name] for name in self.names], dtype, device)


def int_table(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Integers (indices, sizes, strides) as a cached device tensor."""
    key = ("i", device, dtype, tuple(int(v) for v in values))
    cached = _small.lookup(key)
    if isinstance(cached, Tensor):
        return cached
    table = _to_device(values, dtype, device)
    _small.keep(key, table)
    return table


def lr_tensor(lr: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The lr (or any step size) as a 0-d tensor in ``dtype`` on ``device``; a tensor lr is
    used as it is (a scheduler may change it in place), a number is cached by value."""
    if isinstance(lr, Tensor):
        return lr.detach().to(device=device, dtype=dtype, non_blocking=True).reshape(())
    return device_scalars([lr], dtype, device)[0]


def seed_tensor(device: torch.device) -> Tensor:
    """A fresh Philox seed drawn from torch's generator for ``device``, kept on the device."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any tensor is fp64, else fp32: the precision the kernels compute in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def triton_dtype(dtype: torch.dtype) -> object:
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


def group_by_dtypes(
    tensor_lists: Sequence[Sequence[Tensor | None]],
) -> Iterator[tuple[list[list[Tensor]], list[int]]]:
    """Split parallel tensor lists by device and by the dtype of *every* list (a kernel's
    pointer types are compile-time constants). ``None`` entries group together."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensor_lists[0]):
        assert t is not None
        key = (t.device, *(getattr(lst[i], "dtype", None) for lst in tensor_lists))
        buckets.setdefault(key, []).append(i)
    for indices in buckets.values():
        yield [[lst[i] for i in indices] for lst in tensor_lists], indices  # type: ignore[misc]


@triton.jit
def typed_pointer(addresses, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Entry ``tid`` of an address table as a pointer to ``DTYPE``."""
    ptr = tl.load(addresses + tid).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load(ptr, mask, other):
    """``tl.load`` with ``mask=None`` for full blocks (no ``other`` then)."""
    return tl.load(ptr) if mask is None else tl.load(ptr, mask=mask, other=other)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp's formula, for the same rounding as the eager path."""
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1 - weight))


@triton.jit
def sign(x):
    """torch.sign: ±1, 0 for ±0, NaN kept."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, tl.where(x == x, 0.0, x))).to(x.dtype)


@triton.jit
def sqrt_rn(x):
    """IEEE square root (round to nearest), as torch computes it; plain tl.sqrt may be
    approximate in fp32."""
    return tl.sqrt_rn(x) if x.dtype == tl.float32 else tl.sqrt(x)


@triton.jit
def div_rn(x, y):
    """IEEE division (round to nearest); plain ``/`` may be approximate in fp32."""
    return tl.div_rn(x, y) if y.dtype == tl.float32 else x / y


@triton.jit
def round_to(value, DTYPE: tl.constexpr):
    """``value.to(DTYPE)`` rounding to nearest even, written out for bf16 so that GPUs and
    Triton's CPU interpreter (which truncates fp32 to bf16) give the same bits; fp64 goes
    through fp32 first, as torch's conversion to bf16 does."""
    if tl.bfloat16 == DTYPE:
        if value.dtype == tl.float64:
            value = value.to(tl.float32)
        if value.dtype == tl.float32:
            bits = value.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            value = tl.where(value == value, bits.to(tl.float32, bitcast=True), value)
    return value.to(DTYPE)


@triton.jit
def store_rounded(
    ptr, offs, value, mask, seed_ptr, stream, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr
):
    """Store fp32 ``value`` as ``DTYPE``; with ``STOCHASTIC`` (bf16 or fp16) round the
    magnitude up with probability equal to the discarded fraction of the spacing (unbiased),
    keeping Inf and NaN; fp16 saturates finite values at ±65504 and rounds subnormals on their
    grid of 2^-24, as ``functional.precision.stochastic_round_``. The random stream is Philox
    keyed by the seed tensor, counter (stream, offset)."""
    if STOCHASTIC:
        r = tl.randint(tl.load(seed_ptr), (stream.to(tl.int64) << 40) + offs)
        bits = value.to(tl.int32, bitcast=True)
        if tl.bfloat16 == DTYPE:
            noise = (r & 0xFFFF).to(tl.int32, bitcast=True)
            # bf16 is the top half of fp32: noise in the discarded half, then truncation
            rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
        else:
            # fp16 keeps 10 of fp32's 23 mantissa bits: noise in the other 13, truncation
            noise = (r & 0x1FFF).to(tl.int32, bitcast=True)
            rounded = ((bits + noise) & -8192).to(tl.float32, bitcast=True)
            # subnormals: |x|·2^24 = n + f exactly, rounded up with probability f
            scaled = tl.abs(value) * 16777216.0
            whole = tl.floor(scaled)
            up = (r & 0xFFFFFF).to(tl.float32) < (scaled - whole) * 16777216.0
            sub = (whole + up.to(tl.float32)) * 5.9604644775390625e-08
            sub = tl.where(bits < 0, -sub, sub)
            rounded = tl.where(tl.abs(value) < 6.103515625e-05, sub, rounded)
            rounded = tl.minimum(tl.maximum(rounded, -65504.0), 65504.0)
        value = tl.where(tl.abs(value) < float("inf"), rounded, value)
    tl.store(ptr + offs, round_to(value, DTYPE), mask=mask)


@triton.jit
def _segment_sum_kernel(partials, offsets, out, num_programs, num_tensors, BLOCK: tl.constexpr):
    # one program per (row, tensor): the sum of that tensor's per-block partial sums
    tid = tl.program_id(0)
    row = tl.program_id(1)
    first = tl.load(offsets + tid)
    last = tl.load(offsets + tid + 1)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for start in range(first, last, BLOCK):
        idx = start + lanes
        acc += tl.load(partials + row * num_programs + idx, mask=idx < last, other=0.0)
    tl.store(out + row * num_tensors + tid, tl.sum(acc, axis=0))


def segment_sums(partials: Tensor, tables: LaunchTables) -> Tensor:
    """Per-tensor sums of per-program partial sums: ``partials`` has shape (rows, programs),
    the result (rows, tensors); empty tensors sum to 0. Deterministic (no atomics)."""
    rows = partials.shape[0]
    tensors = tables.sizes.numel()
    out = torch.empty(rows, tensors, dtype=partials.dtype, device=partials.device)
    if tensors:
        _segment_sum_kernel[(tensors, rows)](
            partials,
            tables.block_offsets,
            out,
            tables.num_programs,
            tensors,
            BLOCK=256,
        )
    return out

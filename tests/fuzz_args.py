"""The argument strategies of the fuzz tests: what an optimizer's constructor argument may be
(:class:`Arg`: the valid values and values that must raise ``ValueError``), used by each
optimizer's ``"fuzz"`` entry in tests/optimizer_cases.py and by tests/fuzz_strategies.py.

Scale-like arguments (lr, weight decay, ε, ...) are drawn from 0 (where allowed) and from
1e-30 up to a cap where a few steps cannot overflow fp16 by plain arithmetic (``lr=1e30``
sends any parameter to inf, which is not a defect). For the no-crash test, ``extreme`` draws
them from the cap up to the largest value of the parameters' dtype: the shells accept up to
float32's maximum (``danlu.core.shell.MAX_SCALAR``; larger values must raise ValueError), and
torch converts some scalar arguments (``add_(alpha=...)``) to the tensor's own dtype, so a
weight decay beyond 65504 is out of fp16's reach. Dimensionless arguments (betas, decay rates,
choices, integers) are drawn over their whole range, endpoints and subnormal values included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from danlu.algorithms.tiger.functional import KINDS
from danlu.core.shell import MAX_SCALAR

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

NOT_A_NUMBER = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), "0.1", None, True, [0.1], 1j]
)


@dataclass(frozen=True)
class Arg:
    valid: st.SearchStrategy
    invalid: st.SearchStrategy
    extreme_from: float | None = None  # valid values from here up are beyond the finite cap


def log_uniform(low: float, high: float) -> st.SearchStrategy:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: min(max(10.0**e, low), high))


def negative() -> st.SearchStrategy:
    return st.one_of(st.just(-5e-324), st.floats(max_value=-1e-300, allow_infinity=False))


TOO_LARGE = st.one_of(st.just(1e39), st.floats(min_value=MAX_SCALAR, exclude_min=True))


def scale(cap: float, *, zero: bool = True, tensor: bool = False) -> Arg:
    """A number ≥ 0 (> 0 when ``zero`` is False), optionally also as a 0-d tensor."""
    numbers = st.one_of(st.just(0.0), log_uniform(1e-30, cap)) if zero else log_uniform(1e-30, cap)
    invalid = st.one_of(negative(), TOO_LARGE, NOT_A_NUMBER, *([] if zero else [st.just(0.0)]))
    if tensor:
        numbers = st.one_of(numbers, numbers.map(torch.tensor))
        invalid = st.one_of(
            invalid,
            st.sampled_from([torch.tensor(-1.0), torch.tensor(float("nan")), torch.ones(2)]),
        )
    return Arg(numbers, invalid, cap)


def interval(low: float, high: float, *, low_open: bool, high_open: bool) -> Arg:
    inside = st.floats(low, high, exclude_min=low_open, exclude_max=high_open, allow_subnormal=True)
    endpoints = [x for x, is_open in ((low, low_open), (high, high_open)) if not is_open]
    valid = st.one_of(inside, st.sampled_from(endpoints)) if endpoints else inside
    outside = st.one_of(
        st.floats(max_value=low, exclude_max=not low_open, allow_infinity=False),
        st.floats(min_value=high, exclude_min=not high_open, allow_infinity=False),
    )
    return Arg(valid, st.one_of(outside, NOT_A_NUMBER))


BETA = interval(0.0, 1.0, low_open=False, high_open=True)


def pair(first: Arg, second: Arg) -> Arg:
    valid = st.tuples(first.valid, second.valid)
    invalid = st.one_of(
        st.tuples(first.invalid, second.valid),
        st.tuples(first.valid, second.invalid),
        st.sampled_from([(0.9,), (0.9, 0.99, 0.999), 0.9, "0.9,0.99", None]),
    )
    return Arg(valid, invalid)


def choice(values: tuple) -> Arg:
    return Arg(
        st.sampled_from(values),
        st.one_of(
            st.text(max_size=8).filter(lambda s: s not in values), st.sampled_from([1, None])
        ),
    )


def optional(arg: Arg) -> Arg:
    return Arg(st.one_of(st.none(), arg.valid), arg.invalid.filter(lambda v: v is not None))


def integer(low: int, high: int) -> Arg:
    return Arg(
        st.integers(low, high),
        st.one_of(st.integers(max_value=low - 1), st.sampled_from([1.5, float(low), True, "2"])),
    )


BOOL = Arg(st.booleans(), st.sampled_from([0, 1, "yes", None, 1.0]))
FOREACH = Arg(st.sampled_from([None, False, True]), st.sampled_from([0, 1, "yes"]))
# stochastic rounding of bf16/fp16 parameters: None (the default, on) or a bool
ROUNDING = Arg(st.sampled_from([None, False, True]), st.sampled_from([0, 1, "yes", 1.0]))
# fused=True compiles the foreach math with torch.compile on CPU: seconds per example, tested
# in tests/test_kernels.py instead. On CUDA it is the Triton kernel.
FUSED = Arg(
    st.sampled_from([None, False, True] if torch.cuda.is_available() else [None, False]),
    st.sampled_from([0, 1, "yes"]),
)
STATE_DTYPE = Arg(
    st.sampled_from([None, *DTYPES]), st.sampled_from(["bfloat16", torch.int8, torch.bool, 16])
)
KIND = Arg(st.sampled_from([None, *KINDS]), st.sampled_from(["conv", "", "Matrix", 1]))
CENTER = Arg(
    st.floats(-10, 10),
    st.sampled_from([float("nan"), float("inf"), "1", None, torch.tensor(1.0)]),
)
LR = scale(1.0, tensor=True)
WEIGHT_DECAY = scale(10.0)

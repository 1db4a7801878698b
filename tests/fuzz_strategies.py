"""Hypothesis strategies for the fuzz tests (tests/test_fuzz_optimizers.py, test_fuzz_wrappers.py).

``SPECS[name]`` describes every constructor argument of a registered optimizer: the values
that must be accepted (the whole valid range) and values that must raise ``ValueError``.
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

from danlu.algorithms.adafactor.functional import FACTORED_DIMS, MOMENTUM_MODES
from danlu.algorithms.amos.functional import SLOT_RULES
from danlu.algorithms.amos.optimizer import ETA_RULES
from danlu.algorithms.tiger.functional import KINDS
from danlu.algorithms.tiger.optimizer import NONFINITE_MODES, NONFINITE_SCOPES
from danlu.core.shell import MAX_SCALAR
from danlu.registry import REGISTRY

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

SPECS: dict[str, dict[str, Arg]] = {
    "lion": {
        "lr": LR,
        "betas": pair(BETA, BETA),
        "weight_decay": WEIGHT_DECAY,
        "state_dtype": STATE_DTYPE,
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
        "fused": FUSED,
    },
    "tiger": {
        "lr": LR,
        "beta": BETA,
        "weight_decay": WEIGHT_DECAY,
        "grad_accum_steps": integer(1, 4),
        "shrink_ratio": interval(0.0, 1.0, low_open=True, high_open=False),
        "nonfinite": choice(NONFINITE_MODES),
        "nonfinite_scope": choice(NONFINITE_SCOPES),
        "rms_floor": scale(1.0),
        "state_dtype": STATE_DTYPE,
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
        "fused": FUSED,
    },
    "adamw": {
        "lr": LR,
        "betas": pair(BETA, BETA),
        "eps": scale(1e30),
        "weight_decay": WEIGHT_DECAY,
        "grad_accum_steps": integer(1, 4),
        "eps_inside_sqrt": BOOL,
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
    },
    "adax": {
        "lr": LR,
        "betas": pair(BETA, interval(0.0, 1.0, low_open=True, high_open=True)),
        "eps": scale(1e30),
        "weight_decay": WEIGHT_DECAY,
        "eps_inside_sqrt": BOOL,
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
        "fused": FUSED,
    },
    "adafactor": {
        "lr": Arg(st.one_of(st.none(), LR.valid), LR.invalid.filter(lambda v: v is not None)),
        "beta1": BETA,
        "decay_rate": interval(0.0, 1.0, low_open=True, high_open=True),
        "beta2": optional(BETA),
        "eps1": scale(1.0),
        "eps2": scale(1.0),
        "clip_threshold": optional(scale(10.0, zero=False)),
        "multiply_by_parameter_scale": BOOL,
        "weight_decay": WEIGHT_DECAY,
        "relative_step": BOOL,
        "factored_dims": choice(FACTORED_DIMS),
        "min_dim_size_to_factor": integer(0, 8),
        "momentum_mode": choice(MOMENTUM_MODES),
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
        "fused": FUSED,
    },
    "amos": {
        "lr": LR,
        "eta": Arg(
            st.one_of(st.sampled_from(ETA_RULES), log_uniform(1e-30, 10.0)),
            st.one_of(negative(), st.just(0.0), st.sampled_from(["large", None, float("nan")])),
        ),
        "beta": BETA,
        "momentum": BETA,
        "clip_value": optional(scale(10.0, zero=False)),
        "slots": choice(SLOT_RULES),
        "init_b": scale(10.0),
        "finetune_rate": scale(10.0),
        "zeta": scale(10.0),
        "eps": scale(1.0, zero=False),
        "stochastic_rounding": ROUNDING,
        "maximize": BOOL,
        "foreach": FOREACH,
        "fused": FUSED,
    },
}

# Keys a param group may carry beyond the constructor arguments (read by Tiger and Amos).
GROUP_EXTRAS: dict[str, dict[str, Arg]] = {
    "tiger": {"kind": KIND, "center": CENTER},
    "amos": {"kind": KIND, "center": CENTER},
}

SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@st.composite
def hyperparameters(draw, name: str, *, extreme_max: float | None = None) -> dict:
    """Valid arguments; with ``extreme_max``, scale-like ones may be drawn up to it."""
    out = {}
    for arg, spec in SPECS[name].items():
        low = spec.extreme_from
        if extreme_max and low is not None and low < extreme_max and draw(st.booleans()):
            out[arg] = draw(st.one_of(st.just(extreme_max), log_uniform(low, extreme_max)))
        else:
            out[arg] = draw(spec.valid)
    if name == "adamw":  # the first step's size lr/(1 − β1) must fit in float32 too
        while float(out["lr"]) / (1 - out["betas"][0]) > MAX_SCALAR:
            out["lr"] = math.nextafter(min(float(out["lr"]), MAX_SCALAR * (1 - out["betas"][0])), 0)
    return out


@st.composite
def group_extras(draw, name: str) -> dict:
    return {key: draw(spec.valid) for key, spec in GROUP_EXTRAS.get(name, {}).items()}


@st.composite
def tensors(draw, shape: tuple, dtype: torch.dtype, device: str, *, zero_rows: bool = False):
    """A finite tensor: random normal or constant values at a drawn magnitude (from 1e-6, near
    the dtype's smallest normal, up to "large": 1e8, or √max/10 for fp16, so that g² stays
    finite), with drawn patterns of zeros (none, all, scattered, whole rows or columns)."""
    seed = draw(st.integers(0, 2**31 - 1))
    finfo = torch.finfo(dtype)
    magnitude = draw(
        st.one_of(
            st.integers(-6, 1).map(lambda e: 10.0**e),
            st.just(min(1e8, finfo.max**0.5 / 10)),
            st.just(finfo.tiny * 4),
        )
    )
    values = draw(st.sampled_from(["normal", "constant"]))
    zeros = draw(st.sampled_from(["none", "all", "scattered", "rows", "columns"]))
    if zero_rows:
        zeros = "rows"
    gen = torch.Generator().manual_seed(seed)
    if values == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    else:
        x = torch.full(shape, magnitude, dtype=torch.float64)
    if zeros == "all":
        x.zero_()
    elif zeros == "scattered":
        x[torch.rand(shape, generator=gen) < 0.5] = 0.0
    elif zeros == "rows" and x.dim() >= 1:
        x[torch.rand(shape[0], generator=gen) < 0.5] = 0.0
    elif zeros == "columns" and x.dim() >= 1:
        x[..., torch.rand(shape[-1], generator=gen) < 0.5] = 0.0
    return x.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# A whole problem: an optimizer's arguments and groups, parameters, gradients per step


@st.composite
def problems(draw, name: str, *, extreme: bool = False, dtype=None, device=None, max_steps=3):
    """(kwargs, group extras, parameters, grads[step][param] with None for "no gradient")."""
    device = device or draw(st.sampled_from(DEVICES))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    top = min(MAX_SCALAR, torch.finfo(dtype).max) if extreme else None
    kwargs = draw(hyperparameters(name, extreme_max=top))
    n_groups = draw(st.integers(1, min(2, len(shapes))))
    extras = [draw(group_extras(name)) for _ in range(n_groups)]
    params = [torch.nn.Parameter(draw(tensors(s, dtype, device))) for s in shapes]
    steps = draw(st.integers(1, max_steps))
    grads = [
        [draw(st.one_of(st.none(), tensors(p.shape, dtype, device))) for p in params]
        for _ in range(steps)
    ]
    return kwargs, extras, params, grads


def build(name: str, kwargs: dict, extras: list[dict], params: list) -> torch.optim.Optimizer:
    groups = [{"params": params[i :: len(extras)], **extra} for i, extra in enumerate(extras)]
    return REGISTRY[name].cls([g for g in groups if g["params"]], **kwargs)


def finite_guaranteed(name: str, kwargs: dict) -> bool:
    """Whether finite gradients must give finite parameters. Not for AdamW with ε = 0 and
    β2 < β1²: its step m̂/√v̂ is unbounded (a large gradient followed by a zero one leaves m ≠ 0
    and v = 0; Kingma & Ba bound it only for β1 < √β2)."""
    if name == "adamw" and kwargs["eps"] == 0:
        beta1, beta2 = kwargs["betas"]
        return beta2 >= beta1**2
    return True


def reproducible(kwargs: dict) -> dict:
    """The same arguments without the features that make two identical runs differ:
    stochastic rounding draws from the global RNG, fused=True compiles."""
    out = dict(kwargs)
    if "stochastic_rounding" in out:
        out["stochastic_rounding"] = False
    if "fused" in out:
        out["fused"] = None
    return out


def zero_lr_freezes(name: str, kwargs: dict) -> bool:
    """Whether lr = 0 leaves the parameters where they are even after earlier steps: not with
    a momentum of lr-scaled steps (Amos's momentum, AdaFactor's "scaled" momentum), which keeps
    moving them."""
    if name == "amos":
        return kwargs["momentum"] == 0
    if name == "adafactor":
        return kwargs["beta1"] == 0 or kwargs["momentum_mode"] == "unit"
    return True

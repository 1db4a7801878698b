"""Hypothesis strategies for the fuzz tests (tests/test_fuzz_optimizers.py, test_fuzz_wrappers.py).

``SPECS[name]`` describes every constructor argument of a registered optimizer: the values
that must be accepted (the whole valid range) and values that must raise ``ValueError``. It is
each optimizer's ``"fuzz"`` entry in tests/optimizer_cases.py (the argument strategies are in
tests/fuzz_args.py, which says how scale-like and dimensionless arguments are drawn);
``GROUP_EXTRAS`` are the keys a param group may carry beyond them (its ``"group_extras"``).
"""

from __future__ import annotations

import math

import torch
from fuzz_args import (
    DEVICES,
    DTYPES,
    Arg,
    log_uniform,
)
from hypothesis import strategies as st
from optimizer_cases import CASES

from danlu.core.shell import MAX_SCALAR
from danlu.registry import REGISTRY

SPECS: dict[str, dict[str, Arg]] = {n: c["fuzz"] for n, c in CASES.items() if "fuzz" in c}
# Keys a param group may carry beyond the constructor arguments (read by Tiger and Amos).
GROUP_EXTRAS: dict[str, dict[str, Arg]] = {
    n: c["group_extras"] for n, c in CASES.items() if "group_extras" in c
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

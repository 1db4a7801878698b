"""Fuzzing every registered optimizer (hypothesis): shapes (empty and 0-d included), dtypes, the
available devices and the whole valid hyper-parameter ranges.

* valid arguments, finite gradients: no exception, finite parameters and state, dtypes and
  shapes kept, parameters without a gradient untouched, lr = 0 moves nothing, and
  docs/reference/algorithms.md invariants: Lion's bound |θ_t| ≤ max(|θ_0|, 1/λ)
  (docs/reference/algorithms.md#lion-tests item 4), the sign-update magnitudes of Lion and Tiger
  (docs/reference/algorithms.md#lion-rule, #tiger-rule), AdaFactor's clipping bound RMS(û) ≤ d
  (docs/reference/algorithms.md#adafactor-rule), Tiger's exact accumulation
  (docs/reference/algorithms.md#tiger-rule, #hidden-accumulation-rule);
* extreme valid magnitudes (up to 1e300): no exception;
* invalid arguments, at construction, in ``add_param_group`` or in a group before ``step()``:
  ``ValueError`` naming the argument, and nothing modified.

The examples per test come from the hypothesis profile (tests/conftest.py: ``ci`` in CI).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fuzz_strategies import (
    DTYPES,
    GROUP_EXTRAS,
    SHAPES,
    SPECS,
    build,
    finite_guaranteed,
    hyperparameters,
    problems,
    tensors,
)
from hypothesis import assume, given
from hypothesis import strategies as st

import danlu
from danlu.registry import REGISTRY

NAMES = sorted(REGISTRY)


def test_every_registered_optimizer_has_a_fuzz_spec():
    for name in NAMES:
        assert name in SPECS, f"add a 'fuzz' entry for {name} to tests/optimizer_cases.py"
        args = [a for a in REGISTRY[name].defaults]
        assert sorted(SPECS[name]) == sorted(args), f"{name}: spec and signature differ"
    # the algorithm-specific invariants below are optional, but only for registered names
    assert set(INVARIANTS) <= set(NAMES), set(INVARIANTS) - set(NAMES)


def is_zero_lr(lr):
    return lr is not None and float(lr) == 0.0


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of the parameter dtype at |x| (in float64)."""
    finfo = torch.finfo(x.dtype)
    mag = x.detach().double().abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * finfo.eps


def state_tensors(opt):
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield key, value


# ----------------------------------------------------------------------------------------------
# docs/reference/algorithms.md invariants, checked on every step: (opt, group, params, old values,
# new values, grads, counts) where counts[i] is the number of earlier step() calls (the optimizer's
# micro-step counter, which places every parameter in the same accumulation window).


def lion_bound(opt, group, params, old, new, grads, counts):
    """docs/reference/algorithms.md#lion-tests item 4: with ηλ ≤ 1, |θ_t| ≤ max(|θ_{t−1}|, 1/λ) for
    every coordinate.

    The decay factor 1 − ηλ is formed in the lr's dtype, as torch.optim and lion-pytorch do:
    a float32 tensor lr rounds it to a multiple of 2⁻²⁴ (to 1 when ηλ < 3e-8), so a float64
    parameter may keep up to |θ|·2⁻²⁴ of its decay (found by a larger fuzz budget)."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    if wd == 0 or lr * wd > 1:
        return
    lr_eps = torch.finfo(group["lr"].dtype).eps if isinstance(group["lr"], torch.Tensor) else 0.0
    for a, b in zip(old, new, strict=True):
        bound = torch.maximum(a.double().abs(), torch.full_like(a, 1 / wd, dtype=torch.float64))
        slack = 2 * ulp(bound.to(b.dtype)) + a.double().abs() * lr_eps
        assert (b.double().abs() <= bound + slack).all()


def sign_magnitude(step_size):
    """|Δθ| ∈ {0, η} per coordinate without weight decay (sign updates,
    docs/reference/algorithms.md#lion-rule, #tiger-rule)."""

    def check(opt, group, params, old, new, grads, counts):
        if group["weight_decay"] != 0:
            return
        for a, b, g, count in zip(old, new, grads, counts, strict=True):
            if g is None or a.numel() == 0:
                continue
            eta = step_size(group, a, count)
            if eta is None:
                continue
            delta = (b.double() - a.double()).abs()
            tol = 2 * ulp(torch.maximum(a.abs(), b.abs())) + 1e-2 * eta * (a.dtype != torch.float64)
            ok = (delta <= tol) | ((delta - eta).abs() <= tol)
            assert ok.all(), (delta[~ok][:4], eta if isinstance(eta, float) else eta[~ok][:4])

    return check


def lion_step(group, p, count):
    return float(group["lr"])


def tiger_step(group, p, count):
    if (count + 1) % group["grad_accum_steps"] != 0:  # not the last micro-step of a window
        return 0.0
    kind = group["kind"] or ("elementwise" if p.dim() <= 1 else "matrix")
    lr, floor = float(group["lr"]), group["rms_floor"]
    x = p.double()
    if kind == "elementwise":
        return 0.5 * lr
    if kind == "embedding" and p.dim() >= 1:
        rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(floor)
        return (lr * rms).expand_as(x)
    return lr * max(x.pow(2).mean().sqrt().item(), floor)


def adafactor_clipping(opt, group, params, old, new, grads, counts):
    """docs/reference/algorithms.md#adafactor-rule: û = u / max(1, RMS(u)/d), so RMS(Δθ) ≤ α_t·s·d
    without decay and momentum (s = max(ε2, RMS(θ)) with parameter scaling, else 1)."""
    d = group["clip_threshold"]
    if d is None or group["weight_decay"] != 0 or group["beta1"] != 0:
        return
    for p, a, b, g in zip(params, old, new, grads, strict=True):
        if g is None or a.numel() == 0:
            continue
        t = opt.state[p]["step"].item()
        alpha = float(group["lr"])
        if group["relative_step"]:
            alpha *= min(1e-2, 1 / math.sqrt(t))
            alpha *= 1.0 if group["multiply_by_parameter_scale"] else 0.05
        s = 1.0
        if group["multiply_by_parameter_scale"]:
            s = max(group["eps2"], a.double().pow(2).mean().sqrt().item())
        delta = b.double() - a.double()
        rms = delta.pow(2).mean().sqrt().item()
        slack = ulp(torch.maximum(a.abs(), b.abs())).max().item()
        rel = 1e-9 if a.dtype == torch.float64 else 1e-2
        assert rms <= alpha * s * d * (1 + rel) + slack, (rms, alpha * s * d)


INVARIANTS = {
    "lion": [lion_bound, sign_magnitude(lion_step)],
    "tiger": [sign_magnitude(tiger_step)],
    "adafactor": [adafactor_clipping],
}


# ----------------------------------------------------------------------------------------------
# Valid arguments


def run_and_check(name, kwargs, extras, params, grads, *, invariants=True):
    opt = build(name, kwargs, extras, params)
    dtypes = [p.dtype for p in params]
    shapes = [p.shape for p in params]
    finite = finite_guaranteed(name, kwargs)
    counts = [0] * len(params)
    accum = [accumulation_steps(opt, p) for p in params]
    in_window = [False] * len(params)  # a gradient earlier in the current accumulation window
    for step_grads in grads:
        # on the call that closes a window, a parameter with a gradient earlier in it moves
        closes = [(c + 1) % k == 0 for c, k in zip(counts, accum, strict=True)]
        old = [p.detach().clone() for p in params]
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
        new = [p.detach() for p in params]
        assert [p.dtype for p in params] == dtypes
        assert [p.shape for p in params] == shapes
        for a, b, g, seen, close in zip(old, new, step_grads, in_window, closes, strict=True):
            if g is None and not (seen and close):
                assert torch.equal(a, b), "a parameter without gradient moved"
            assert torch.isfinite(b).all() or not finite, "non-finite parameter from finite input"
        for key, value in state_tensors(opt):
            assert torch.isfinite(value).all(), f"non-finite state {key!r} from finite input"
        for group in opt.param_groups:
            members = [i for i, p in enumerate(params) if any(p is q for q in group["params"])]
            if is_zero_lr(group["lr"]):
                for i in members:
                    assert torch.equal(old[i], new[i]), "lr = 0 moved a parameter"
            if invariants:
                for check in INVARIANTS.get(name, []):
                    check(
                        opt,
                        group,
                        [params[i] for i in members],
                        [old[i] for i in members],
                        [new[i] for i in members],
                        [step_grads[i] for i in members],
                        [counts[i] for i in members],
                    )
        counts = [c + 1 for c in counts]
        in_window = [
            not close and (seen or g is not None)
            for close, seen, g in zip(closes, in_window, step_grads, strict=True)
        ]
    return opt


def accumulation_steps(opt, p):
    """grad_accum_steps of p's group (1 for optimizers without accumulation)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return group.get("grad_accum_steps", 1)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_valid_arguments_give_finite_results(name, data):
    kwargs, extras, params, grads = data.draw(problems(name))
    run_and_check(name, kwargs, extras, params, grads)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_extreme_valid_magnitudes_do_not_crash(name, data):
    kwargs, extras, params, grads = data.draw(problems(name, extreme=True))
    opt = build(name, kwargs, extras, params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()  # overflow to inf is allowed here; an exception is not


@given(data=st.data())
def test_tiger_accumulation_equals_the_mean_gradient(data):
    """docs/reference/algorithms.md#tiger-rule/#hidden-accumulation-rule: k micro-steps of
    Tiger(grad_accum_steps=k) equal one Tiger step on the mean gradient (float64, two windows;
    coordinates where the momentum is ~0 may round to a different sign and are allowed to differ by
    2η)."""
    k = data.draw(st.integers(2, 4))
    kwargs = data.draw(hyperparameters("tiger"))
    kwargs.update(grad_accum_steps=1, state_dtype=None, stochastic_rounding=False)
    kind = data.draw(st.sampled_from([None, "matrix", "elementwise", "embedding"]))
    shapes = data.draw(st.lists(SHAPES, min_size=1, max_size=3))
    start = [data.draw(tensors(s, torch.float64, "cpu")) for s in shapes]
    micro = [[data.draw(tensors(s, torch.float64, "cpu")) for s in shapes] for _ in range(2 * k)]
    accumulated = [torch.nn.Parameter(x.clone()) for x in start]
    plain = [torch.nn.Parameter(x.clone()) for x in start]
    opt_k = danlu.Tiger(
        [{"params": accumulated, "kind": kind}], **{**kwargs, "grad_accum_steps": k}
    )
    opt_1 = danlu.Tiger([{"params": plain, "kind": kind}], **kwargs)
    for window in range(2):
        before = [p.detach().clone() for p in accumulated]
        for j in range(k):
            for p, g in zip(accumulated, micro[window * k + j], strict=True):
                p.grad = g
            opt_k.step()
            if j < k - 1:  # parameters move only on the last micro-step of a window
                assert all(torch.equal(a, p) for a, p in zip(before, accumulated, strict=True))
        for i, p in enumerate(plain):
            p.grad = sum(micro[window * k + j][i] for j in range(k)) / k
        opt_1.step()
        for i, (a, b) in enumerate(zip(accumulated, plain, strict=True)):
            # rounding is relative to the gradients (β·m may be lost next to (1 − β)·g)
            g_max = max((g[i].abs().max().item() for g in micro if g[i].numel()), default=0.0)
            atol = 1e-12 * g_max
            # (empty tensors get no momentum)
            m = opt_1.state[b].get("exp_avg", torch.zeros_like(b))
            torch.testing.assert_close(
                opt_k.state[a].get("exp_avg", torch.zeros_like(a)), m, rtol=1e-12, atol=atol
            )
            eta = float(kwargs["lr"]) * max(1.0, b.detach().abs().max().item() if b.numel() else 0)
            near_zero = m.abs() <= atol
            diff = (a.detach() - b.detach()).abs()
            assert (diff[~near_zero] <= 1e-12 * (1 + b.detach().abs()[~near_zero])).all()
            assert (diff[near_zero] <= 2.01 * eta + 1e-12).all()


# ----------------------------------------------------------------------------------------------
# Invalid arguments: ValueError naming the argument, nothing modified


@st.composite
def invalid_argument(draw, name: str):
    specs = {**SPECS[name], **GROUP_EXTRAS.get(name, {})}
    arg = draw(st.sampled_from(sorted(specs)))
    return arg, draw(specs[arg].invalid), arg in SPECS[name]


def snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(before, after):
    (pa, sa), (pb, sb) = before, after
    assert all(torch.equal(a, b) for a, b in zip(pa, pb, strict=True))
    assert_same(sa, sb)


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_invalid_arguments_raise_and_modify_nothing(name, data):
    arg, bad, is_constructor_arg = data.draw(invalid_argument(name))
    kwargs = data.draw(hyperparameters(name))
    if "fused" in kwargs:
        kwargs["fused"] = None
    dtype = data.draw(st.sampled_from(DTYPES))
    params = [torch.nn.Parameter(torch.randn(3, 4).to(dtype)), torch.nn.Parameter(torch.ones(4))]
    start = [p.detach().clone() for p in params]
    where = data.draw(st.sampled_from(["constructor", "add_param_group", "step"]))
    if where == "constructor":
        assume(is_constructor_arg)
        with pytest.raises(ValueError, match=arg.split("[")[0]):
            REGISTRY[name].cls(params, **{**kwargs, arg: bad})
        assert all(torch.equal(a, p) for a, p in zip(start, params, strict=True))
        return
    opt = REGISTRY[name].cls(params[:1], **kwargs)
    for _ in range(data.draw(st.integers(0, 2))):  # some state first
        params[0].grad = torch.randn(3, 4).to(dtype)
        opt.step()
    if where == "add_param_group":
        groups_before = copy.deepcopy(opt.param_groups)
        with pytest.raises(ValueError, match=arg.split("[")[0]):
            opt.add_param_group({"params": params[1:], arg: bad})
        assert len(opt.param_groups) == len(groups_before)
        return
    params[0].grad = torch.randn(3, 4).to(dtype)
    before = snapshot(params, opt)
    saved = opt.param_groups[0][arg]
    opt.param_groups[0][arg] = bad
    with pytest.raises(ValueError, match=arg.split("[")[0]):
        opt.step()
    opt.param_groups[0][arg] = saved
    assert_unchanged(before, snapshot(params, opt))

"""Fuzzing every wrapper (hypothesis) around every registered optimizer, over shapes (empty and
0-d included), dtypes, devices and valid hyper-parameters. Each wrapper is compared with what
it promises in terms of the bare optimizer, bit for bit:

* GradientAccumulation(opt, k): one step of ``opt`` on ((g₁ + g₂) + …)/k per window
  (docs/reference/algorithms.md#gradient-accumulation);
* UpdateEvery(opt, k): the parameters move only on every k-th call
  (docs/reference/algorithms.md#hidden-accumulation-defaults);
* NonFiniteGuard: tensors with NaN/Inf gradients skipped, shrunk (θ ← (θ − c)·s + c) or a
  FloatingPointError with nothing modified; the others as ``opt`` on the finite gradients
  (with an accumulation window ``opt`` steps on every call, the skipped gradients hidden);
* Lazy: rows with an all-zero gradient on every micro-step of the accumulation window so
  far keep their values (and their moments with ``lazy_moments=True``), the other parameters
  step as with ``opt`` (docs/reference/algorithms.md#lazy-updates; the window is the optimizer's
  ``grad_accum_steps``);
* MultiOptimizer: the same as stepping each inner optimizer on its own;
* step_in_backward: the same as ``backward(); step()``;

and invalid arguments raise ValueError leaving the inner optimizer as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fuzz_strategies import (
    DEVICES,
    DTYPES,
    SHAPES,
    build,
    finite_guaranteed,
    hyperparameters,
    problems,
    reproducible,
    tensors,
    zero_lr_freezes,
)
from hypothesis import given
from hypothesis import strategies as st

import danlu
from danlu.registry import REGISTRY
from danlu.wrappers._base import counts_windows

NAMES = sorted(REGISTRY)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def twin(name, kwargs, extras, params):
    """The optimizer under test and an identical reference over cloned parameters."""
    ref_params = clone_params(params)
    return build(name, kwargs, extras, params), ref_params, build(name, kwargs, extras, ref_params)


def assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_same_run(params, opt, ref_params, ref_opt):
    for i, (a, b) in enumerate(zip(params, ref_params, strict=True)):
        assert_same(a.detach(), b.detach(), f"parameter {i}")  # NaN where the reference has NaN
    assert_same(
        [dict(opt.state[p]) if p in opt.state else {} for p in params],
        [dict(ref_opt.state[p]) if p in ref_opt.state else {} for p in ref_params],
    )


def clone(g):
    return None if g is None else g.clone()


@st.composite
def wrapped_problems(draw, *, max_steps=4):
    name = draw(st.sampled_from(NAMES))
    kwargs, extras, params, grads = draw(problems(name, max_steps=max_steps))
    return name, reproducible(kwargs), extras, params, grads


# ----------------------------------------------------------------------------------------------


@given(data=st.data())
def test_gradient_accumulation_is_one_step_on_the_mean(data):
    name, kwargs, extras, params, grads = data.draw(wrapped_problems(max_steps=6))
    k = data.draw(st.integers(1, 3))
    inner, ref_params, ref = twin(name, kwargs, extras, params)
    opt = danlu.GradientAccumulation(inner, steps=k)
    sums = [None] * len(params)
    for t, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in params]
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = clone(g)
            if g is not None:
                sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)
        opt.step()
        if (t + 1) % k:
            assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
            assert not opt.updated
            continue
        assert opt.updated
        for p, s in zip(ref_params, sums, strict=True):
            p.grad = None if s is None else s.div_(k)
        ref.step()
        sums = [None] * len(params)
        for p in params:
            p.grad = None
        assert_same_run(params, inner, ref_params, ref)


@given(data=st.data())
def test_update_every_moves_parameters_only_every_kth_call(data):
    name, kwargs, extras, params, grads = data.draw(wrapped_problems(max_steps=6))
    k = data.draw(st.integers(1, 3))
    inner = build(name, kwargs, extras, params)
    opt = danlu.UpdateEvery(inner, steps=k)
    lrs = [g["lr"] for g in inner.param_groups]
    for t, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
        assert [g["lr"] for g in inner.param_groups] == lrs  # the lr is put back
        if (t + 1) % k and zero_lr_freezes(name, kwargs):
            assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
        if finite_guaranteed(name, kwargs):
            assert all(torch.isfinite(p).all() for p in params)


@st.composite
def poisoned(draw, grads):
    """The same gradients with NaN or ±Inf written into some of them."""
    out = []
    for step_grads in grads:
        row = []
        for g in step_grads:
            if g is not None and g.numel() and draw(st.booleans()):
                g = g.clone()
                index = draw(st.integers(0, g.numel() - 1))
                g.view(-1)[index] = draw(st.sampled_from([float("nan"), float("inf"), -1e999]))
            row.append(g)
        out.append(row)
    return out


@given(data=st.data())
def test_nonfinite_guard(data):
    name, kwargs, extras, params, grads = data.draw(wrapped_problems())
    grads = data.draw(poisoned(grads))
    mode = data.draw(st.sampled_from(["skip", "shrink", "raise"]))
    scope = data.draw(st.sampled_from(["tensor", "global"]))
    ratio = data.draw(st.floats(0.0, 1.0, exclude_min=True))
    inner, ref_params, ref = twin(name, kwargs, extras, params)
    opt = danlu.NonFiniteGuard(inner, mode=mode, scope=scope, shrink_ratio=ratio)
    center = {id(p): float(g.get("center", 0.0)) for g in inner.param_groups for p in g["params"]}
    windowed = counts_windows(inner)
    skipped_steps = skipped_tensors = 0
    for step_grads in grads:
        given_grads = [clone(g) for g in step_grads]
        before = [p.detach().clone() for p in params]
        state_before = copy.deepcopy(inner.state_dict()["state"])
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        has = [g is not None for g in step_grads]
        bad = [g is not None and not torch.isfinite(g).all() for g in step_grads]
        if scope == "global" and any(bad):
            bad = has
        if mode == "raise" and any(bad):
            with pytest.raises(FloatingPointError):
                opt.step()
            assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
            assert_same(state_before, inner.state_dict()["state"])
            continue
        opt.step()
        # the user's gradients are not modified
        for p, g in zip(params, given_grads, strict=True):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert_same(p.grad, g)
        # The reference steps on the finite gradients only. An optimizer with an accumulation
        # window is stepped on every call, the skipped gradients hidden (docs/wrappers.md), so
        # that its window stays aligned: a skipped micro-batch adds nothing, and a skipped
        # tensor that had a gradient earlier in the window moves at the window's end.
        if windowed or not (all(bad[i] for i in range(len(params)) if has[i]) and any(bad)):
            for p, g, b in zip(ref_params, step_grads, bad, strict=True):
                p.grad = None if b else g
            ref.step()
        for i, p in enumerate(params):
            if bad[i]:
                expected = ref_params[i].detach().clone()
                if not windowed:
                    assert torch.equal(expected, before[i])  # its gradient was not seen
                if mode == "shrink":
                    expected.sub_(center[id(p)]).mul_(ratio).add_(center[id(p)])
                    with torch.no_grad():
                        ref_params[i].copy_(expected)
                assert torch.equal(p, expected), f"parameter {i} ({mode})"
            assert torch.equal(p, ref_params[i]), f"parameter {i}"
        skipped_steps += any(bad)
        skipped_tensors += sum(bad)
        assert (opt.skipped_steps, opt.skipped_tensors) == (skipped_steps, skipped_tensors)


LAZY_INNER = ("lion", "adamw", "adax")  # a row's step depends on that row only


@given(data=st.data())
def test_lazy_rows(data):
    name = data.draw(st.sampled_from(NAMES))
    device = data.draw(st.sampled_from(DEVICES))
    dtype = data.draw(st.sampled_from(DTYPES))
    kwargs, extras, params, grads = data.draw(problems(name, dtype=dtype, device=device))
    kwargs = reproducible(kwargs)
    shape = data.draw(st.tuples(st.integers(0, 6), st.integers(0, 4)))
    table = torch.nn.Parameter(data.draw(tensors(shape, dtype, device)))
    table_grads = [data.draw(tensors(shape, dtype, device, zero_rows=True)) for _ in grads]
    lazy_moments = data.draw(st.booleans())
    params = [table, *params]
    extras = [{**extras[0]}, *extras[1:]]
    inner, ref_params, ref = twin(name, kwargs, extras, params)
    opt = danlu.Lazy(inner, params=[table], lazy_moments=lazy_moments)
    # the table's accumulation window (group 0); a row is present in it when its gradient row
    # is non-zero on any of its micro-steps so far
    window = inner.param_groups[0].get("grad_accum_steps", 1)
    seen = torch.zeros(shape[0], dtype=torch.bool, device=device)
    for t, (g_table, step_grads) in enumerate(zip(table_grads, grads, strict=True)):
        step_grads = [g_table, *step_grads]
        had_state = table in inner.state
        before = table.detach().clone()
        moments = dict(inner.state[table]) if had_state else {}
        moments = {k: v.clone() for k, v in moments.items() if isinstance(v, torch.Tensor)}
        for p, q, g in zip(params, ref_params, step_grads, strict=True):
            p.grad, q.grad = g, clone(g)
        opt.step()
        ref.step()
        if t % window == 0:
            seen.zero_()
        seen |= (g_table != 0).any(dim=-1)
        absent = ~seen
        assert torch.equal(table[absent], before[absent])
        if lazy_moments and had_state:
            for key, value in inner.state[table].items():
                if isinstance(value, torch.Tensor) and value.shape == table.shape:
                    assert torch.equal(value[absent], moments[key][absent]), key
        if t == 0 and name in LAZY_INNER:
            assert torch.equal(table[~absent], ref_params[0][~absent])
        assert torch.isfinite(table).all() or not finite_guaranteed(name, kwargs)
        # the other parameters step as without the wrapper (their steps do not see the table
        # when the optimizer treats tensors independently)
        with torch.no_grad():
            ref_params[0].copy_(table)
        for p, q in zip(params[1:], ref_params[1:], strict=True):
            assert torch.equal(p, q)


@given(data=st.data())
def test_multi_optimizer_equals_its_parts(data):
    first, second = data.draw(st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)))
    kw1, ex1, params1, grads1 = data.draw(problems(first))
    kw2, ex2, params2, grads2 = data.draw(problems(second))
    kw1, kw2 = reproducible(kw1), reproducible(kw2)
    a, ref_params1, ref_a = twin(first, kw1, ex1, params1)
    b, ref_params2, ref_b = twin(second, kw2, ex2, params2)
    opt = danlu.MultiOptimizer({"a": a, "b": b})
    for g1, g2 in zip(grads1, grads2, strict=False):
        for ps, rs, gs in ((params1, ref_params1, g1), (params2, ref_params2, g2)):
            for p, r, g in zip(ps, rs, gs, strict=True):
                p.grad, r.grad = g, clone(g)
        opt.step()
        ref_a.step()
        ref_b.step()
        assert_same_run(params1, a, ref_params1, ref_a)
        assert_same_run(params2, b, ref_params2, ref_b)


@given(data=st.data())
def test_step_in_backward_equals_backward_then_step(data):
    name, kwargs, extras, params, grads = data.draw(wrapped_problems())
    inner, ref_params, ref = twin(name, kwargs, extras, params)
    if any(g.get("nonfinite_scope") == "global" for g in inner.param_groups):
        with pytest.raises(ValueError, match="nonfinite_scope"):
            danlu.step_in_backward(inner)
        assert all(not p._post_accumulate_grad_hooks for p in params)  # no hook left behind
        return
    opt = danlu.step_in_backward(inner)
    for step_grads in grads:
        # the loss Σ (p·w).sum() has exactly the gradient w
        terms = [(p * g).sum() for p, g in zip(params, step_grads, strict=True) if g is not None]
        if not terms:
            continue
        torch.stack([t.float() for t in terms]).sum().backward()
        opt.step()
        assert all(p.grad is None for p in params)  # freed inside backward
        for q, g in zip(ref_params, step_grads, strict=True):
            q.grad = g
        ref.step()
        assert_same_run(params, inner, ref_params, ref)
    opt.remove()


# ----------------------------------------------------------------------------------------------
# Invalid arguments: ValueError, the inner optimizer unchanged


def bad_steps():
    return st.one_of(st.integers(max_value=0), st.sampled_from([1.5, True, "2", None, 2.0]))


INVALID = {
    "GradientAccumulation": (danlu.GradientAccumulation, "steps", bad_steps()),
    "UpdateEvery": (danlu.UpdateEvery, "steps", bad_steps()),
    "NonFiniteGuard.mode": (
        lambda o, mode: danlu.NonFiniteGuard(o, mode=mode),
        "mode",
        st.sampled_from(["ignore", "", None, 1]),
    ),
    "NonFiniteGuard.scope": (
        lambda o, scope: danlu.NonFiniteGuard(o, scope=scope),
        "scope",
        st.sampled_from(["model", None, 0]),
    ),
    "NonFiniteGuard.shrink_ratio": (
        lambda o, r: danlu.NonFiniteGuard(o, shrink_ratio=r),
        "shrink_ratio",
        st.one_of(
            st.floats(max_value=0.0),
            st.floats(min_value=1.0, exclude_min=True),
            st.sampled_from([float("nan"), "0.9", None]),
        ),
    ),
    "Lazy.lazy_moments": (
        lambda o, v: danlu.Lazy(o, params=[o.param_groups[0]["params"][0]], lazy_moments=v),
        "lazy_moments",
        st.sampled_from([0, 1, "yes", None, 1.0]),
    ),
    "Lazy.params": (
        lambda o, v: danlu.Lazy(o, params=v),
        "params",
        st.sampled_from(
            [[], [torch.nn.Parameter(torch.ones(2, 2))], [torch.nn.Parameter(torch.ones(()))]]
        ),
    ),
    "accumulation_betas": (
        lambda o, b: danlu.accumulation_betas(b, 2),
        "betas",
        st.one_of(st.floats(min_value=1.0), st.floats(max_value=0.0, exclude_max=True)),
    ),
}


@pytest.mark.parametrize("wrapper", sorted(INVALID))
@given(data=st.data())
def test_invalid_wrapper_arguments(wrapper, data):
    make, arg, values = INVALID[wrapper]
    name = data.draw(st.sampled_from(NAMES))
    kwargs = reproducible(data.draw(hyperparameters(name)))
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    inner = REGISTRY[name].cls(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    inner.step()
    before = ([p.detach().clone() for p in params], copy.deepcopy(inner.state_dict()))
    with pytest.raises(ValueError, match=arg):
        make(inner, data.draw(values))
    assert all(torch.equal(a, p) for a, p in zip(before[0], params, strict=True))
    assert_same(before[1], inner.state_dict())


NOT_PER_PARAMETER = {
    "accumulation": lambda ps: danlu.GradientAccumulation(danlu.Lion(ps), steps=2),
    "update-every": lambda ps: danlu.UpdateEvery(danlu.Lion(ps), steps=2),
    "global-guard": lambda ps: danlu.NonFiniteGuard(danlu.Lion(ps), scope="global"),
    "tiger-global": lambda ps: danlu.Tiger(ps, nonfinite_scope="global"),
    "multi-accumulation": lambda ps: danlu.MultiOptimizer(
        [danlu.GradientAccumulation(danlu.Lion(ps), steps=2)]
    ),
    "twice": lambda ps: danlu.step_in_backward(danlu.Lion(ps)),
}


@pytest.mark.parametrize("case", sorted(NOT_PER_PARAMETER))
def test_invalid_step_in_backward_leaves_no_new_hooks(case):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    bad = NOT_PER_PARAMETER[case](params)
    hooks = [len(p._post_accumulate_grad_hooks or {}) for p in params]
    with pytest.raises(ValueError):
        danlu.step_in_backward(bad)
    assert [len(p._post_accumulate_grad_hooks or {}) for p in params] == hooks


@given(data=st.data())
def test_multi_optimizer_rejects_shared_parameters(data):
    shape = data.draw(SHAPES)
    shared = torch.nn.Parameter(torch.zeros(shape))
    other = torch.nn.Parameter(torch.zeros(shape))
    a = danlu.Lion([shared], lr=1e-3)
    b = danlu.AdamW([other, shared], lr=1e-3)
    with pytest.raises(ValueError, match="disjoint"):
        danlu.MultiOptimizer({"a": a, "b": b})
    with pytest.raises(ValueError, match="disjoint"):
        danlu.MultiOptimizer({"a": a, "c": danlu.Lion([other], lr=1e-3)}).add_param_group(
            {"params": [shared]}, "c"
        )

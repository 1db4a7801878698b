"""The accumulation windows of the wrappers (``UpdateEvery``, ``GradientAccumulation``) are the
wrapper's, not each parameter's.

The rule is the one of the optimizers' own ``grad_accum_steps`` (docs/wrappers.md): the window
is a property of the ``step()`` calls; a parameter without a gradient on a micro-step adds
nothing, and a parameter with a gradient anywhere in the window moves at the window's end, a
micro-batch without its gradient counting as zero (the window's mean is Σ of its gradients / k,
as exact accumulation of ``.grad`` over the k micro-batches gives). For ``UpdateEvery`` (the
blog's "no-code" accumulation, kexue 8634: the inner optimizer's EMA on every micro-step with
β̃ = 1 − (1 − β)/k, lr × χ) that means: a parameter with no gradient on the window's last
micro-step, but one earlier in the window, is stepped there with a zero gradient.

The oracles are NumPy float64 re-implementations of the inner optimizers (tests/reference.py),
stepped micro-step by micro-step with that rule, never the code under test.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from reference import adamw_step, tiger_step
from torch import nn

import danlu
from danlu.wrappers._base import WRAPPERS_KEY

F64 = torch.float64
K = 3
ADAMW = {"lr": 0.01, "betas": danlu.accumulation_betas((0.9, 0.99), K), "eps": 1e-8, "wd": 0.01}
TIGER = {"lr": 0.05, "beta": danlu.accumulation_betas(0.9, K), "wd": 0.01, "rms_floor": 1e-3}
SHAPES = [(4, 6), (5,), (3, 2)]


# ----------------------------------------------------------------------------------------------
# NumPy oracles


def update_every_oracle(name, thetas, grads, k):
    """UpdateEvery(inner, k) micro-step by micro-step: the inner step (lr × χ) on every call for
    each parameter with a gradient; on a window's last call also, with a zero gradient, for a
    parameter with a gradient earlier in the window. ``grads[call][param]``: array or None.
    Returns [(θ, m)] per parameter."""
    out = []
    for i, theta in enumerate(thetas):
        theta = np.array(theta, dtype=np.float64)
        m, v, n = np.zeros_like(theta), np.zeros_like(theta), 0
        seen = False
        for call, row in enumerate(grads):
            g = row[i]
            closes = (call + 1) % k == 0
            if g is None and closes and seen:
                g = np.zeros_like(theta)
            if g is not None:
                seen = True
                lr_scale = 1.0 if closes else 0.0
                if name == "adamw":
                    n += 1
                    hp = {**ADAMW, "lr": ADAMW["lr"] * lr_scale}
                    theta, m, v = adamw_step(theta, m, v, g, n, **hp)
                else:
                    hp = {**TIGER, "lr": TIGER["lr"] * lr_scale}
                    kind = "matrix" if theta.ndim == 2 else "elementwise"
                    theta, m = tiger_step(theta, m, g, kind=kind, **hp)
            if closes:
                seen = False
        out.append((theta, m))
    return out


def accumulation_oracle(thetas, grads, k):
    """GradientAccumulation(AdamW, k): one AdamW step per window on Σ(present gradients)/k; a
    parameter without a gradient in the whole window is not stepped."""
    out = []
    for i, theta in enumerate(thetas):
        theta = np.array(theta, dtype=np.float64)
        m, v, n = np.zeros_like(theta), np.zeros_like(theta), 0
        for w in range(len(grads) // k):
            present = [row[i] for row in grads[w * k : (w + 1) * k] if row[i] is not None]
            if present:
                n += 1
                hp = {**ADAMW, "betas": (0.9, 0.99)}
                theta, m, v = adamw_step(theta, m, v, sum(present) / k, n, **hp)
        out.append((theta, m))
    return out


# ----------------------------------------------------------------------------------------------
# helpers


def new_params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in shapes]


def random_grads(calls, seed=1, present=0.5, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=s) if rng.random() < present else None for s in shapes]
        for _ in range(calls)
    ]


def inner_optimizer(name, params, betas=None):
    if name == "adamw":
        b = ADAMW["betas"] if betas is None else betas
        return torch.optim.AdamW(
            params, lr=ADAMW["lr"], betas=b, eps=ADAMW["eps"], weight_decay=ADAMW["wd"],
            foreach=False,
        )  # fmt: skip
    groups = [{"params": [p], "kind": "matrix" if p.dim() == 2 else "elementwise"} for p in params]
    return danlu.Tiger(
        groups, lr=TIGER["lr"], beta=TIGER["beta"], weight_decay=TIGER["wd"],
        rms_floor=TIGER["rms_floor"],
    )  # fmt: skip


def run(opt, params, grads, start=0):
    """One ``step()`` per call; returns the calls (1-based, from ``start``) on which each
    parameter moved."""
    moved = [[] for _ in params]
    for call, row in enumerate(grads, start=start + 1):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, row, strict=True):
            p.grad = None if g is None else torch.tensor(g, dtype=p.dtype)
        opt.step()
        for i, (p, old) in enumerate(zip(params, before, strict=True)):
            if not torch.equal(p.detach(), old):
                moved[i].append(call)
    return moved


def check(name, opt, params, start, grads, k):
    expected = update_every_oracle(name, [p.numpy() for p in start], grads, k)
    for p, (theta, m) in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10, atol=1e-13)
        if p in opt.state:
            np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-10, atol=1e-13)
        else:
            assert not m.any()


# ----------------------------------------------------------------------------------------------
# UpdateEvery


@pytest.mark.parametrize("name", ["adamw", "tiger"])
def test_update_every_moves_a_parameter_without_a_gradient_on_the_closing_call(name):
    """The repro: k = 3, the second tensor has gradients on calls 1 and 2 but none on call 3,
    which closes the window. It must move on call 3 with the others, not stay put."""
    params = new_params()
    start = [p.detach().clone() for p in params]
    opt = danlu.UpdateEvery(inner_optimizer(name, params), steps=K)
    grads = random_grads(2 * K, present=1.0)
    grads[2][1] = None
    moved = run(opt, params, grads)
    assert moved == [[3, 6]] * 3
    check(name, opt, params, start, grads, K)


@pytest.mark.parametrize("name", ["adamw", "tiger"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_update_every_missing_gradients_follow_the_window(name, seed):
    params = new_params(seed=seed)
    start = [p.detach().clone() for p in params]
    grads = random_grads(6 * K, seed=seed)
    # always covered: a gradient early in a window but none on its last call; none in a
    # whole window; only on the last call of a window
    grads[0][0], grads[1][0], grads[2][0] = np.ones(SHAPES[0]), None, None
    grads[3][1] = grads[4][1] = grads[5][1] = None
    grads[6][2], grads[7][2], grads[8][2] = None, None, np.full(SHAPES[2], -0.5)
    opt = danlu.UpdateEvery(inner_optimizer(name, params), steps=K)
    moved = run(opt, params, grads)
    for i, calls in enumerate(moved):
        windows = {
            (w + 1) * K for w in range(6) if any(row[i] is not None for row in grads[w * K :][:K])
        }
        assert set(calls) == windows  # a gradient in the window: it moves at its end
    check(name, opt, params, start, grads, K)


def test_update_every_add_param_group_mid_window():
    """A group added mid-window joins the current window: its gradient on call 2 makes it move
    on call 3, the window's end, even with no gradient on call 3."""
    params = new_params()
    opt = danlu.UpdateEvery(inner_optimizer("adamw", params[:2]), steps=K)
    grads = random_grads(2 * K, present=1.0, seed=4)
    grads[2][2] = None
    moved_first = run(opt, params[:2], [row[:2] for row in grads[:1]])
    late = params[2].detach().clone()
    opt.add_param_group({"params": [params[2]]})
    moved = run(opt, params, grads[1:], start=1)
    assert moved_first == [[], []]
    assert moved == [[3, 6]] * 3
    series = [[None]] + [row[2:] for row in grads[1:]]  # it joins on call 2
    [(theta, _)] = update_every_oracle("adamw", [late.numpy()], series, K)
    np.testing.assert_allclose(params[2].detach().numpy(), theta, rtol=1e-10, atol=1e-13)


def test_update_every_failed_closing_step_keeps_the_window():
    """A closing step that raises leaves the window (and .grad) as it was: the retry moves the
    parameter without a gradient on it, as an uninterrupted run does."""
    params = new_params()
    opt = danlu.UpdateEvery(inner_optimizer("adamw", params), steps=K)
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    twin = danlu.UpdateEvery(inner_optimizer("adamw", twin_params), steps=K)
    grads = random_grads(K, present=1.0, seed=5)
    grads[2][0] = None
    run(opt, params, grads[:2])
    run(twin, twin_params, grads)

    def refuse(optimizer, args, kwargs):
        raise RuntimeError("refused")

    hook = opt.optimizer.register_step_pre_hook(refuse)
    for p, g in zip(params, grads[2], strict=True):
        p.grad = None if g is None else torch.tensor(g)
    state = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="refused"):
        opt.step()
    hook.remove()
    assert params[0].grad is None
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert _same(opt.state_dict(), state)
    moved = run(opt, params, grads[2:], start=2)
    assert moved == [[3]] * 3
    for a, b in zip(params, twin_params, strict=True):
        assert torch.equal(a, b)


def _same(a, b):
    """Equal state dicts: tensors bit for bit, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _state_copy(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_update_every_resume_mid_window_is_bit_identical(how):
    params = new_params()
    opt = danlu.UpdateEvery(inner_optimizer("adamw", params), steps=K)
    grads = random_grads(3 * K, present=1.0, seed=6)
    grads[4][1] = grads[5][1] = None  # seen on call 4 only: moves on call 6
    run(opt, params, grads[:4])
    saved_params = [p.detach().clone() for p in params]
    if how == "state_dict":
        saved = _state_copy(opt)
    else:
        twin = copy.deepcopy({"params": params, "opt": opt})
    run(opt, params, grads[4:], start=4)
    if how == "state_dict":
        params2 = [nn.Parameter(p.clone()) for p in saved_params]
        opt2 = danlu.UpdateEvery(inner_optimizer("adamw", params2), steps=K)
        opt2.load_state_dict(saved)
    else:
        params2, opt2 = twin["params"], twin["opt"]
    moved = run(opt2, params2, grads[4:], start=4)
    assert moved[1] == [6, 9]
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)


def test_update_every_old_checkpoint_without_the_window_record_loads():
    """danlu 0.1.0 saved only the micro-step: it loads, with no parameter seen so far."""
    params = new_params()
    opt = danlu.UpdateEvery(inner_optimizer("adamw", params), steps=K)
    run(opt, params, random_grads(1, present=1.0))
    saved = _state_copy(opt)
    record = saved[WRAPPERS_KEY][-1]
    del record["seen"]
    opt2 = danlu.UpdateEvery(inner_optimizer("adamw", new_params()), steps=K)
    opt2.load_state_dict(saved)
    assert opt2.micro_step == 1


@pytest.mark.parametrize(
    "seen", [[7], [-1], ["a"], [True], "0", {0: 1}, [0, 0]], ids=lambda s: repr(s)
)
def test_update_every_bad_window_record_is_refused_before_loading(seen):
    params = new_params()
    opt = danlu.UpdateEvery(inner_optimizer("adamw", params), steps=K)
    run(opt, params, random_grads(1, present=1.0))
    saved = _state_copy(opt)
    saved[WRAPPERS_KEY][-1]["seen"] = seen
    fresh = danlu.UpdateEvery(inner_optimizer("adamw", new_params()), steps=K)
    with pytest.raises(ValueError, match="UpdateEvery"):
        fresh.load_state_dict(saved)
    assert fresh.micro_step == 0 and not fresh.state


def test_update_every_sparse_gradient_closes_with_an_empty_sparse_gradient():
    """A parameter stepped with sparse gradients (torch.optim.SparseAdam) that has none on the
    window's last call is closed with an empty sparse gradient: no row is touched (SparseAdam
    moves the rows it is given), and the optimizer does not refuse a dense one."""
    table = nn.Parameter(torch.randn(5, 2, dtype=F64))
    other = nn.Parameter(torch.randn(3, dtype=F64))
    opt = danlu.UpdateEvery(torch.optim.SparseAdam([table], lr=0.1), steps=2)
    plain = danlu.UpdateEvery(torch.optim.Adam([other], lr=0.1), steps=2)
    index = torch.tensor([[1, 3]])
    table.grad = torch.sparse_coo_tensor(
        index, torch.ones(2, 2, dtype=F64), (5, 2), check_invariants=True
    )
    other.grad = torch.ones(3, dtype=F64)
    opt.step()
    plain.step()
    table.grad = other.grad = None
    before, other_before = table.detach().clone(), other.detach().clone()
    opt.step()  # closes: the table is stepped with an empty sparse gradient
    plain.step()  # and the dense parameter with a zero one: it moves on its momentum
    assert table.grad is None and other.grad is None
    assert torch.equal(table.detach(), before)  # SparseAdam moves only the rows it is given
    assert opt.state[table]["step"] == 2
    assert not torch.equal(other.detach(), other_before)


def test_guard_keeps_update_every_windows_aligned():
    """NonFiniteGuard around UpdateEvery: a call whose gradients are all skipped still counts
    (the guard steps UpdateEvery with them hidden), so updates stay on every k-th call."""
    params = new_params()
    start = [p.detach().clone() for p in params]
    inner = danlu.UpdateEvery(inner_optimizer("adamw", params), steps=K)
    opt = danlu.NonFiniteGuard(inner, mode="skip", scope="global")
    grads = random_grads(3 * K, present=1.0, seed=7)
    bad = [list(row) for row in grads]
    bad[1][0] = np.full(SHAPES[0], np.nan)  # call 2: every tensor skipped (global scope)
    bad[5][2] = np.full(SHAPES[2], np.inf)  # call 6 closes window 2: every tensor skipped
    moved = run(opt, params, bad)
    assert moved == [[3, 6, 9]] * 3
    assert inner.micro_step == 0
    seen = [list(row) for row in grads]
    seen[1] = seen[5] = [None] * 3
    check("adamw", inner, params, start, seen, K)


# ----------------------------------------------------------------------------------------------
# GradientAccumulation


def test_gradient_accumulation_missing_gradients_give_one_step_on_the_window_mean():
    """A parameter with gradients early in a window and none on its last call (``.grad`` set to
    None by ``model.zero_grad()``), none in a whole window, or only on the last call: one step
    per window on Σ(its gradients)/k."""
    params = new_params()
    start = [p.detach().clone() for p in params]
    inner = torch.optim.AdamW(
        params, lr=ADAMW["lr"], betas=(0.9, 0.99), eps=ADAMW["eps"], weight_decay=ADAMW["wd"],
        foreach=False,
    )  # fmt: skip
    opt = danlu.GradientAccumulation(inner, steps=K)
    grads = random_grads(4 * K, seed=8)
    grads[0][0], grads[1][0], grads[2][0] = np.ones(SHAPES[0]), np.ones(SHAPES[0]), None
    grads[3][1] = grads[4][1] = grads[5][1] = None
    grads[6][2], grads[7][2], grads[8][2] = None, None, np.full(SHAPES[2], -0.5)
    moved = run(opt, params, grads)
    for i, calls in enumerate(moved):
        windows = {
            (w + 1) * K for w in range(4) if any(row[i] is not None for row in grads[w * K :][:K])
        }
        assert set(calls) == windows
    expected = accumulation_oracle([p.numpy() for p in start], grads, K)
    for p, (theta, m) in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(inner.state[p]["exp_avg"].numpy(), m, rtol=1e-10, atol=1e-13)


def test_gradient_accumulation_add_param_group_mid_window():
    """A parameter added on call 2 of a window contributes its gradients of calls 2..k, /k,
    and moves at the window's end with the others, also without a gradient on the last call."""
    params = new_params()
    start = [p.detach().clone() for p in params]
    inner = torch.optim.AdamW(
        params[:2], lr=ADAMW["lr"], betas=(0.9, 0.99), eps=ADAMW["eps"],
        weight_decay=ADAMW["wd"], foreach=False,
    )  # fmt: skip
    opt = danlu.GradientAccumulation(inner, steps=K)
    grads = random_grads(2 * K, present=1.0, seed=9)
    grads[2][2] = None
    run(opt, params[:2], [row[:2] for row in grads[:1]])
    opt.add_param_group({"params": [params[2]], "weight_decay": ADAMW["wd"]})
    moved = run(opt, params, grads[1:], start=1)
    assert moved == [[3, 6]] * 3
    seen = [list(row) for row in grads]
    seen[0][2] = None
    expected = accumulation_oracle([p.numpy() for p in start], seen, K)
    for p, (theta, _) in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10, atol=1e-13)

"""danlu.Lazy under gradient accumulation: a row's presence belongs to the accumulation window,
not to the micro-step.

Lazy updates move only the rows of an embedding table whose gradient row is non-zero (kexue
6869, 9736). Under accumulation (the inner optimizer's ``grad_accum_steps=k``,
``GradientAccumulation`` or ``UpdateEvery``) the update applies a whole window's gradients at
the window's last micro-step (kexue 8634: decay once per window, add (1-β)g/k on every
micro-step, step at the last). So a row is present in a window when its gradient row is
non-zero on *any* micro-step of it: a row seen on micro-step 1 but not on the last one still
moves at the window's end, and with ``lazy_moments=True`` its moments decay once in that
window, while a row absent from the whole window keeps its parameter (and its moments with
``lazy_moments=True``).

The oracles are NumPy float64 re-implementations worked out from the equations (Tiger and
the blog's AdamW accumulation, one step per window on the window's mean gradient; the lazy
row rule with the window's row mask), never the code under test. Also here: sparse gradients
under accumulation, 1-D tables, row-index checks and checkpoints taken mid-window.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import danlu
from danlu.wrappers._base import WRAPPERS_KEY

F64 = torch.float64
TIGER = {"lr": 0.05, "beta": 0.9, "weight_decay": 0.01, "rms_floor": 1e-3}
ADAMW = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
ROWS, DIM = 7, 3


# ----------------------------------------------------------------------------------------------
# NumPy float64 oracles


def present_rows(g):
    """r_i = 1[∃j: g_ij ≠ 0] over the last axis; for a 1-D table each entry is a row."""
    g = np.asarray(g)
    return g != 0 if g.ndim == 1 else np.any(g != 0, axis=-1)


def by_row(mask, like):
    return mask if np.ndim(like) == 1 else mask[..., None]


def tiger_eta(theta, *, lr, kind, rms_floor):
    if kind == "elementwise":
        return 0.5 * lr
    if kind == "embedding":
        rms = np.sqrt(np.mean(np.square(theta), axis=-1, keepdims=True))
    else:
        rms = np.sqrt(np.mean(np.square(theta)))
    return lr * np.maximum(rms, rms_floor)


def windows_of(grads, k):
    for w in range(len(grads) // k):
        yield grads[w * k : (w + 1) * k]


def lazy_tiger_windows(theta, grads, *, k, lazy_moments, kind="embedding", **hp):
    """Lazy Tiger, one step per window on (Σ of the window's gradients)/k (a micro-step without
    a gradient counts as zero); a window without any gradient leaves everything as it was.
    Row mask: present on any micro-step of the window. Returns [(θ, m)] after each window."""
    lr, beta, rms_floor = hp["lr"], hp["beta"], hp["rms_floor"]
    wd = 0.0 if kind == "elementwise" else hp["weight_decay"]
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    out = []
    for micro in windows_of(grads, k):
        given = [np.asarray(g, dtype=np.float64) for g in micro if g is not None]
        if given:
            present = by_row(np.logical_or.reduce([present_rows(g) for g in given]), theta)
            mean = sum(given) / k
            new_m = beta * m + (1 - beta) * mean
            m = np.where(present, new_m, m) if lazy_moments else new_m
            eta = tiger_eta(theta, lr=lr, kind=kind, rms_floor=rms_floor)
            theta = np.where(present, theta - eta * (np.sign(m) + wd * theta), theta)
        out.append((theta.copy(), m.copy()))
    return out


def lazy_adamw_windows(theta, grads, *, k, lazy_moments, v_of="mean_of_squares", **hp):
    """Lazy AdamW per window: m from Σg/k; v from Σg²/k (the blog's accumulation hidden in the
    moments) or from (Σg/k)² (exact accumulation of .grad); bias correction over the table's
    update count (every window in which it had a gradient). Returns [(θ, m, v)]."""
    lr, (b1, b2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    theta = np.array(theta, dtype=np.float64)
    m, v, n = np.zeros_like(theta), np.zeros_like(theta), 0
    out = []
    for micro in windows_of(grads, k):
        given = [np.asarray(g, dtype=np.float64) for g in micro if g is not None]
        if given:
            n += 1
            present = by_row(np.logical_or.reduce([present_rows(g) for g in given]), theta)
            mean = sum(given) / k
            square = sum(g * g for g in given) / k if v_of == "mean_of_squares" else mean * mean
            new_m = b1 * m + (1 - b1) * mean
            new_v = b2 * v + (1 - b2) * square
            m = np.where(present, new_m, m) if lazy_moments else new_m
            v = np.where(present, new_v, v) if lazy_moments else new_v
            step = (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + eps)
            theta = np.where(present, theta * (1 - lr * wd) - lr * step, theta)
        out.append((theta.copy(), m.copy(), v.copy()))
    return out


def lazy_tiger_update_every(theta, grads, *, k, lazy_moments, kind="embedding", **hp):
    """Lazy UpdateEvery(Tiger(β̃), k): Tiger's EMA on every micro-step, the parameters moved on
    the k-th. A row present anywhere in the window moves at its end; with lazy_moments the
    moments of a row follow the EMA from its first gradient in the window on (before that they
    are frozen: the documented limitation, it misses those β̃ decays). A micro-step without a
    gradient (None) is skipped, except the window's last one when the table had a gradient
    earlier in the window: there it is stepped with a zero gradient."""
    lr, beta, rms_floor = hp["lr"], hp["beta"], hp["rms_floor"]
    wd = 0.0 if kind == "elementwise" else hp["weight_decay"]
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    out = []
    for micro in windows_of(grads, k):
        seen = np.zeros(theta.shape[:-1] if theta.ndim > 1 else theta.shape, dtype=bool)
        had = False
        for j, g in enumerate(micro):
            if g is None:
                if j < k - 1 or not had:
                    continue
                g = np.zeros_like(theta)
            had = True
            g = np.asarray(g, dtype=np.float64)
            seen |= present_rows(g)
            rows = by_row(seen, theta)
            new_m = beta * m + (1 - beta) * g
            m = np.where(rows, new_m, m) if lazy_moments else new_m
            if j == k - 1:
                eta = tiger_eta(theta, lr=lr, kind=kind, rms_floor=rms_floor)
                theta = np.where(rows, theta - eta * (np.sign(m) + wd * theta), theta)
        out.append((theta.copy(), m.copy()))
    return out


# ----------------------------------------------------------------------------------------------
# Gradient scenarios: which rows have a gradient on which micro-step


def scenario(k, windows=2, *, rows=ROWS, dim=DIM, none_at=(), seed=0):
    """Micro-gradients of a (rows × dim) table, k per window (dim=0: a 1-D table of ``rows``):

    row 0 every micro-step; row 1 only on the first micro-step of each window; row 2 only on
    the second; row 3 only on the last; row 4 never; row 5 only in the first window, on its
    first micro-step; row 6 on the first and the last. ``none_at``: micro-steps (global index)
    on which the table has no gradient at all (``None``)."""
    rng = np.random.default_rng(seed)
    schedule = {
        0: lambda w, j: True,
        1: lambda w, j: j == 0,
        2: lambda w, j: j == min(1, k - 1),
        3: lambda w, j: j == k - 1,
        4: lambda w, j: False,
        5: lambda w, j: w == 0 and j == 0,
        6: lambda w, j: j in (0, k - 1),
    }
    grads = []
    for w in range(windows):
        for j in range(k):
            if w * k + j in none_at:
                grads.append(None)
                continue
            g = np.zeros((rows, dim) if dim else (rows,))
            for r in range(rows):
                if schedule[r % len(schedule)](w, j):
                    # away from zero, so that sign(m) is decided well above rounding
                    g[r] = rng.choice([-1.0, 1.0], size=g[r].shape) * rng.uniform(
                        0.5, 2.0, g[r].shape
                    )
            grads.append(g)
    return grads


def theta0(rows=ROWS, dim=DIM, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (rows, dim) if dim else (rows,))


def run(make, grads, theta, *, keys=("exp_avg",)):
    """Step ``make(table)`` on ``grads``; (θ, {key: state}) after every micro-step."""
    table = nn.Parameter(torch.tensor(theta, dtype=F64))
    opt = make(table)
    history = []
    for g in grads:
        table.grad = None if g is None else torch.tensor(g, dtype=F64)
        opt.step()
        state = opt.state[table]
        history.append(
            (
                table.detach().clone(),
                {key: state[key].clone() for key in keys if key in state},
            )
        )
    return history, opt, table


def assert_windows(history, expected, k, *, keys=("exp_avg",)):
    """Mid-window the table stays where the last window left it; at each window's end θ and
    the moments equal the oracle's."""
    start = None
    for i, (theta, state) in enumerate(history):
        w, j = divmod(i, k)
        if j < k - 1:
            if start is not None:
                assert torch.equal(theta, start), f"micro-step {i}: the table moved mid-window"
            continue
        want = expected[w]
        np.testing.assert_allclose(
            theta.numpy(), want[0], rtol=1e-12, atol=1e-14, err_msg=f"θ, window {w}"
        )
        for key, value in zip(keys, want[1:], strict=False):
            np.testing.assert_allclose(
                state[key].numpy(), value, rtol=1e-12, atol=1e-14, err_msg=f"{key}, window {w}"
            )
        start = theta


def tiger(table, k=1, kind="embedding", **extra):
    group = {"params": [table], "kind": kind}
    return danlu.Tiger([group], grad_accum_steps=k, **{**TIGER, **extra})


def adamw(table, k=1, **extra):
    return danlu.AdamW([table], grad_accum_steps=k, **{**ADAMW, **extra})


# ----------------------------------------------------------------------------------------------
# The accumulation hidden in the momentum (Tiger, AdamW with grad_accum_steps)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_tiger_window_rows(k, lazy_moments, foreach):
    grads = scenario(k, windows=3)
    history, _, _ = run(
        lambda t: danlu.Lazy(tiger(t, k, foreach=foreach), [t], lazy_moments=lazy_moments),
        grads,
        theta0(),
    )
    expected = lazy_tiger_windows(theta0(), grads, k=k, lazy_moments=lazy_moments, **TIGER)
    assert_windows(history, expected, k)
    # the rows the defect was about: seen on the first micro-step only, and never
    first, never = history[k - 1][0][1], history[k - 1][0][4]
    assert not torch.equal(first, torch.tensor(theta0()[1])), "row 1 must move"
    assert torch.equal(never, torch.tensor(theta0()[4])), "row 4 must not move"


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("none_at", [(2,), (0,), (3, 5)])
def test_tiger_window_rows_when_the_table_has_no_gradient_on_some_micro_steps(
    lazy_moments, none_at
):
    # (2,): no gradient on the last micro-step of window 0, so the inner optimizer carries the
    # table into the update with a zero gradient; (0,): the table opens window 0 on its second
    # micro-step; (3, 5): window 1 with a gradient on its middle micro-step only.
    k = 3
    grads = scenario(k, windows=3, none_at=none_at)
    history, _, _ = run(
        lambda t: danlu.Lazy(tiger(t, k), [t], lazy_moments=lazy_moments), grads, theta0()
    )
    expected = lazy_tiger_windows(theta0(), grads, k=k, lazy_moments=lazy_moments, **TIGER)
    assert_windows(history, expected, k)


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_adamw_window_rows(k, lazy_moments):
    grads = scenario(k, windows=3, none_at=(k - 1,))
    keys = ("exp_avg", "exp_avg_sq")
    history, _, _ = run(
        lambda t: danlu.Lazy(adamw(t, k), [t], lazy_moments=lazy_moments),
        grads,
        theta0(),
        keys=keys,
    )
    expected = lazy_adamw_windows(theta0(), grads, k=k, lazy_moments=lazy_moments, **ADAMW)
    assert_windows(history, expected, k, keys=keys)


def test_matrix_kind_and_several_tables():
    # Two lazy tables in one optimizer, the second a "matrix" (whole-tensor RMS): each keeps
    # its own rows; the windows are the optimizer's.
    k = 2
    grads_a = scenario(k, windows=2, seed=3)
    grads_b = scenario(k, windows=2, rows=5, dim=4, seed=4)
    a = nn.Parameter(torch.tensor(theta0(), dtype=F64))
    b = nn.Parameter(torch.tensor(theta0(5, 4, seed=5), dtype=F64))
    opt = danlu.Lazy(
        danlu.Tiger(
            [{"params": [a], "kind": "embedding"}, {"params": [b], "kind": "matrix"}],
            grad_accum_steps=k,
            **TIGER,
        ),
        [a, b],
        lazy_moments=True,
    )
    for ga, gb in zip(grads_a, grads_b, strict=True):
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        opt.step()
    want_a = lazy_tiger_windows(theta0(), grads_a, k=k, lazy_moments=True, **TIGER)[-1]
    want_b = lazy_tiger_windows(
        theta0(5, 4, seed=5), grads_b, k=k, lazy_moments=True, kind="matrix", **TIGER
    )[-1]
    np.testing.assert_allclose(a.detach().numpy(), want_a[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.detach().numpy(), want_b[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[b]["exp_avg"].numpy(), want_b[1], rtol=1e-12, atol=1e-14)


def test_decay_of_a_row_first_seen_mid_window_is_exact():
    # lazy_moments=True, Tiger(k=2): row 1 has a gradient on the second micro-step only. Its
    # momentum must be β·m + (1-β)·g/2, bit for bit what the dense optimizer gives a row that
    # has the same window (decay on the window's first micro-step, add on the second).
    k, beta = 2, 0.9
    m_before = torch.tensor([[0.3, -0.7, 0.11]], dtype=torch.float32).repeat(2, 1)
    g_first = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    g_second = torch.tensor([[0.5, 0.5, 0.5], [0.25, -3.0, 0.75]])
    table = nn.Parameter(torch.ones(2, 3))
    opt = danlu.Lazy(
        danlu.Tiger([table], lr=0.1, beta=beta, grad_accum_steps=k), [table], lazy_moments=True
    )
    table.grad = torch.zeros(2, 3)
    opt.step()  # creates the state
    table.grad = torch.zeros(2, 3)
    opt.step()
    opt.state[table]["exp_avg"].copy_(m_before)
    for g in (g_first, g_second):
        table.grad = g.clone()
        opt.step()
    expected = m_before[1].clone().mul_(beta).add_(g_second[1], alpha=(1 - beta) / k)
    assert torch.equal(opt.state[table]["exp_avg"][1], expected)
    assert not torch.equal(table.detach()[1], torch.ones(3)), "row 1 moves at the window end"


# ----------------------------------------------------------------------------------------------
# GradientAccumulation and UpdateEvery inside Lazy


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("inner", ["tiger", "adamw", "torch-adam"])
def test_gradient_accumulation_window_rows(inner, lazy_moments):
    k = 3
    grads = scenario(k, windows=3)
    if inner == "tiger":
        make_inner = tiger
    elif inner == "adamw":
        make_inner = adamw
    else:

        def make_inner(t):
            return torch.optim.AdamW(
                [t], lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                weight_decay=ADAMW["weight_decay"], foreach=False,
            )  # fmt: skip

    keys = ("exp_avg",) if inner == "tiger" else ("exp_avg", "exp_avg_sq")
    history, _, _ = run(
        lambda t: danlu.Lazy(
            danlu.GradientAccumulation(make_inner(t), steps=k), [t], lazy_moments=lazy_moments
        ),
        grads,
        theta0(),
        keys=keys,
    )
    if inner == "tiger":
        expected = lazy_tiger_windows(theta0(), grads, k=k, lazy_moments=lazy_moments, **TIGER)
    else:
        expected = lazy_adamw_windows(
            theta0(), grads, k=k, lazy_moments=lazy_moments, v_of="square_of_mean", **ADAMW
        )
    assert_windows(history, expected, k, keys=keys)


def test_gradient_accumulation_row_whose_gradients_cancel_is_present():
    # +g then −g: the window's sum is zero, but the row had a gradient (its token was there):
    # it is present, so Tiger moves it by its momentum's sign, as the oracle does.
    k = 2
    g1 = np.zeros((3, 2))
    g1[0], g1[1] = [1.0, -2.0], [0.5, 0.5]
    g2 = np.zeros((3, 2))
    g2[0], g2[1] = [-1.0, 2.0], [0.5, 0.5]
    grads = [g1, g2, g1, g2]
    start = theta0(3, 2)
    history, _, _ = run(
        lambda t: danlu.Lazy(
            danlu.GradientAccumulation(tiger(t), steps=k), [t], lazy_moments=False
        ),
        grads,
        start,
    )
    expected = lazy_tiger_windows(start, grads, k=k, lazy_moments=False, **TIGER)
    assert_windows(history, expected, k)


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("none_at", [(), (2,), (0, 5), (6, 7, 8)])
def test_update_every_window_rows(lazy_moments, none_at):
    # none_at (2,) and (0, 5): the table has no gradient on a window's last micro-step but had
    # one earlier in it, so UpdateEvery steps it there with a zero gradient and its rows seen
    # in the window move (the others keep their values); (6, 7, 8): a window without any.
    k = 3
    beta = danlu.accumulation_betas(TIGER["beta"], k)
    grads = scenario(k, windows=3, none_at=none_at)
    hp = {**TIGER, "beta": beta}
    history, _, _ = run(
        lambda t: danlu.Lazy(
            danlu.UpdateEvery(tiger(t, beta=beta), steps=k), [t], lazy_moments=lazy_moments
        ),
        grads,
        theta0(),
    )
    expected = lazy_tiger_update_every(theta0(), grads, k=k, lazy_moments=lazy_moments, **hp)
    assert_windows(history, expected, k)


@pytest.mark.parametrize("lazy_moments", [False, True])
def test_nested_windows_gradient_accumulation_around_tiger_accumulation(lazy_moments):
    # GradientAccumulation(Tiger(k=2), 2): Tiger's window spans 2 updates of 2 micro-batches,
    # i.e. 4 micro-steps on whose mean Tiger steps once.
    grads = scenario(4, windows=2)
    history, _, _ = run(
        lambda t: danlu.Lazy(
            danlu.GradientAccumulation(tiger(t, 2), steps=2), [t], lazy_moments=lazy_moments
        ),
        grads,
        theta0(),
    )
    expected = lazy_tiger_windows(theta0(), grads, k=4, lazy_moments=lazy_moments, **TIGER)
    assert_windows(history, expected, 4)


# ----------------------------------------------------------------------------------------------
# NonFiniteGuard inside Lazy: a skipped gradient has no rows


def poison(grads, calls, row=4):
    """``grads`` with a NaN in ``row`` (absent everywhere in ``scenario``) on ``calls``, and the
    oracle's view of them: a table whose gradient the guard skips has no gradient on that call."""
    bad = [None if g is None else g.copy() for g in grads]
    for call in calls:
        bad[call][row] = np.nan
    return bad


def _update_every(t, lm):
    beta = danlu.accumulation_betas(TIGER["beta"], 3)
    inner = danlu.UpdateEvery(tiger(t, beta=beta), steps=3)
    return danlu.Lazy(danlu.NonFiniteGuard(inner), [t], lazy_moments=lm)


GUARDED = {
    # (make, k of the windows, calls poisoned, calls the guard skips)
    "tiger": (
        lambda t, lm: danlu.Lazy(danlu.NonFiniteGuard(tiger(t, 3)), [t], lazy_moments=lm),
        3,
        (1, 5),
        (1, 5),
    ),
    "update-every": (_update_every, 3, (1, 5), (1, 5)),
    # the guard checks each mean of 2 micro-batches: both are skipped
    "accumulation": (
        lambda t, lm: danlu.Lazy(
            danlu.GradientAccumulation(danlu.NonFiniteGuard(tiger(t, 2)), 2),
            [t],
            lazy_moments=lm,
        ),
        4,
        (1, 6),
        (0, 1, 6, 7),
    ),
}


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("setup", sorted(GUARDED))
def test_rows_of_a_gradient_the_guard_skips_are_absent(setup, lazy_moments):
    """Lazy(NonFiniteGuard(opt)): the guard hides a table's non-finite gradient from the
    optimizer, so that micro-batch adds nothing, and none of its rows is present in the window
    (a row seen only there keeps its values, and with lazy_moments its moments), also when the
    window's end carries the table into the update."""
    make, k, calls, skipped = GUARDED[setup]
    grads = scenario(k, windows=3 if k == 3 else 2)
    bad = poison(grads, calls)
    history, _, _ = run(lambda t: make(t, lazy_moments), bad, theta0())
    seen = [None if i in skipped else g for i, g in enumerate(grads)]
    if setup == "update-every":
        hp = {**TIGER, "beta": danlu.accumulation_betas(TIGER["beta"], k)}
        expected = lazy_tiger_update_every(theta0(), seen, k=k, lazy_moments=lazy_moments, **hp)
    else:
        expected = lazy_tiger_windows(theta0(), seen, k=k, lazy_moments=lazy_moments, **TIGER)
    assert_windows(history, expected, k)
    for theta, _ in history:  # row 4 had only non-finite gradients
        assert torch.equal(theta[4], torch.tensor(theta0()[4]))


def test_rows_skipped_by_a_global_guard_are_absent():
    """scope="global": another parameter's NaN hides the table's gradient too."""
    k = 3
    grads = scenario(k, windows=3)
    table = nn.Parameter(torch.tensor(theta0(), dtype=F64))
    other = nn.Parameter(torch.ones(2, dtype=F64))
    inner = danlu.Tiger(
        [{"params": [table], "kind": "embedding"}, {"params": [other], "kind": "elementwise"}],
        grad_accum_steps=k, **TIGER,
    )  # fmt: skip
    opt = danlu.Lazy(danlu.NonFiniteGuard(inner, scope="global"), [table])
    skipped = (1, 5)
    history = []
    for call, g in enumerate(grads):
        table.grad = torch.tensor(g, dtype=F64)
        other.grad = torch.full((2,), np.nan if call in skipped else 1.0, dtype=F64)
        opt.step()
        history.append((table.detach().clone(), {"exp_avg": inner.state[table]["exp_avg"].clone()}))
    seen = [None if i in skipped else g for i, g in enumerate(grads)]
    expected = lazy_tiger_windows(theta0(), seen, k=k, lazy_moments=False, **TIGER)
    assert_windows(history, expected, k)


@pytest.mark.parametrize("lazy_moments", [False, True])
def test_guard_shrink_pulls_only_the_rows_of_the_skipped_gradient(lazy_moments):
    """mode="shrink": the guard pulls the skipped table toward its centre (θ ← θ·s with c = 0),
    but Lazy keeps the rows absent from the gradient (and from the window) where they are."""
    table = nn.Parameter(torch.tensor(theta0(5, 2), dtype=F64))
    inner = tiger(table, 1)
    opt = danlu.Lazy(
        danlu.NonFiniteGuard(inner, mode="shrink", shrink_ratio=0.5), [table],
        lazy_moments=lazy_moments,
    )  # fmt: skip
    g = np.zeros((5, 2))
    g[0], g[2] = [1.0, -1.0], [np.nan, 0.0]
    table.grad = torch.tensor(g)
    opt.step()
    expected = theta0(5, 2)
    expected[[0, 2]] *= 0.5
    np.testing.assert_array_equal(table.detach().numpy(), expected)
    assert table not in inner.state  # the optimizer never saw the gradient


def test_multi_optimizer_inside_lazy():
    k = 3
    grads = scenario(k, windows=2)
    other = nn.Parameter(torch.zeros(2, dtype=F64))

    def make(t):
        multi = danlu.MultiOptimizer({"embed": tiger(t, k), "rest": adamw(other)})
        return danlu.Lazy(multi, [t], lazy_moments=True)

    history, _, _ = run(make, grads, theta0())
    expected = lazy_tiger_windows(theta0(), grads, k=k, lazy_moments=True, **TIGER)
    assert_windows(history, expected, k)


# ----------------------------------------------------------------------------------------------
# step_in_backward around Lazy


class TwoPaths(nn.Module):
    """The embedding is used only on micro-batches with ``use_embed``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 3, dtype=F64)
        self.head = nn.Linear(3, 1, dtype=F64)

    def forward(self, tokens, use_embed):
        x = self.embed(tokens).mean(dim=1) if use_embed else torch.ones(len(tokens), 3, dtype=F64)
        return self.head(x).squeeze(-1)


def train_two_paths(model, opt, plan, record=None):
    gen = torch.Generator().manual_seed(2)
    for use_embed in plan:
        tokens = torch.randint(0, 4, (4, 2), generator=gen)  # rows 4..7 never appear
        opt.zero_grad()
        model(tokens, use_embed).pow(2).mean().backward()
        if record is not None:
            g = model.embed.weight.grad
            record.append(None if g is None else g.detach().numpy().copy())
        opt.step()


def test_step_in_backward_moves_rows_seen_earlier_in_the_window():
    # k=2; the embedding has a gradient on the first micro-batch of each window only: at the
    # window's end the optimizer carries it with a zero gradient, and its rows seen earlier
    # move, the others stay.
    k, plan = 2, [True, False, True, False]
    torch.manual_seed(0)
    model = TwoPaths()
    start = model.embed.weight.detach().numpy().copy()
    grads = []

    def make(m):
        return danlu.Lazy(
            danlu.Tiger(
                [
                    {"params": [m.embed.weight], "kind": "embedding"},
                    {"params": list(m.head.parameters())},
                ],
                grad_accum_steps=k,
                **TIGER,
            ),
            [m.embed.weight],
            lazy_moments=True,
        )

    train_two_paths(model, make(model), plan, record=grads)
    expected = lazy_tiger_windows(start, grads, k=k, lazy_moments=True, **TIGER)[-1][0]
    np.testing.assert_allclose(
        model.embed.weight.detach().numpy(), expected, rtol=1e-12, atol=1e-14
    )
    torch.manual_seed(0)
    twin = TwoPaths()
    train_two_paths(twin, danlu.step_in_backward(make(twin)), plan)
    assert torch.equal(twin.embed.weight, model.embed.weight)


# ----------------------------------------------------------------------------------------------
# Sparse gradients


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=sparse, padding_idx=0, dtype=F64)
        self.head = nn.Linear(4, 1, dtype=F64)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1)).squeeze(-1)


def train_bag(model, opt, steps, *, reset_grads=False):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 6, (5, 3), generator=gen)  # rows 6..9 never appear
        opt.zero_grad()
        if reset_grads:  # something else sets .grad to None between micro-batches
            model.zero_grad(set_to_none=True)
        (model(tokens) - 1.0).pow(2).mean().backward()
        opt.step()


def groups(model):
    return [
        {"params": [model.embed.weight], "kind": "embedding"},
        {"params": list(model.head.parameters())},
    ]


SPARSE_SETUPS = {
    "lazy(ga(tiger))": lambda m, lm: danlu.Lazy(
        danlu.GradientAccumulation(danlu.Tiger(groups(m), lr=0.05), steps=3),
        [m.embed.weight],
        lazy_moments=lm,
    ),
    "ga(lazy(tiger))": lambda m, lm: danlu.GradientAccumulation(
        danlu.Lazy(danlu.Tiger(groups(m), lr=0.05), [m.embed.weight], lazy_moments=lm), steps=3
    ),
    "lazy(tiger(k=3))": lambda m, lm: danlu.Lazy(
        danlu.Tiger(groups(m), lr=0.05, grad_accum_steps=3), [m.embed.weight], lazy_moments=lm
    ),
    "lazy(ga(adamw))": lambda m, lm: danlu.Lazy(
        danlu.GradientAccumulation(danlu.AdamW(groups(m), lr=0.01), steps=2),
        [m.embed.weight],
        lazy_moments=lm,
    ),
}


@pytest.mark.parametrize("reset_grads", [False, True])
@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("setup", sorted(SPARSE_SETUPS))
def test_sparse_gradients_under_accumulation_equal_the_dense_path(setup, lazy_moments, reset_grads):
    # nn.Embedding(sparse=True) under accumulation: each micro-batch's gradient counts once
    # (Lazy densifies it for the inner step; a densified running sum kept by
    # GradientAccumulation must not be added to again).
    models, opts = {}, {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = Bag(sparse)
        opt = SPARSE_SETUPS[setup](model, lazy_moments)
        train_bag(model, opt, 6, reset_grads=reset_grads)
        models[sparse], opts[sparse] = model, opt
    pairs = zip(models[False].named_parameters(), models[True].parameters(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opts[False].state[a]:
                torch.testing.assert_close(
                    opts[False].state[a][key], opts[True].state[b][key], rtol=1e-12, atol=1e-14,
                    msg=f"{name} {key}",
                )  # fmt: skip
    torch.manual_seed(0)
    start = Bag(False).embed.weight.detach()
    assert torch.equal(models[True].embed.weight[6:], start[6:]), "absent rows"
    assert not torch.equal(models[True].embed.weight[1:6], start[1:6])


# ----------------------------------------------------------------------------------------------
# 1-D tables: each entry is a row


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_one_dimensional_table_entries_are_rows(k, lazy_moments, sparse):
    grads = scenario(k, windows=3, dim=0)
    start = theta0(dim=0)
    table = nn.Parameter(torch.tensor(start, dtype=F64))
    opt = danlu.Lazy(tiger(table, k, kind="elementwise"), [table], lazy_moments=lazy_moments)
    history = []
    for g in grads:
        g = torch.tensor(g, dtype=F64)
        table.grad = g.to_sparse() if sparse else g
        opt.step()
        history.append((table.detach().clone(), {"exp_avg": opt.state[table]["exp_avg"].clone()}))
    expected = lazy_tiger_windows(
        start, grads, k=k, lazy_moments=lazy_moments, kind="elementwise", **TIGER
    )
    assert_windows(history, expected, k)
    assert torch.equal(table.detach()[4], torch.tensor(start[4])), "entry 4 never has a gradient"


# ----------------------------------------------------------------------------------------------
# Row indices of sparse gradients: a clear error, nothing changed


def sparse_grad(indices, rows=10, dim=3):
    values = torch.ones(len(indices), dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that invariant checks are off
        return torch.sparse_coo_tensor(
            torch.tensor([indices]), values, (rows, dim), check_invariants=False
        )


def snapshot(opt, tables):
    state = {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in tables if p in opt.state
    }
    return [p.detach().clone() for p in tables], state, [p.grad for p in tables]


@pytest.mark.parametrize("bad", [[2, 10], [-1, 3], [12]])
@pytest.mark.parametrize("wrap", ["plain", "accumulation"])
def test_out_of_range_sparse_row_index_is_a_clear_error(bad, wrap):
    good_table = nn.Parameter(torch.randn(10, 3))
    table = nn.Parameter(torch.randn(10, 3))
    inner = danlu.Tiger([good_table, table], lr=0.1, grad_accum_steps=2)
    if wrap == "accumulation":
        inner = danlu.GradientAccumulation(inner, steps=2)
    opt = danlu.Lazy(inner, [good_table, table], lazy_moments=True)
    for _ in range(3):  # some state and a window in progress
        good_table.grad, table.grad = sparse_grad([1, 4]), sparse_grad([0, 4])
        opt.step()
    good_table.grad, table.grad = sparse_grad([5]), sparse_grad(bad)
    before = snapshot(opt, [good_table, table])
    record = copy.deepcopy(opt.state_dict()[WRAPPERS_KEY])
    with pytest.raises(ValueError, match=r"params\[1\].*\(shape \(10, 3\)\).*\[0, 10\)"):
        opt.step()
    after = snapshot(opt, [good_table, table])
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b)
    for key, state in before[1].items():
        for name, value in state.items():
            assert torch.equal(value, after[1][key][name]), name
    assert all(a is b for a, b in zip(before[2], after[2], strict=True)), "gradients put back"
    assert_same_records(record, opt.state_dict()[WRAPPERS_KEY])


def assert_same_records(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_records(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_records(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("wrap", ["plain", "outer-accumulation"])
def test_gradient_sparse_over_two_axes_is_a_clear_error(wrap):
    table = nn.Parameter(torch.randn(10, 3))
    opt = danlu.Lazy(danlu.Tiger([table], lr=0.1), [table])
    if wrap == "outer-accumulation":
        opt = danlu.GradientAccumulation(opt, steps=1)
    grad = torch.zeros(10, 3)
    grad[2, 1] = 1.0
    table.grad = grad.to_sparse()  # sparse_dim 2
    before = table.detach().clone()
    with pytest.raises(ValueError, match=r"sparse_dim 2 for params\[0\] \(shape \(10, 3\)\)"):
        opt.step()
    assert torch.equal(table, before)
    assert table not in opt.state


# ----------------------------------------------------------------------------------------------
# Checkpoints mid-window


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CHECKPOINT_SETUPS = {
    "tiger(k=3)": (lambda t, lm: danlu.Lazy(tiger(t, 3), [t], lazy_moments=lm), 3),
    "adamw(k=3)": (lambda t, lm: danlu.Lazy(adamw(t, 3), [t], lazy_moments=lm), 3),
    "ga(tiger)": (
        lambda t, lm: danlu.Lazy(danlu.GradientAccumulation(tiger(t), 3), [t], lazy_moments=lm),
        3,
    ),
    "update-every(tiger)": (
        lambda t, lm: danlu.Lazy(danlu.UpdateEvery(tiger(t), 3), [t], lazy_moments=lm),
        3,
    ),
}


@pytest.mark.parametrize("lazy_moments", [False, True])
@pytest.mark.parametrize("setup", sorted(CHECKPOINT_SETUPS))
@pytest.mark.parametrize("stop", [1, 2, 4])
def test_resume_mid_window_is_exact(setup, lazy_moments, stop):
    make, k = CHECKPOINT_SETUPS[setup]
    grads = scenario(k, windows=3)
    straight, _, _ = run(lambda t: make(t, lazy_moments), grads, theta0())
    _, opt, table = run(lambda t: make(t, lazy_moments), grads[:stop], theta0())
    saved = roundtrip(opt.state_dict())
    resumed = nn.Parameter(table.detach().clone())
    opt2 = make(resumed, lazy_moments)
    opt2.load_state_dict(saved)
    for g in grads[stop:]:
        resumed.grad = torch.tensor(g, dtype=F64)
        opt2.step()
    assert torch.equal(resumed.detach(), straight[-1][0])
    for key, value in straight[-1][1].items():
        assert torch.equal(opt2.state[resumed][key], value), key


@pytest.mark.parametrize("lazy_moments", [False, True])
def test_checkpoint_without_the_row_record_loads(lazy_moments):
    # A Lazy record saved before the rows were tracked (danlu 0.1.0) has no "rows": at a
    # window boundary (no rows in flight) it resumes exactly.
    k = 3
    grads = scenario(k, windows=3)
    straight, _, _ = run(
        lambda t: danlu.Lazy(tiger(t, k), [t], lazy_moments=lazy_moments), grads, theta0()
    )
    _, opt, table = run(
        lambda t: danlu.Lazy(tiger(t, k), [t], lazy_moments=lazy_moments), grads[:k], theta0()
    )
    saved = opt.state_dict()
    old = {key: value for key, value in saved[WRAPPERS_KEY][-1].items() if key != "rows"}
    saved[WRAPPERS_KEY] = [old]
    assert old == {"type": "Lazy", "lazy_moments": lazy_moments}
    resumed = nn.Parameter(table.detach().clone())
    opt2 = danlu.Lazy(tiger(resumed, k), [resumed], lazy_moments=lazy_moments)
    opt2.load_state_dict(saved)
    for g in grads[k:]:
        resumed.grad = torch.tensor(g, dtype=F64)
        opt2.step()
    assert torch.equal(resumed.detach(), straight[-1][0])


def bad_rows(saved, how):
    record = saved[WRAPPERS_KEY][-1]
    rows = record["rows"]
    ((index, masks),) = rows.items()
    if how == "length":
        masks["window"] = torch.ones(ROWS + 1, dtype=torch.bool)
    elif how == "dtype":
        masks["window"] = torch.ones(ROWS)
    elif how == "index":
        rows[5] = rows.pop(index)
    elif how == "type":
        record["rows"] = [1, 2]
    return saved


@pytest.mark.parametrize("how", ["length", "dtype", "index", "type"])
def test_bad_row_record_is_refused_and_nothing_changes(how):
    k = 3
    grads = scenario(k, windows=1)
    _, opt, _ = run(lambda t: danlu.Lazy(tiger(t, k), [t], lazy_moments=True), grads[:1], theta0())
    saved = bad_rows(copy.deepcopy(opt.state_dict()), how)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Lazy"):
        opt.load_state_dict(saved)
    assert_same_records(before, opt.state_dict())


def test_distributed_checkpoint_helpers_save_lazy_at_window_ends():
    # danlu.distributed.get_optimizer_state_dict keeps plain records only: a window in
    # progress (its rows) is refused, a window end resumes exactly.
    from danlu.distributed import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = Bag(False)
        tiger_k = danlu.Tiger(groups(model), lr=0.05, grad_accum_steps=2)
        return model, danlu.Lazy(tiger_k, [model.embed.weight], lazy_moments=True)

    model, opt = build()
    train_bag(model, opt, 3)  # one micro-step into the second window
    with pytest.raises(ValueError, match="window in progress"):
        get_optimizer_state_dict(model, opt)
    train_bag(model, opt, 1)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert saved[WRAPPERS_KEY] == [{"type": "Lazy", "lazy_moments": True}]
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed_model, resumed_opt, saved)
    train_bag(model, opt, 4)
    train_bag(resumed_model, resumed_opt, 4)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrap", ["tiger(k=2)", "ga(tiger)"])
def test_failed_step_changes_nothing_and_the_retry_is_exact(wrap):
    # The table's row 1 first appears on the window's second micro-step (Lazy decays its
    # momentum before the inner step); a non-finite gradient elsewhere makes the inner step
    # raise: the table, its moments and the window's rows are as before, and the retry with a
    # finite gradient gives what a run without the failure gives.
    grads = scenario(2, windows=2, seed=7)

    def make(t):
        other = nn.Parameter(torch.zeros(2, dtype=F64))
        if wrap == "tiger(k=2)":
            inner = danlu.Tiger([t, other], grad_accum_steps=2, nonfinite="raise", **TIGER)
        else:
            inner = danlu.GradientAccumulation(
                danlu.Tiger([t, other], grad_accum_steps=1, nonfinite="raise", **TIGER), 2
            )
        opt = danlu.Lazy(inner, [t], lazy_moments=True)
        opt.other = other
        return opt

    straight, _, _ = run(make, grads, theta0())
    _, opt, table = run(make, grads[:3], theta0())
    table.grad = torch.tensor(grads[3], dtype=F64)
    opt.other.grad = torch.tensor([1.0, float("nan")], dtype=F64)
    before = copy.deepcopy(opt.state_dict())
    theta = table.detach().clone()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(table.detach(), theta)
    after = opt.state_dict()
    assert_same_records(before["state"], after["state"])
    assert_same_records(before[WRAPPERS_KEY][-1], after[WRAPPERS_KEY][-1])  # Lazy's record
    if wrap == "ga(tiger)":
        return  # GradientAccumulation keeps the merged gradients for its retry
    opt.other.grad = None
    table.grad = torch.tensor(grads[3], dtype=F64)
    opt.step()
    assert torch.equal(table.detach(), straight[-1][0])
    assert torch.equal(opt.state[table]["exp_avg"], straight[-1][1]["exp_avg"])
    assert opt.state_dict()[WRAPPERS_KEY][-1]["rows"] == {}, "no window in progress"

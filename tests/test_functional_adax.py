"""AdaX against docs/reference/algorithms.md#adax-tests, the blog's unnormalised form (NumPy
reference) and long runs."""

import math

import numpy as np
import pytest
import torch
from reference import adax_run
from torch import nn

import danlu
from danlu.functional import adax, adax_beta2_hat

F64 = torch.float64
SHAPES = [(6, 9), (7,), (3, 4, 5), (8, 4, 3, 3)]


def test_oracle_beta2_hat():
    # docs/reference/algorithms.md#adax-tests with β2 = 1e-4
    assert adax_beta2_hat(1, 1e-4) == 0.0
    assert adax_beta2_hat(2, 1e-4) == pytest.approx(0.500025, abs=1e-7)
    assert adax_beta2_hat(3, 1e-4) == pytest.approx(0.6667, abs=1e-4)
    assert adax_beta2_hat(10, 1e-4) == pytest.approx(0.900045, abs=1e-6)


def test_beta2_hat_far_past_a_million_steps():
    # The schedule stays a valid EMA coefficient in [0, 1], non-decreasing, → 1, with no
    # overflow, up to t = 10^9 (the blog's (1+β2)^t overflows float64 beyond t ≈ 7·10^6).
    ts = np.unique(np.logspace(0, 9, 400).astype(np.int64))
    values = [adax_beta2_hat(int(t), 1e-4) for t in ts]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert np.all(np.diff(values) >= 0)
    assert values[-1] == 1.0
    # before the float64 overflow the closed form agrees: 1 − β2/((1+β2)^t − 1)
    for t in (100, 10_000, 10**6, 5 * 10**6):
        assert adax_beta2_hat(t, 1e-4) == pytest.approx(1 - 1e-4 / ((1 + 1e-4) ** t - 1), rel=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_constant_gradient_gives_g_squared(foreach):
    # v̂_t = g² exactly for a constant g (g = 2 → 4.0), at every step.
    p = torch.zeros(3)
    m, v = torch.zeros(3), torch.zeros(3)
    for t in range(1, 51):
        adax(
            [p],
            [torch.full((3,), 2.0)],
            [m],
            [v],
            step=t,
            lr=1e-3,
            beta1=0.9,
            beta2=1e-4,
            eps=1e-6,
            foreach=foreach,
        )
        assert torch.equal(v, torch.full((3,), 4.0)), t


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_first_step_is_a_tenth_of_adams(foreach):
    # v̂_1 = g1², m1 = 0.1·g1, no m bias correction: Δθ1 = −0.1·α·sign(g1) (ε = 0).
    p = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    m, v = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    g = torch.tensor([0.3, -5.0, 2e-3], dtype=F64)
    adax([p], [g], [m], [v], step=1, lr=0.01, beta1=0.9, beta2=1e-4, eps=0.0, foreach=foreach)
    torch.testing.assert_close(
        p - torch.tensor([1.0, -2.0, 3.0], dtype=F64), -0.001 * g.sign(), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(v, g * g, rtol=1e-15, atol=0)


CONFIGS = [
    {},
    {"eps_inside_sqrt": True},
    {"weight_decay": 0.1, "beta1": 0.5},
    {"beta2": 0.05, "eps": 0.0},
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_blog_form_over_ten_steps(config, foreach):
    # danlu stores v̂ in the normalised EMA form; the reference runs the blog's (1+β2)v + β2g².
    kw = {"lr": 0.01, "beta1": 0.9, "beta2": 1e-4, "eps": 1e-6, **config}
    rng = np.random.default_rng(len(config))
    thetas = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(10)]
    params = [torch.tensor(x) for x in thetas]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        adax(params, [torch.tensor(g) for g in step_grads], ms, vs, step=t, foreach=foreach, **kw)
        history.append([p.clone() for p in params])
    ref_kw = {
        "lr": kw["lr"],
        "beta1": kw["beta1"],
        "beta2": kw["beta2"],
        "eps": kw["eps"],
        "eps_inside_sqrt": kw.get("eps_inside_sqrt", False),
        "wd": kw.get("weight_decay", 0.0),
    }
    for i, theta in enumerate(thetas):
        ref, ref_m, ref_v_hat = adax_run(theta, [g[i] for g in grads], **ref_kw)
        for t in range(10):
            np.testing.assert_allclose(history[t][i].numpy(), ref[t], rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(ms[i].numpy(), ref_m, rtol=1e-12)
        np.testing.assert_allclose(vs[i].numpy(), ref_v_hat, rtol=1e-11)


def test_eps_placement_differs():
    # docs/reference/algorithms.md#adax-differences: √v̂ + ε (code, default) vs √(v̂ + ε) (blog);
    # with ε = 1 and g = 0.5 at t = 1: Δθ = −α·0.05/(0.5 + 1) vs −α·0.05/√1.25.
    for inside, denom in ((False, 1.5), (True, math.sqrt(1.25))):
        p = nn.Parameter(torch.zeros(1, dtype=F64))
        opt = danlu.AdaX([p], lr=1.0, eps=1.0, eps_inside_sqrt=inside)
        p.grad = torch.tensor([0.5], dtype=F64)
        opt.step()
        assert p.item() == pytest.approx(-0.05 / denom, rel=1e-14)


def test_float32_stays_finite_far_past_a_million_steps():
    # The blog's v_t = g²((1+β2)^t − 1) for a constant gradient is inf in float32 at t = 10^6
    # (e^100 > 3.4e38); danlu's state at that step is v̂ = g². Resume there (and at 5·10^6) and
    # take 10 steps with new gradients: float32 stays finite and equals the blog's form
    # evaluated in float64 (finite up to t ≈ 7·10^6).
    beta2, g0 = 1e-4, 0.7
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(g0**2) * (np.float32(1 + beta2) ** np.float32(10**6) - 1))
    rng = np.random.default_rng(0)
    for start in (10**6, 5 * 10**6):
        p = nn.Parameter(torch.zeros(5))
        opt = danlu.AdaX([p], lr=1e-3)
        p.grad = torch.zeros(5)
        opt.step()  # creates the state
        opt.state[p]["step"].fill_(start)
        opt.state[p]["exp_avg"].fill_(g0)  # m after a long constant-gradient history ≈ g0
        opt.state[p]["exp_avg_sq"].fill_(g0**2)
        theta = p.detach().double().numpy().copy()
        v = np.full(5, g0**2 * math.expm1(start * math.log1p(beta2)))  # blog's v_start, float64
        m = np.full(5, g0)
        for t in range(start + 1, start + 11):
            g = rng.normal(size=5)
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            m = 0.9 * m + 0.1 * g
            v = (1 + beta2) * v + beta2 * g**2
            v_hat = v / math.expm1(t * math.log1p(beta2))
            theta = theta - 1e-3 * m / (np.sqrt(v_hat) + 1e-6)
            assert torch.isfinite(p).all()
            np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), v_hat, rtol=1e-5)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-5, atol=1e-7)
        assert opt.state[p]["step"].item() == start + 10


def test_float32_equals_blog_form_until_it_overflows():
    # With β2 = 0.02 the blog's float32 v_t overflows after ~4,500 steps. Run 6,000 steps: the
    # normalised state stays finite throughout and agrees with the blog's float32 form (v_t
    # divided by (1+β2)^t − 1, both in float32) wherever that one is finite.
    beta2, steps = 0.02, 6000
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(steps, 4)).astype(np.float32)
    p = torch.zeros(4)
    m, v_hat = torch.zeros(4), torch.zeros(4)
    v = np.zeros(4, dtype=np.float32)
    growth = np.float32(1.0)
    finite_steps = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, steps + 1):
            g = torch.from_numpy(grads[t - 1])
            adax([p], [g], [m], [v_hat], step=t, lr=1e-3, beta1=0.9, beta2=beta2, eps=1e-6)
            v = np.float32(1 + beta2) * v + np.float32(beta2) * grads[t - 1] ** 2
            growth = growth * np.float32(1 + beta2)
            blog = v / (growth - np.float32(1))
            if np.isfinite(growth) and np.all(np.isfinite(v)):
                finite_steps += 1
                np.testing.assert_allclose(v_hat.numpy(), blog, rtol=2e-4)
            assert torch.isfinite(v_hat).all() and torch.isfinite(p).all()
    assert 4000 < finite_steps < steps  # the blog's form did overflow, ours did not


def test_foreach_step_does_not_read_tensors_back_to_the_host(monkeypatch):
    params = [nn.Parameter(torch.randn(s)) for s in [(6, 13), (7,), (3, 4, 5)]]
    opt = danlu.AdaX(params, lr=1e-2, weight_decay=0.1, foreach=True)

    def forbidden(self):
        raise AssertionError(".item() called inside step()")

    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", forbidden)
            opt.step()

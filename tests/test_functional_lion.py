"""Lion's functional core against docs/reference/algorithms.md#lion-tests and the NumPy
reference."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import lion_step

import danlu
from danlu.functional import lion


def run_lion(theta, grads, *, lr, betas, wd, foreach=False, dtype=torch.float64):
    p = torch.tensor(theta, dtype=dtype)
    m = torch.zeros_like(p)
    for g in grads:
        lion(
            [p],
            [torch.tensor(g, dtype=dtype)],
            [m],
            lr=lr,
            beta1=betas[0],
            beta2=betas[1],
            weight_decay=wd,
            foreach=foreach,
        )
    return p, m


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_1_single_step(foreach):
    # docs/reference/algorithms.md#lion-tests item 1
    p, m = run_lion(
        [0.5, -0.5, 1.0], [[1.0, -2.0, 0.0]], lr=0.1, betas=(0.9, 0.99), wd=0.0, foreach=foreach
    )
    torch.testing.assert_close(p, torch.tensor([0.4, -0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([0.01, -0.02, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_2_two_steps_with_decay(foreach):
    # docs/reference/algorithms.md#lion-tests item 2; step 2 derived by hand from the equations:
    # c2 = 0.9·[0.01,-0.02,0] + 0.1·[-3,1,0] = [-0.291, 0.082, 0] → sign [-1, 1, 0]
    # θ2 = 0.95·θ1 - 0.1·sign = [0.9075, -0.9075, 1.805]
    # m2 = 0.99·m1 + 0.01·g2 = [-0.0201, -0.0098, 0]
    p, m = run_lion(
        [1.0, -1.0, 2.0], [[1.0, -2.0, 0.0]], lr=0.1, betas=(0.9, 0.99), wd=0.5, foreach=foreach
    )
    torch.testing.assert_close(p, torch.tensor([0.85, -0.85, 1.9], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([0.01, -0.02, 0.0], dtype=torch.float64))
    p, m = run_lion(
        [1.0, -1.0, 2.0],
        [[1.0, -2.0, 0.0], [-3.0, 1.0, 0.0]],
        lr=0.1,
        betas=(0.9, 0.99),
        wd=0.5,
        foreach=foreach,
    )
    torch.testing.assert_close(p, torch.tensor([0.9075, -0.9075, 1.805], dtype=torch.float64))
    torch.testing.assert_close(m, torch.tensor([-0.0201, -0.0098, 0.0], dtype=torch.float64))


def test_zero_gradient_and_momentum_only_decays():
    # docs/reference/algorithms.md#lion-edge-cases: c = 0 → sign 0 → only decay acts
    p, _ = run_lion([2.0, -3.0], [[0.0, 0.0]], lr=0.1, betas=(0.9, 0.99), wd=0.5)
    torch.testing.assert_close(p, torch.tensor([2.0 * 0.95, -3.0 * 0.95], dtype=torch.float64))


@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    steps=st.integers(1, 6),
    lr=st.floats(1e-4, 0.5),
    beta1=st.floats(0.0, 0.999),
    beta2=st.floats(0.0, 0.999),
    wd=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_numpy_reference(shape, steps, lr, beta1, beta2, wd, seed):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(steps)]
    ref_theta, ref_m = theta, np.zeros(shape)
    for g in grads:
        ref_theta, ref_m = lion_step(ref_theta, ref_m, g, lr=lr, beta1=beta1, beta2=beta2, wd=wd)
    for foreach in (False, True):
        p, m = run_lion(theta, grads, lr=lr, betas=(beta1, beta2), wd=wd, foreach=foreach)
        np.testing.assert_allclose(p.numpy(), ref_theta, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.numpy(), ref_m, rtol=1e-12, atol=1e-14)


@given(
    theta0=st.lists(st.floats(-50, 50), min_size=1, max_size=8),
    lr=st.floats(1e-3, 1.0),
    wd=st.floats(1e-3, 1.0),
    steps=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariant_bounded_by_inverse_decay(theta0, lr, wd, steps, seed):
    # docs/reference/algorithms.md#lion-tests item 4: with ηλ ≤ 1, |θ_t| ≤ max(|θ_0|, 1/λ) for every
    # coordinate and every t.
    if lr * wd > 1:
        wd = 1 / lr
    theta0 = np.array(theta0)
    bound = np.maximum(np.abs(theta0), 1 / wd)
    rng = np.random.default_rng(seed)
    p = torch.tensor(theta0, dtype=torch.float64)
    m = torch.zeros_like(p)
    for _ in range(steps):
        g = torch.tensor(rng.normal(size=theta0.shape) * 10)
        lion([p], [g], [m], lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd)
        assert np.all(np.abs(p.numpy()) <= bound * (1 + 1e-12))


@given(
    n=st.integers(1, 12),
    steps=st.integers(1, 8),
    beta=st.floats(0.0, 0.999),
    eta=st.floats(1e-4, 0.1),
    wd=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_lion_with_equal_betas_is_tiger_core(n, steps, beta, eta, wd, seed):
    # docs/reference/algorithms.md#lion-tests item 3: Lion(β, β) equals Tiger's core. A matrix-kind
    # Tiger whose rms_floor exceeds the RMS has η = α·rms_floor, so α = η / floor reproduces a fixed
    # step size.
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-1, 1, size=n)
    grads = [rng.normal(size=n) for _ in range(steps)]
    floor = 1024.0  # a power of two: η/floor·floor is exact
    a = torch.tensor(theta, requires_grad=True)
    b = torch.tensor(theta, requires_grad=True)
    lion_opt = danlu.Lion([a], lr=eta, betas=(beta, beta), weight_decay=wd)
    tiger_opt = danlu.Tiger(
        [{"params": [b], "kind": "matrix"}],
        lr=eta / floor,
        beta=beta,
        weight_decay=wd,
        rms_floor=floor,
    )
    for g in grads:
        a.grad = torch.tensor(g)
        b.grad = torch.tensor(g)
        lion_opt.step()
        tiger_opt.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        lion_opt.state[a]["exp_avg"], tiger_opt.state[b]["exp_avg"], rtol=0, atol=0
    )

"""danlu.scaling against docs/reference/algorithms.md#lr-batch-size-tests, NumPy quadrature and
synthetic gradients with a known noise covariance (tests/reference.py)."""

import math

import numpy as np
import pytest
import reference
import torch

from danlu import scaling

# -- rules of thumb, SGD -------------------------------------------------------------------------


def test_scale_lr():
    assert scaling.scale_lr(1e-3, 256, 1024, "linear") == pytest.approx(4e-3)
    assert scaling.scale_lr(1e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaling.scale_lr(1e-3, 256, 64, "sqrt") == pytest.approx(5e-4)
    batches = torch.tensor([256.0, 1024.0, 4096.0])
    assert torch.allclose(scaling.scale_lr(1.0, 256, batches, "sqrt"), torch.tensor([1.0, 2, 4]))


def test_opt_lr_sgd_spec_oracle():
    """docs/reference/algorithms.md#lr-batch-size-tests item 1: η_max = 1.1, B_noise = 1000."""
    for batch, want in [(100, 0.1), (1000, 0.55), (10000, 1.0)]:
        assert scaling.opt_lr_sgd(batch, 1.1, 1000) == pytest.approx(want, abs=1e-12)
    assert scaling.opt_lr_sgd(math.inf, 1.1, 1000) == pytest.approx(1.1)


def test_sgd_noise_scale_spec_example():
    """docs/reference/algorithms.md#lr-batch-size-tests item 4, SGD on the soft-sign example: η_max
    = 0.357143, B_noise = 1.428571, B_simple = 4."""
    s = scaling.sgd_noise_scale([1, 1, 1], [4, 4, 4], HESSIAN)
    assert s.eta_max == pytest.approx(0.357143, abs=1e-6)
    assert s.b_noise == pytest.approx(1.428571, abs=1e-6)
    assert s.b_simple == pytest.approx(4.0, abs=1e-12)
    # ΔL_max = (gᵀg)²/(2gᵀHg) = 9/16.8; ΔL(B) = ΔL_max/(1 + B_noise/B)
    assert s.loss_drop_max == pytest.approx(9 / 16.8)
    assert s.loss_drop(1.428571428571) == pytest.approx(s.loss_drop_max / 2)
    assert s.lr(1000.0) == pytest.approx(scaling.opt_lr_sgd(1000.0, s.eta_max, s.b_noise))
    # a full covariance matrix equals its diagonal form when it is diagonal
    full = scaling.sgd_noise_scale([1, 1, 1], 4 * np.eye(3), HESSIAN)
    assert full == s


def test_steps_data_tradeoff():
    """docs/reference/algorithms.md#lr-batch-size: (S/S_min - 1)(E/E_min - 1) = 1 and E = B·S."""
    s_min, e_min = 1e4, 2e7  # B_noise = 2000
    for batch in [10, 500, 2000, 8000, 1e6]:
        steps, samples = scaling.steps_data_tradeoff(s_min, e_min, batch)
        assert samples == pytest.approx(batch * steps)
        assert (steps / s_min - 1) * (samples / e_min - 1) == pytest.approx(1.0)
    steps, samples = scaling.steps_data_tradeoff(s_min, e_min, 2000)
    assert (steps, samples) == pytest.approx((2 * s_min, 2 * e_min))


# -- sign updates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,want", [(1, 0.0795357), (10, 0.2446461), (100, 0.6236862), (1000, 0.9296476)]
)
def test_opt_lr_sign_diagonal_spec_oracle(batch, want):
    """docs/reference/algorithms.md#lr-batch-size-tests item 2: κ² = 100, factor 1/√(1 + πκ²/2B)."""
    assert scaling.opt_lr_sign(batch, 1.0, 100) == pytest.approx(want, abs=1e-7)
    assert scaling.opt_lr_sign(batch, 2.5, 100) == pytest.approx(2.5 * want, abs=1e-6)


SURGE = [(1, 0.3102912), (10, 0.7895586), (100, 0.9760584), (1000, 0.8343298), (1e6, 0.8000377)]


@pytest.mark.parametrize("batch,want", SURGE)
def test_opt_lr_sign_surge_spec_oracle(batch, want):
    """docs/reference/algorithms.md#lr-batch-size-tests item 3: κ² = 100, β_noise = 0.5, η_max =
    1."""
    assert scaling.opt_lr_sign(batch, 1.0, 100, beta_noise=0.5) == pytest.approx(want, abs=1e-7)


def test_surge_peak_spec_oracle():
    peak = scaling.surge_peak_batch(100, 0.5)
    assert peak == pytest.approx(52.3598776, abs=1e-7)
    assert scaling.opt_lr_sign(peak, 1.0, 100, beta_noise=0.5) == pytest.approx(1.0, abs=1e-12)
    for batch in (peak * 0.9, peak * 1.1):
        assert scaling.opt_lr_sign(batch, 1.0, 100, beta_noise=0.5) < 1.0
    assert scaling.opt_lr_sign(math.inf, 1.0, 100, beta_noise=0.5) == pytest.approx(0.8)
    assert scaling.surge_peak_batch(100, 1.0) == math.inf  # no surge unless β_noise < 1
    assert scaling.surge_peak_batch(100, 3.0) == math.inf


def _surge_problem():
    """g = 1 (5 coordinates), H = all ones (PSD), σ² = 100: κ² = 100, T = 5, Q = 25, so
    β_noise² = T/(Q - T) = 1/4 and η_max = N/(2√(T(Q - T))) = 5/20
    (docs/reference/algorithms.md#lr-batch-size)."""
    return scaling.softsign_noise_scale(np.ones(5), np.full(5, 100.0), np.ones((5, 5)))


def test_sign_noise_scale_reproduces_surge_oracle():
    s = _surge_problem()
    assert s.kappa2 == 100 and s.beta_noise == pytest.approx(0.5)
    assert s.eta_max == pytest.approx(0.25)
    assert s.b_noise == pytest.approx(52.3598776, abs=1e-7)
    for batch, want in SURGE:
        assert s.lr(batch) / s.eta_max == pytest.approx(want, abs=1e-7)
    # docs/reference/algorithms.md#lr-batch-size-tests item 3: B_noise-2 = 31.4159265 and
    # 1/B_noise-2 - 1/B_noise = 4/(πκ²) = 0.01273240
    assert s.b_noise_2 == pytest.approx(31.4159265, abs=1e-7)
    assert 1 / s.b_noise_2 - 1 / s.b_noise == pytest.approx(0.01273240, abs=1e-8)
    assert 4 / (math.pi * 100) == pytest.approx(0.01273240, abs=1e-8)


def test_sign_loss_drop_is_the_loss_drop_at_the_optimal_lr():
    """ΔL(B) = max_η η·E[φ]·g - η²/2·E[φᵀHφ] with the mean-field moments, by direct
    maximisation over a fine grid of η, against ΔL_max/(1 + B_noise-2/B)."""
    s = _surge_problem()
    g, h = np.ones(5), np.ones((5, 5))
    for batch in (3.0, 52.0, 400.0):
        beta2 = 1 / (1 + math.pi * 100 / (2 * batch))
        mean, second = math.sqrt(beta2) * np.ones(5), beta2 * h + (1 - beta2) * np.eye(5)
        etas = np.linspace(0, 1, 200001)
        drops = etas * (mean @ g) - 0.5 * etas**2 * np.sum(h * second)
        assert s.loss_drop(batch) == pytest.approx(drops.max(), rel=1e-8)
        assert etas[drops.argmax()] == pytest.approx(s.lr(batch), abs=1e-5)


def test_expected_sign_spec_oracle():
    """docs/reference/algorithms.md#lr-batch-size-tests item 6: erf(1) = 0.842701 against the
    approximation 0.748398 (g/σ = √2, B = 1)."""
    assert scaling.expected_sign(math.sqrt(2), 1.0, 1) == pytest.approx(0.842701, abs=1e-6)
    assert scaling.expected_sign(math.sqrt(2), 1.0, 1, approx=True) == pytest.approx(
        0.748398, abs=1e-6
    )
    assert scaling.expected_sign(-0.3, 0.0, 10) == -1.0
    got = scaling.expected_sign(torch.tensor([math.sqrt(2), 0.5]), torch.tensor([1.0, 0.0]), 1)
    assert torch.allclose(got, torch.tensor([0.842701, 1.0], dtype=torch.float64), atol=1e-6)


def test_expected_sign_by_sampling():
    gen = torch.Generator().manual_seed(7)
    g, sigma2, batch = 0.2, 3.0, 16
    noisy = g + math.sqrt(sigma2 / batch) * torch.randn(
        2_000_000, generator=gen, dtype=torch.float64
    )
    want = noisy.sign().mean().item()
    assert scaling.expected_sign(g, sigma2, batch) == pytest.approx(want, abs=2e-3)


# -- soft-sign (Adam with ε) -------------------------------------------------------------------

HESSIAN = [[1.0, 0.9, 0.9], [0.9, 1.0, 0.9], [0.9, 0.9, 1.0]]
BATCHES = [1, 4, 7.853982, 20, 100, 1e4]


def test_opt_lr_softsign_spec_oracle_eps0():
    """docs/reference/algorithms.md#lr-batch-size-tests item 4, ε = 0: κ² = 4, Q = 8.4, T = 3; a
    surge peaking at B = 7.853982."""
    want = [0.297114, 0.366837, 0.372678, 0.368115, 0.360111, 0.357175]
    got = [scaling.opt_lr_softsign(b, [1, 1, 1], [4, 4, 4], HESSIAN, 0.0) for b in BATCHES]
    assert got == pytest.approx(want, abs=1e-6)
    s = scaling.softsign_noise_scale([1, 1, 1], [4, 4, 4], HESSIAN, 0.0)
    assert (s.kappa2, s.quad, s.trace) == pytest.approx((4, 8.4, 3))
    assert s.beta_noise == pytest.approx(0.745356, abs=1e-6)
    assert s.beta_noise == pytest.approx(math.sqrt(3 / 5.4))
    assert s.b_noise == pytest.approx(7.853982, abs=1e-6)
    assert s.eta_max == pytest.approx(0.372678, abs=1e-6)


def test_opt_lr_softsign_spec_oracle_eps1():
    """docs/reference/algorithms.md#lr-batch-size-tests item 4, ε = 1: κ² = 2, Q = 4.2, β*² = 2.5 >
    1: no surge, a monotone curve."""
    want = [0.316855, 0.432337, 0.464811, 0.488490, 0.501691, 0.505042]
    got = [scaling.opt_lr_softsign(b, [1, 1, 1], [4, 4, 4], HESSIAN, 1.0) for b in BATCHES]
    assert got == pytest.approx(want, abs=1e-6)
    assert got == sorted(got)
    s = scaling.softsign_noise_scale([1, 1, 1], [4, 4, 4], HESSIAN, 1.0)
    assert (s.kappa2, s.quad) == pytest.approx((2, 4.2))
    assert s.beta_noise**2 == pytest.approx(2.5)
    assert s.b_noise == math.inf


def test_opt_lr_softsign_against_moment_matrices():
    """Random problems: the closed form against η* = E[φ]·g / Σ H∘E[φφᵀ] in NumPy."""
    rng = np.random.default_rng(8)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        g = rng.normal(size=n)
        sigma2 = rng.uniform(0.1, 10, size=n)
        a = rng.normal(size=(n, n))
        h = a @ a.T + 0.1 * np.eye(n)
        eps = float(rng.choice([0.0, 0.1, 1.0, 10.0]))
        batch = float(rng.uniform(1, 1000))
        want = reference.softsign_opt_lr(batch, g, sigma2, h, eps)
        got = scaling.opt_lr_softsign(batch, g, sigma2, h, eps)
        assert got == pytest.approx(want, rel=1e-10)
        # the surge form with the derived η_max and β_noise is the same curve
        s = scaling.softsign_noise_scale(g, sigma2, h, eps)
        if s.beta_noise < 1:
            surge = scaling.opt_lr_sign(batch, s.eta_max, s.kappa2, beta_noise=s.beta_noise)
            assert surge == pytest.approx(want, rel=1e-9)


def test_opt_lr_softsign_large_eps_tends_to_sgd():
    """docs/reference/algorithms.md#lr-batch-size: as ε → ∞, η*/ε tends to SGD's with noise
    covariance (πσ²/2B)·I."""
    g, sigma2 = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 9.0])
    eps, batch = 1e5, 10.0
    got = scaling.opt_lr_softsign(batch, g, sigma2, HESSIAN, eps) / eps
    sgd = scaling.sgd_noise_scale(g, np.full(3, math.pi * sigma2.mean() / 2), HESSIAN)
    assert got == pytest.approx(sgd.lr(batch), rel=1e-6)


def test_kappa2_reduce_options():
    g, sigma2 = [1.0, 2.0, 4.0], [1.0, 1.0, 4.0]
    ratios = [1.0, 0.25, 0.25]
    h = np.eye(3)
    assert scaling.softsign_noise_scale(g, sigma2, h).kappa2 == pytest.approx(np.mean(ratios))
    assert scaling.softsign_noise_scale(g, sigma2, h, kappa2_reduce="median").kappa2 == 0.25
    assert scaling.softsign_noise_scale(g, sigma2, h, kappa2_reduce="ratio").kappa2 == (
        pytest.approx(6 / 21)
    )
    custom = scaling.softsign_noise_scale(g, sigma2, h, kappa2_reduce=lambda v, s: (v / s).max())
    assert custom.kappa2 == 1.0
    with pytest.raises(ValueError, match="kappa2_reduce"):
        scaling.softsign_noise_scale(g, sigma2, h, kappa2_reduce="mode")


@pytest.mark.parametrize(
    "a,b,want", [(0.5, 1.0, 0.33151024), (2.0, 0.5, 0.94539469), (1.0, 3.0, 0.33050548)]
)
def test_clip_mean_spec_oracle_and_quadrature(a, b, want):
    """docs/reference/algorithms.md#lr-batch-size-tests item 5: the closed form matches numerical
    integration."""
    assert scaling.clip_mean(a, b) == pytest.approx(want, abs=1e-8)
    assert scaling.clip_mean(a, b) == pytest.approx(
        reference.clip_mean_by_quadrature(a, b), abs=1e-10
    )


def test_clip_mean_random_against_quadrature_and_limits():
    rng = np.random.default_rng(9)
    for a, b in zip(rng.uniform(-4, 4, 30), rng.uniform(0.05, 6, 30), strict=True):
        want = reference.clip_mean_by_quadrature(a, b)
        assert scaling.clip_mean(float(a), float(b)) == pytest.approx(want, abs=1e-10)
    # docs/reference/algorithms.md#lr-batch-size-tests item 5
    assert scaling.clip_mean_approx(0.5, 1.0) == pytest.approx(0.2977, abs=1e-4)
    assert scaling.clip_mean(0.7, 0.0) == pytest.approx(math.erf(0.7 / math.sqrt(2)))
    # slope erf(b/√2)/b at a = 0
    slope = (scaling.clip_mean(1e-6, 2.0) - scaling.clip_mean(-1e-6, 2.0)) / 2e-6
    assert slope == pytest.approx(math.erf(2 / math.sqrt(2)) / 2, rel=1e-6)
    t = scaling.clip_mean(torch.tensor([0.5, 2.0, 0.7]), torch.tensor([1.0, 0.5, 0.0]))
    want = torch.tensor([0.33151024, 0.94539469, math.erf(0.7 / math.sqrt(2))], dtype=torch.float64)
    assert torch.allclose(t, want, atol=1e-8)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, -1, math.nan, torch.tensor([1.0, 0.0])])
def test_bad_batch(batch):
    for call in (
        lambda: scaling.opt_lr_sgd(batch, 1.0, 10),
        lambda: scaling.opt_lr_sign(batch, 1.0, 10),
        lambda: scaling.opt_lr_softsign(batch, [1.0], [1.0], [1.0], 0.0),
        lambda: scaling.scale_lr(1e-3, 256, batch, "sqrt"),
        lambda: scaling.expected_sign(1.0, 1.0, batch),
    ):
        with pytest.raises(ValueError, match="batch"):
            call()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: scaling.scale_lr(1e-3, 0, 512, "linear"), "base_batch"),
        (lambda: scaling.scale_lr(1e-3, 256, 512, "cubic"), "rule"),
        (lambda: scaling.opt_lr_sign(10, 1.0, -1.0), "kappa2"),
        (lambda: scaling.opt_lr_sign(10, 1.0, 100, beta_noise=0.0), "beta_noise"),
        (lambda: scaling.surge_peak_batch(-1.0, 0.5), "kappa2"),
        (lambda: scaling.opt_lr_sgd(10, 0.0, 100), "eta_max"),
        (lambda: scaling.opt_lr_sgd(10, 1.0, -1.0), "b_noise"),
        (lambda: scaling.softsign_noise_scale([1, 1], [1, -1], np.eye(2)), "sigma2"),
        (lambda: scaling.softsign_noise_scale([1, 1], [1, 1], np.eye(2), eps=-1), "eps"),
        (lambda: scaling.softsign_noise_scale([1, 0], [1, 1], np.eye(2)), "g must have no zero"),
        (lambda: scaling.softsign_noise_scale([1, 1], [1, 1], np.eye(3)), "hessian"),
        (lambda: scaling.softsign_noise_scale([1, 1], [1, 1], -np.eye(2)), "hessian"),
        (lambda: scaling.sgd_noise_scale([1, 1], [1, -1], np.eye(2)), "sigma"),
        (lambda: scaling.steps_data_tradeoff(0, 10, 10), "min_steps"),
        (lambda: scaling.expected_sign(1.0, -1.0, 10), "sigma2"),
        (lambda: scaling.clip_mean(1.0, -1.0), "b"),
        (lambda: scaling.b_simple([torch.ones(3), torch.ones(3)], 0), "per_device_batch"),
        (lambda: scaling.b_simple([torch.ones(3)], 4), "at least 2"),
        (lambda: scaling.b_simple([torch.ones(3), torch.ones(4)], 4), "differ"),
        (lambda: scaling.noise_scale_from_norms(1.0, 0.5, 8, 8), "big_batch"),
        (lambda: scaling.noise_scale_from_norms(-1.0, 0.5, 8, 16), "small_sq_norm"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# -- measuring the noise scale -----------------------------------------------------------------


def _synthetic_device_grads(seed, k=8, per_device=16, dim=40000):
    """K device gradients g + noise with a known, non-diagonal per-sample covariance
    Σ = diag(d²) + uuᵀ (noise = (d·z + u·w)/√b, z ~ N(0, I), w ~ N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    g = 0.1 * torch.randn(dim, generator=gen, dtype=torch.float64)
    d = torch.empty(dim, dtype=torch.float64).uniform_(0.5, 1.3, generator=gen)
    u = 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64)
    grads = []
    for _ in range(k):
        z = torch.randn(dim, generator=gen, dtype=torch.float64)
        w = torch.randn((), generator=gen, dtype=torch.float64)
        grads.append((g + (d * z + u * w) / math.sqrt(per_device)).float())
    true_trace = float((d * d).sum() + (u * u).sum())
    return grads, true_trace, float(g @ g)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_b_simple_recovers_known_noise_scale(seed):
    """docs/reference/algorithms.md#lr-batch-size-helpers: tr Σ / |g|² within 5 % (here ≈ 99)."""
    grads, true_trace, true_g2 = _synthetic_device_grads(seed)
    est = scaling.estimate_noise_scale(grads, 16)
    assert est.trace_sigma == pytest.approx(true_trace, rel=0.05)
    assert est.grad_sq_norm == pytest.approx(true_g2, rel=0.05)
    assert scaling.b_simple(grads, 16) == pytest.approx(true_trace / true_g2, rel=0.05)
    # same numbers from lists of per-parameter tensors and from the NumPy reference
    split = [[x[:15000].reshape(100, 150), x[15000:]] for x in grads]
    assert scaling.b_simple(split, 16) == pytest.approx(est.b_simple, rel=1e-9)
    trace, g2 = reference.noise_scale_from_micro_grads([x.numpy() for x in grads], 16)
    assert (est.trace_sigma, est.grad_sq_norm) == pytest.approx((trace, g2), rel=1e-9)


def test_noise_scale_from_norms_matches_variance_form():
    grads, _, _ = _synthetic_device_grads(13, k=4, dim=1000)
    stacked = torch.stack(grads).double()
    small = float(stacked.square().sum(1).mean())
    big = float(stacked.mean(0).square().sum())
    est = scaling.noise_scale_from_norms(small, big, 16, 64)
    trace, g2 = reference.noise_scale_from_micro_grads(stacked.numpy(), 16)
    assert (est.trace_sigma, est.grad_sq_norm) == pytest.approx((trace, g2), rel=1e-9)
    assert scaling.NoiseScaleEstimate(1.0, -0.5).b_simple == math.inf

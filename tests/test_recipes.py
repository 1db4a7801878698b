"""danlu.recipes and the Amos-derived schedules against docs/reference/algorithms.md#amos-tests
items 2-3 and #lion-defaults."""

import math

import pytest
import torch

import danlu
from danlu import recipes
from danlu.schedules import (
    InverseSquareDecayLR,
    InverseTimeDecayLR,
    inverse_square_decay,
    inverse_time_decay,
)

# -- sign-optimizer hyper-parameters -----------------------------------------------------------


def test_sign_optimizer_hparams_spec_oracle():
    """docs/reference/algorithms.md#amos-tests item 3 / #lion-defaults: σ = 1/√768 = 0.036084392, α0
    = 1.11e-3 → lr = 4.0054e-5, λ = 0.015381."""
    sigma = 1 / math.sqrt(768)
    assert sigma == pytest.approx(0.036084392, abs=1e-9)
    lr, wd = recipes.sign_optimizer_hparams(sigma)
    assert lr == pytest.approx(4.0054e-5, abs=1e-9)
    assert wd == pytest.approx(0.015381, abs=1e-6)
    # the absolute per-step decay η·λ = α0²/2q does not depend on σ
    for s in (0.01, 0.5):
        lr, wd = recipes.sign_optimizer_hparams(s, 2e-3, q=2.0)
        assert lr * wd == pytest.approx(2e-3**2 / 4)


def test_sign_optimizer_hparams_rms_relative():
    """Tiger's matrix lr is relative to RMS(θ) ≈ σ, so lr = α0 with the same λ: the effective
    step α0·RMS(θ) equals Lion's α0·σ."""
    hp = recipes.sign_optimizer_hparams(0.02, rms_relative=True)
    assert hp == (pytest.approx(1.11e-3), pytest.approx(1.11e-3 / 0.04))
    assert hp.lr * 0.02 == pytest.approx(recipes.sign_optimizer_hparams(0.02).lr)
    assert recipes.sign_optimizer_hparams(recipes.ELEMENTWISE_CHANGE_SCALE).lr == pytest.approx(
        0.5 * 1.11e-3
    )


def test_adamw_to_lion():
    """docs/reference/algorithms.md#lion-defaults: lr ÷ factor, λ × factor; README ViT-B/16: AdamW
    (1e-3, 1.0) → Lion (1e-4, 10)."""
    assert recipes.adamw_to_lion(1e-3, 1.0) == pytest.approx((1e-4, 10.0))
    lr, wd = recipes.adamw_to_lion(3e-4, 0.01, factor=3)
    assert (lr, wd) == pytest.approx((1e-4, 0.03))
    assert lr * wd == pytest.approx(3e-4 * 0.01)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: recipes.sign_optimizer_hparams(0.0), "init_std"),
        (lambda: recipes.sign_optimizer_hparams(-0.02), "init_std"),
        (lambda: recipes.sign_optimizer_hparams(math.inf), "init_std"),
        (lambda: recipes.sign_optimizer_hparams(0.02, 0.0), "alpha0"),
        (lambda: recipes.sign_optimizer_hparams(0.02, q=0), "q"),
        (lambda: recipes.adamw_to_lion(0.0, 0.1), "lr"),
        (lambda: recipes.adamw_to_lion(1e-3, -0.1), "weight_decay"),
        (lambda: recipes.adamw_to_lion(1e-3, 0.1, factor=0.5), "factor"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# -- Amos-derived schedules --------------------------------------------------------------------


def test_inverse_square_spec_oracle():
    """docs/reference/algorithms.md#amos-tests item 2: α0 = 1e-3, halving at T = 10000 → α0·p =
    4.1421356e-5, factor 0.5 at T."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = InverseSquareDecayLR(opt, halving_step=10000, alpha0=1e-3)
    assert sched.alpha0 * sched.rate == pytest.approx(4.1421356e-5, abs=1e-12)
    assert sched.factor(10000) == pytest.approx(0.5, rel=1e-15)
    assert inverse_square_decay(10000, 10000) == pytest.approx(0.5, rel=1e-15)
    assert inverse_square_decay(0, 10000) == 1.0


@pytest.mark.parametrize("t", [0, 1, 17, 5000, 10000, 123456, 10**7])
def test_decay_formulas(t):
    """1/(α0·p·t + 1)² with α0·p = (√2 - 1)/T, and 1/(2·α0·p0·t + 1) with 2·α0·p0 = 1/T."""
    alpha0_p = (math.sqrt(2) - 1) / 10000
    assert inverse_square_decay(t, 10000) == pytest.approx(1 / (alpha0_p * t + 1) ** 2, rel=1e-14)
    assert inverse_time_decay(t, 10000) == pytest.approx(1 / (t / 10000 + 1), rel=1e-14)


def test_inverse_time_halves_at_t():
    assert inverse_time_decay(2500, 2500) == 0.5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = InverseTimeDecayLR(opt, halving_step=2500, alpha0=1e-3)
    assert 2 * sched.alpha0 * sched.rate == pytest.approx(1 / 2500)


@pytest.mark.parametrize("cls", [InverseSquareDecayLR, InverseTimeDecayLR])
def test_alpha0_and_rate_parameterisation(cls):
    p = torch.zeros(1, requires_grad=True)
    by_rate = cls(torch.optim.SGD([p], lr=1.0), alpha0=1e-3, rate=0.05)
    by_halving = cls(torch.optim.SGD([p], lr=1.0), halving_step=by_rate.halving_step)
    for t in (0, 100, 7000, 10**6):
        assert by_rate.factor(t) == pytest.approx(by_halving.factor(t), rel=1e-14)
    if cls is InverseSquareDecayLR:  # 1/(α0·p·t + 1)² directly
        assert by_rate.factor(7000) == pytest.approx(1 / (1e-3 * 0.05 * 7000 + 1) ** 2)
    else:  # 1/(2·α0·p0·t + 1)
        assert by_rate.factor(7000) == pytest.approx(1 / (2 * 1e-3 * 0.05 * 7000 + 1))


def test_scheduler_drives_lion_with_warmup_and_resumes():
    p = torch.nn.Parameter(torch.ones(3))
    opt = danlu.Lion([p], lr=4e-5, weight_decay=0.015)
    sched = InverseSquareDecayLR(opt, halving_step=20, warmup_steps=4)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen[0] == 0.0
    assert seen[2] == pytest.approx(4e-5 * 0.5 * inverse_square_decay(2, 20))
    assert seen[20] == pytest.approx(2e-5)
    assert seen[29] == pytest.approx(4e-5 / ((math.sqrt(2) - 1) * 29 / 20 + 1) ** 2)
    other = InverseSquareDecayLR(danlu.Lion([torch.nn.Parameter(torch.ones(3))], lr=4e-5), 20)
    other.load_state_dict(sched.state_dict())
    assert other.last_epoch == 30 and other.warmup_steps == 4


@pytest.mark.parametrize(
    "kwargs,name",
    [({"halving_step": 0}, "halving_step"), ({"halving_step": -5.0}, "halving_step"),
     ({"halving_step": 10, "rate": 0.1}, "not both"), ({}, "halving_step"),
     ({"alpha0": 1e-3}, "halving_step"), ({"halving_step": 10, "alpha0": 0.0}, "alpha0"),
     ({"halving_step": 10, "warmup_steps": -1}, "warmup_steps")],
)  # fmt: skip
def test_schedule_bad_input(kwargs, name):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=name):
        InverseSquareDecayLR(opt, **kwargs)
    with pytest.raises(ValueError, match="halving_step"):
        inverse_time_decay(5, 0)


def test_recipes_reexports_schedules():
    assert recipes.InverseSquareDecayLR is InverseSquareDecayLR
    assert recipes.InverseTimeDecayLR is InverseTimeDecayLR
    assert danlu.recipes is recipes and danlu.scaling and danlu.init

"""Regression tests for what the fuzz tests (tests/test_fuzz_*.py) found, one reproduction each.
Expected values are worked out by hand from docs/reference/algorithms.md equations, as noted per
test."""

import pytest
import torch

import danlu
from danlu.core.shell import MAX_SCALAR

F16_MAX = torch.finfo(torch.float16).max  # 65504


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_eps_zero_leaves_a_never_seen_coordinate_alone(foreach):
    # Finding: ε = 0 and a coordinate whose gradient was always 0 gave 0/0 = NaN.
    # docs/reference/algorithms.md#lion-claims: with ε = 0 Adam's first step is exactly lr·sign(g);
    # a zero gradient: no step.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = danlu.AdamW([p], lr=0.1, eps=0.0, weight_decay=0.0, foreach=foreach)
    p.grad = torch.tensor([0.5, 0.0, -2.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 2.0, 3.1]))
    p.grad = torch.zeros(3)  # β2 ≥ β1²: m² ≤ v, so v ≠ 0 wherever m ≠ 0
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_fp16_default_eps_does_not_vanish_into_nan(foreach):
    # Finding: in fp16 ε = 1e-8 rounds away (1e-8 + 0 = 0), so a zero gradient gave NaN.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    opt = danlu.AdamW([p], lr=0.1, weight_decay=0.0, foreach=foreach)
    p.grad = torch.tensor([0.5, 0.0], dtype=torch.float16)
    opt.step()
    # m̂/(√v̂ + ε) = 0.5/0.5 = 1 for the first coordinate: 1 − 0.1 rounded to fp16
    expected = torch.tensor([0.9, 2.0], dtype=torch.float16)
    assert torch.equal(p.detach(), expected)


@pytest.mark.parametrize("foreach", [False, True])
def test_adax_eps_zero_leaves_a_never_seen_coordinate_alone(foreach):
    # docs/reference/algorithms.md#adax-tests: the first step is −0.1·α·sign(g₁) (no bias correction
    # on m); 0 for g = 0.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = danlu.AdaX([p], lr=0.1, eps=0.0, foreach=foreach)
    p.grad = torch.tensor([0.5, 0.0, -2.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.99, 2.0, 3.01]))


@pytest.mark.parametrize("foreach", [False, True])
def test_adafactor_eps1_zero_with_zero_gradients(foreach):
    # Finding: ε1 = 0 and a zero gradient gave rsqrt(0)·0 = NaN.
    # Vector (docs/reference/algorithms.md#adafactor-tests item 2 with ε1 = 0): t = 1, v = g², u =
    # g/|g| = [1, 0], RMS(u) = 0.707 < 1, no parameter scale: Δθ = −0.01·u.
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = danlu.AdaFactor(
        [p], lr=0.01, eps1=0.0, multiply_by_parameter_scale=False, foreach=foreach
    )
    p.grad = torch.tensor([0.5, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.99, 4.0]))
    # Factored 2×2, g = [[1, 2], [0, 0]]: row means R = [2.5, 0], column means C = [0.5, 2],
    # mean(R) = 1.25, so v̂ row 0 = R₀·C/mean(R) = [1, 4] and u row 0 = [1, 1]; row 1 has
    # R = 0 and zero gradients: u = 0 there. RMS(u) = 0.707 < 1: Δθ = −0.01·u.
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = danlu.AdaFactor(
        [w],
        lr=0.01,
        eps1=0.0,
        multiply_by_parameter_scale=False,
        min_dim_size_to_factor=0,
        foreach=foreach,
    )
    w.grad = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[0.99, 0.99], [1.0, 1.0]]))
    w.grad = torch.zeros(2, 2)  # all-zero statistics from here on: no step, no NaN
    opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_adafactor_zero_row_next_to_large_gradients(foreach):
    # Finding: with the default ε1 = 1e-30 a zero gradient row next to rows of 1e8 made
    # R₀/mean(R) = 1e-30/7.5e15 underflow to 0 in fp32, and rsqrt(0)·0 = NaN.
    # Rows 1-3 have g = 1e8: R = 1e16 there, C = 7.5e15, mean(R) = 7.5e15, v̂ = R_i, so u = 1
    # in rows 1-3 and 0 in row 0. RMS(u) = √(12/16) < 1: Δθ = −1e-3·u.
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = danlu.AdaFactor(
        [w], lr=1e-3, multiply_by_parameter_scale=False, min_dim_size_to_factor=0, foreach=foreach
    )
    g = torch.full((4, 4), 1e8)
    g[0] = 0.0
    w.grad = g
    opt.step()
    expected = torch.full((4, 4), 0.999)
    expected[0] = 1.0
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize(
    ("name", "arg"),
    [("lion", "lr"), ("tiger", "weight_decay"), ("amos", "eps"), ("adafactor", "eps2")],
)
def test_hyperparameters_beyond_float32_raise_value_error(name, arg):
    # Finding: 1e39 passed the checks, then torch raised "value cannot be converted to type
    # float without overflow" in the middle of a step (some tensors already updated).
    cls = danlu.REGISTRY[name].cls
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=arg):
        cls([p], **{arg: 1e39})
    cls([p], **{arg: MAX_SCALAR})  # the largest float32 is accepted


def test_adamw_first_step_size_beyond_float32_raises_value_error():
    # Finding: lr/(1 − β1) = 6.8e38 overflowed float32 inside addcdiv_ and torch raised in the
    # middle of the step. Now a ValueError up front (at construction and before each step).
    p = torch.nn.Parameter(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"lr / \(1 - betas\[0\]\)"):
        danlu.AdamW([p], lr=MAX_SCALAR, betas=(0.5, 0.9))
    opt = danlu.AdamW([p], lr=MAX_SCALAR / 2, betas=(0.5, 0.9), weight_decay=0.0)
    p.grad = torch.tensor([1.5])
    opt.step()  # lr/(1 − β1) = MAX_SCALAR; m̂/√v̂ = (0.75/0.5)/1.5 = 1, so θ = 1.5 − lr
    assert p.item() == -MAX_SCALAR / 2
    opt.param_groups[0]["lr"] = MAX_SCALAR
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    assert p.item() == -MAX_SCALAR / 2


def test_booleans_are_checked_as_booleans():
    # Finding: `x in (False, True)` accepted 0, 1 and 1.0.
    p = torch.nn.Parameter(torch.ones(2, 2))
    for value in (0, 1, 1.0):
        with pytest.raises(ValueError, match="eps_inside_sqrt"):
            danlu.AdamW([p], eps_inside_sqrt=value)
        with pytest.raises(ValueError, match="lazy_moments"):
            danlu.Lazy(danlu.Lion([p]), params=[p], lazy_moments=value)
    # Finding: lr=None overwrote an invalid relative_step before it was checked.
    with pytest.raises(ValueError, match="relative_step"):
        danlu.AdaFactor([p], lr=None, relative_step=0)


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_fp16_momentum_reads_the_gradient_saturated_instead_of_overflowing(name):
    # Finding: an fp16 momentum (state_dtype) overflowed to inf for gradients beyond 65504,
    # and the next opposite gradient turned it into NaN (inf − inf). The store was first made
    # to saturate at 65504; now the gradient itself is read saturated at half of fp16's range,
    # 32752 (docs/optimizers/lion.md, "Huge gradients"), so the momentum is an average of
    # values in range and never needs to saturate.
    # Lion, β = (0.9, 0.99), lr = 0.1, θ₀ = 0: g₁ = 1e8 is read as 32752: c = 3275.2 > 0,
    # θ₁ = −0.1, m₁ = 0.01·32752; g₂ = −1e8 as −32752: c = 0.9·m₁ − 3275.2 < 0, θ₂ = 0,
    # m₂ = 0.99·m₁ − 327.52. Tiger (β = 0.9, elementwise, η = 0.5·lr): m₁ = 0.1·32752,
    # θ₁ = −0.05; m₂ = 0.9·m₁ − 3275.2 < 0, θ₂ = 0.
    bound = F16_MAX / 2
    p = torch.nn.Parameter(torch.zeros(1))
    if name == "lion":
        opt = danlu.Lion([p], lr=0.1, betas=(0.9, 0.99), state_dtype=torch.float16)
        first, beta = -0.1, 0.99
    else:
        opt = danlu.Tiger([p], lr=0.1, beta=0.9, weight_decay=0.0, state_dtype=torch.float16)
        first, beta = -0.05, 0.9
    p.grad = torch.tensor([1e8])
    opt.step()
    m1 = torch.tensor((1 - beta) * bound, dtype=torch.float64).half()
    assert opt.state[p]["exp_avg"].item() == m1.item()
    torch.testing.assert_close(p.detach(), torch.tensor([first]))
    p.grad = torch.tensor([-1e8])
    opt.step()
    m2 = torch.tensor(beta * m1.double().item() - (1 - beta) * bound).half()
    torch.testing.assert_close(
        opt.state[p]["exp_avg"].float(), m2.float().view(1), rtol=2**-10, atol=0
    )
    torch.testing.assert_close(p.detach(), torch.tensor([0.0]), atol=1e-7, rtol=0)


def test_update_every_with_amos_momentum_moves_on_zero_lr_steps():
    # Documented (UpdateEvery docstring), found by the fuzz test of UpdateEvery: Amos's
    # momentum is an EMA of its lr-scaled steps δ, applied after them, so lr = 0 leaves
    # θ += μ·m ≠ 0 once m ≠ 0.
    p = torch.nn.Parameter(torch.ones(3))
    opt = danlu.UpdateEvery(danlu.Amos([p], lr=0.5, eta=0.5, momentum=0.5), steps=2)
    for _ in range(2):  # micro-step 1 (lr 0: m stays 0), micro-step 2 (an update: m ≠ 0)
        p.grad = torch.ones(3)
        opt.step()
    before = p.detach().clone()
    p.grad = torch.ones(3)
    opt.step()  # lr = 0 here
    assert not torch.equal(p.detach(), before)


def test_fp16_adafactor_momentum_saturates_instead_of_overflowing():
    # Finding (after the kernels merge): fp16 parameters keep AdaFactor's momentum in fp16; with
    # an explicit β2 ≈ 1 the first v̂ is (1 − β2)·g² ≈ 5e-16, the unit update g/√v̂ ≈ 6.7e7
    # overflowed fp16 to inf, and lerp(m, inf, 0.5) gave NaN. Now the cast saturates at 65504:
    # m = 0.5·65504 = 32752 (docs/reference/algorithms.md#adafactor-rule with the update rounded to
    # the largest fp16 value).
    for foreach in (False, True):
        p = torch.nn.Parameter(torch.tensor(1.541, dtype=torch.float16))
        opt = danlu.AdaFactor(
            [p], lr=1e-3, beta1=0.5, beta2=1 - 2**-52, eps1=0.0, clip_threshold=None,
            multiply_by_parameter_scale=False, foreach=foreach,
        )  # fmt: skip
        p.grad = torch.tensor(1.541, dtype=torch.float16)
        opt.step()
        assert opt.state[p]["exp_avg"].item() == 32752.0
        assert torch.isfinite(p).all()
        assert p.item() == pytest.approx(1.541 - 1e-3 * 32752, abs=0.05)


def test_finite_mask_is_exact_when_a_sum_of_finite_values_overflows():
    # the CPU check sums each tensor first; 3e38 + 3e38 overflows float32 although both are
    # finite, so such a tensor must be re-checked exactly
    from danlu.functional import finite_mask

    big = torch.full((4,), 3e38)
    nan = torch.tensor([1.0, float("nan")])
    inf = torch.tensor([float("inf"), -float("inf")])  # the sum is NaN
    half = torch.full((3,), 6e4, dtype=torch.float16)  # sums beyond fp16's range
    assert finite_mask([big, nan, inf, half, torch.ones(0)]).tolist() == [
        True, False, False, True, True,
    ]  # fmt: skip


@pytest.mark.parametrize("foreach", [False, True])
def test_adafactor_eps1_below_the_smallest_normal_number(foreach):
    # Found in review: the floor applied only for ε1 == 0, but ε1 = 1e-46 is lost in fp32
    # (g² + ε1 = 0 for g = 0) and gave NaN all the same. By hand
    # (docs/reference/algorithms.md#adafactor-rule, t = 1, β̂ = 0): v = g² = [1, 0], u = [1, 0],
    # RMS(u) = 0.707 (no clipping), RMS(θ) = √2.5, so θ0 = 1 − 0.01·√2.5 and θ1 stays 2.
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = danlu.AdaFactor([p], lr=1e-2, eps1=1e-46, foreach=foreach)
    p.grad = torch.tensor([1.0, 0.0])
    opt.step()
    expected = torch.tensor([1.0 - 0.01 * 2.5**0.5, 2.0])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_fp16_beta2_near_one_does_not_crash(foreach):
    # Finding (test_fuzz_wrappers, deep profile): with β2 = 1 − 2⁻⁵² the overflow-safe bound
    # √(max/(2(1 − β2))) ≈ 1.7e10 exceeds fp16's range, and clamping an fp16 gradient to it
    # raised "value cannot be converted to type c10::Half without overflow" on every step
    # (any β2 > 1 − 7.6e-6 with fp16 parameters). The bound is now at most the dtype's largest
    # value, so every finite fp16 gradient is read unchanged.
    from danlu.core.overflow import saturate, square_bound

    assert square_bound(torch.float16, weight=2**-52) == F16_MAX
    g = torch.tensor([-F16_MAX, 1.0, float("inf")], dtype=torch.float16)
    assert saturate(g, 1e10).tolist() == [-F16_MAX, 1.0, F16_MAX]
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
    opt = danlu.AdamW([p], lr=0.1, betas=(0.9, 1 - 2**-52), weight_decay=0.0, foreach=foreach)
    p.grad = torch.tensor([0.5, -F16_MAX], dtype=torch.float16)
    opt.step()
    assert torch.isfinite(p).all()  # (fp16 holds no meaningful v at this β2: only no crash)

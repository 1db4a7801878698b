"""danlu.AdaFactor next to torch.optim.Adafactor and transformers.Adafactor
(docs/reference/algorithms.md#adafactor-differences).

Where the settings make them the same algorithm they agree to float rounding; every difference
by design is shown by a test that fails if the difference disappears.
"""

import pytest
import torch
from torch import nn

import danlu

transformers = pytest.importorskip("transformers")
HFAdafactor = transformers.optimization.Adafactor

# matrix, vector, 3-D and conv-shaped: all factored by the peers (ndim ≥ 2), none by danlu's
# default rule (second largest dim < 128)
SHAPES = [(17, 33), (129,), (3, 5, 7), (8, 4, 3, 3)]


def problem(seed, steps=10, shapes=SHAPES, grad_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    grads = [[torch.randn(s, generator=gen) * grad_scale for s in shapes] for _ in range(steps)]
    return params, grads


def run(make_opt, params, grads):
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = make_opt(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def assert_all_close(a, b, rtol=2e-6, atol=1e-7):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def max_rel_difference(a, b):
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


# --- torch.optim.Adafactor ------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adafactor_with_last_two_dims(foreach, weight_decay):
    """Same algorithm: torch's lr is the cap of its relative step min(lr, 1/√t), equal to lr
    while t ≤ 1/lr²; both decay by lr·λ; ε1 (1e-30 added to g² here, torch's clamps at
    finfo.eps) is inactive for gradients of order 1."""
    params, grads = problem(0)
    ours, _ = run(
        lambda ps: danlu.AdaFactor(
            ps, lr=1e-2, weight_decay=weight_decay, factored_dims="last_two", foreach=foreach
        ),
        params,
        grads,
    )
    theirs, _ = run(
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=weight_decay, foreach=foreach),
        params,
        grads,
    )
    assert_all_close(ours, theirs)


def test_relative_step_equals_torch_adafactor():
    """danlu's lr=None (min(1e-2, 1/√t)·max(ε2, RMS θ)) is torch's default lr=1e-2."""
    params, grads = problem(1)
    ours, _ = run(
        lambda ps: danlu.AdaFactor(ps, lr=None, weight_decay=0.3, factored_dims="last_two"),
        params,
        grads,
    )
    theirs, _ = run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.3), params, grads)
    assert_all_close(ours, theirs)


def test_torch_state_layout_matches_last_two():
    params, grads = problem(2, steps=1)
    _, ours = run(lambda ps: danlu.AdaFactor(ps, factored_dims="last_two"), params, grads)
    _, theirs = run(lambda ps: torch.optim.Adafactor(ps), params, grads)
    for p, q in zip(ours.state, theirs.state, strict=True):
        a, b = ours.state[p], theirs.state[q]
        if "exp_avg_sq_row" in a:
            torch.testing.assert_close(a["exp_avg_sq_row"], b["row_var"], rtol=1e-6, atol=0)
            torch.testing.assert_close(a["exp_avg_sq_col"], b["col_var"], rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(a["exp_avg_sq"], b["variance"], rtol=1e-6, atol=0)


def test_differs_from_torch_in_which_dims_are_factored():
    """danlu's default factors the two largest dims and only from 128 up (mesh-tensorflow,
    bert4keras); torch factors the last two dims of every ≥2-D tensor. Here danlu keeps a full
    v̂ for the small tensors and factors a (300, 200, 2) tensor over (300, 200), torch over
    (200, 2)."""
    shapes = [(17, 33), (300, 200, 2)]
    params, grads = problem(3, steps=3, shapes=shapes)
    ours, o1 = run(lambda ps: danlu.AdaFactor(ps, lr=1e-2), params, grads)
    theirs, o2 = run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2), params, grads)
    small, big = list(o1.state.values())
    assert small["exp_avg_sq"].shape == (17, 33)
    assert big["exp_avg_sq_row"].shape == (1, 200, 2)
    assert big["exp_avg_sq_col"].shape == (300, 1, 2)
    small_t, big_t = list(o2.state.values())
    assert small_t["row_var"].shape == (17, 1)
    assert big_t["row_var"].shape == (300, 200, 1)
    assert max_rel_difference(ours, theirs) > 1e-3


def test_differs_from_torch_where_eps1_goes():
    """Here ε1 is added to g² before averaging; torch clamps v̂ at ε1² = finfo.eps² ≈ 1.4e-14.
    For gradients near 1e-8 (g² = 1e-16 < 1.4e-14) torch's update shrinks, danlu's stays a
    unit-RMS update."""
    params, grads = problem(4, steps=1, shapes=[(16,)], grad_scale=1e-8)
    ours, _ = run(lambda ps: danlu.AdaFactor(ps, lr=1e-2), params, grads)
    theirs, _ = run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2), params, grads)
    (p0,), (ours,), (theirs,) = params, ours, theirs
    scale = p0.pow(2).mean().sqrt()
    # danlu: |Δθ| = lr·RMS(θ) on every entry (u = sign(g) at t = 1)
    torch.testing.assert_close(
        (ours - p0).abs(), torch.full((16,), 1e-2) * scale, rtol=1e-4, atol=0
    )
    assert ((theirs - p0).abs() < 0.5 * 1e-2 * scale).any()


def test_differs_from_torch_when_the_relative_cap_binds():
    """torch's lr caps min(lr, 1/√t): with lr = 0.5 its step shrinks as 1/√t from t = 5 on,
    danlu's explicit lr stays 0.5. Equal for t ≤ 4."""
    params, grads = problem(5, steps=6, shapes=[(4, 3)])
    for steps, equal in ((4, True), (6, False)):
        ours, _ = run(
            lambda ps: danlu.AdaFactor(ps, lr=0.5, factored_dims="last_two"), params, grads[:steps]
        )
        theirs, _ = run(lambda ps: torch.optim.Adafactor(ps, lr=0.5), params, grads[:steps])
        assert (max_rel_difference(ours, theirs) < 1e-5) == equal


# --- transformers.Adafactor -----------------------------------------------------------------------


def hf(ps, **kw):
    return HFAdafactor(ps, **{"relative_step": False, "warmup_init": False, **kw})


@pytest.mark.parametrize("foreach", [False, True])
def test_equals_transformers_adafactor(foreach):
    """relative_step=False, warmup_init=False, scale_parameter=True: the same algorithm as
    danlu.AdaFactor with factored_dims='last_two' (transformers adds ε1 to g² as danlu does)."""
    params, grads = problem(6)
    ours, _ = run(
        lambda ps: danlu.AdaFactor(ps, lr=1e-2, factored_dims="last_two", foreach=foreach),
        params,
        grads,
    )
    theirs, _ = run(lambda ps: hf(ps, lr=1e-2), params, grads)
    assert_all_close(ours, theirs)


def test_equals_transformers_relative_step():
    params, grads = problem(7)
    ours, _ = run(lambda ps: danlu.AdaFactor(ps, lr=None, factored_dims="last_two"), params, grads)
    theirs, _ = run(lambda ps: HFAdafactor(ps, lr=None), params, grads)
    assert_all_close(ours, theirs)


@pytest.mark.parametrize("foreach", [False, True])
def test_transformers_momentum_order_is_momentum_mode_scaled(foreach):
    """transformers averages the lr- and scale-multiplied update (transformers#34506); that is
    momentum_mode='scaled'. danlu's default averages the clipped unit update before scaling
    (bert4keras): the lr applies to the averaged direction at once, so a step taken with
    lr = 0 moves nothing, while the 'scaled' momentum keeps moving on the remembered steps."""
    params, grads = problem(8)
    frozen_last = {"lr": 1e-2}

    def with_lr_zero_on_last_step(make_opt):
        ps = [nn.Parameter(p.clone()) for p in params]
        opt = make_opt(ps)
        before = None
        for t, step_grads in enumerate(grads):
            if t == len(grads) - 1:
                for group in opt.param_groups:
                    group["lr"] = 0.0
                before = [p.detach().clone() for p in ps]
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps], before

    theirs, theirs_before = with_lr_zero_on_last_step(lambda ps: hf(ps, beta1=0.9, **frozen_last))
    scaled, _ = with_lr_zero_on_last_step(
        lambda ps: danlu.AdaFactor(
            ps,
            beta1=0.9,
            factored_dims="last_two",
            momentum_mode="scaled",
            foreach=foreach,
            **frozen_last,
        )
    )
    unit, unit_before = with_lr_zero_on_last_step(
        lambda ps: danlu.AdaFactor(ps, beta1=0.9, factored_dims="last_two", **frozen_last)
    )
    assert_all_close(scaled, theirs)
    for a, b in zip(unit, unit_before, strict=True):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(theirs, theirs_before, strict=True))


def test_transformers_multiplies_weight_decay_by_the_parameter_scale():
    """transformers decays by λ·lr·max(ε2, RMS θ); danlu by λ·lr
    (docs/reference/algorithms.md#conventions with α_t the step size, bert4keras, torch). One step
    of transformers with λ equals one step of danlu with λ·max(ε2, RMS θ0); with the same λ they
    differ."""
    params, grads = problem(9, steps=1)
    theirs, _ = run(lambda ps: hf(ps, lr=1e-2, weight_decay=0.1), params, grads)
    ours_same_lambda, _ = run(
        lambda ps: danlu.AdaFactor(ps, lr=1e-2, weight_decay=0.1, factored_dims="last_two"),
        params,
        grads,
    )
    scaled_lambda = []
    for i, p0 in enumerate(params):
        scale = max(1e-3, p0.pow(2).mean().sqrt().item())
        (got,), _ = run(
            lambda ps, s=scale: danlu.AdaFactor(
                ps, lr=1e-2, weight_decay=0.1 * s, factored_dims="last_two"
            ),
            [p0],
            [[grads[0][i]]],
        )
        scaled_lambda.append(got)
    assert_all_close(scaled_lambda, theirs)
    assert max_rel_difference(ours_same_lambda, theirs) > 1e-5


def test_transformers_relative_step_has_no_005_without_scaling():
    """Without parameter scaling the mesh-tensorflow convention (bert4keras, danlu) multiplies
    the relative step by 0.05; transformers does not, so its steps are 20× larger."""
    params, grads = problem(10, steps=1, shapes=[(6,)])
    ours, _ = run(
        lambda ps: danlu.AdaFactor(ps, lr=None, multiply_by_parameter_scale=False), params, grads
    )
    theirs, _ = run(lambda ps: HFAdafactor(ps, lr=None, scale_parameter=False), params, grads)
    torch.testing.assert_close(theirs[0] - params[0], 20 * (ours[0] - params[0]), rtol=1e-4, atol=0)

"""AdaFactor against docs/reference/algorithms.md#adafactor-tests and the NumPy reference."""

import math

import numpy as np
import pytest
import torch
from reference import adafactor_axes, adafactor_run

from danlu.functional import adafactor, adafactor_beta2, adafactor_factored_axes

F64 = torch.float64

# matrix, vector, 3-D and conv-shaped (out, in, kh, kw) parameters
SHAPES = [(6, 9), (7,), (3, 4, 5), (8, 4, 3, 3)]


def t64(x):
    return torch.tensor(x, dtype=F64)


def make_state(param, *, factored_dims="two_largest", min_dim=128, beta1=0.0):
    """The state layout the shell builds (keepdim row/column statistics or a full v̂)."""
    axes = adafactor_factored_axes(
        param.shape, factored_dims=factored_dims, min_dim_size_to_factor=min_dim
    )
    row = col = full = None
    if axes is None:
        full = torch.zeros_like(param)
    else:
        row_shape, col_shape = list(param.shape), list(param.shape)
        row_shape[axes[0]] = 1
        col_shape[axes[1]] = 1
        row, col = torch.zeros(row_shape, dtype=F64), torch.zeros(col_shape, dtype=F64)
    exp_avg = torch.zeros_like(param) if beta1 > 0 else None
    return row, col, full, exp_avg


def run(theta, grads, *, foreach=False, factored_dims="two_largest", min_dim=128, **kw):
    """Run the functional core for len(grads) steps; returns (θ history, final state)."""
    params = [t64(x) for x in theta]
    states = [
        make_state(p, factored_dims=factored_dims, min_dim=min_dim, beta1=kw.get("beta1", 0.0))
        for p in params
    ]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        adafactor(
            params,
            [t64(g) for g in step_grads],
            [s[0] for s in states],
            [s[1] for s in states],
            [s[2] for s in states],
            [s[3] for s in states],
            step=t,
            factored_dims=factored_dims,
            min_dim_size_to_factor=min_dim,
            foreach=foreach,
            **kw,
        )
        history.append([p.clone() for p in params])
    return history, states


# --- docs/reference/algorithms.md#adafactor-tests oracles -----------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("factored_dims", ["two_largest", "last_two"])
def test_oracle_1_factored_first_step(foreach, factored_dims):
    # g = [[1,2],[3,4]] at t = 1 (β̂ = 0): row means of g² [2.5, 12.5], column means [5, 10];
    # v̂ = [[1.6667, 3.3333], [8.3333, 16.667]] and u = g/√v̂; RMS(u) = √0.96 < 1, no clipping.
    # With θ = 0, lr = 1 and no parameter scaling, θ1 = −u.
    g = [[1.0, 2.0], [3.0, 4.0]]
    history, states = run(
        [[[0.0, 0.0], [0.0, 0.0]]],
        [[g]],
        foreach=foreach,
        factored_dims=factored_dims,
        min_dim=0,
        lr=1.0,
        multiply_by_parameter_scale=False,
    )
    row, col, _, _ = states[0]
    torch.testing.assert_close(row.flatten(), t64([2.5, 12.5]))
    torch.testing.assert_close(col.flatten(), t64([5.0, 10.0]))
    u = t64([[0.77459667, 1.09544512], [1.03923048, 0.9797959]])
    torch.testing.assert_close(-history[0][0], u, rtol=1e-8, atol=0)
    v_hat = (t64(g) / u) ** 2
    torch.testing.assert_close(
        v_hat, t64([[1.6666667, 3.3333333], [8.3333333, 16.666667]]), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_1_clipping_with_d_half(foreach):
    # d = 0.5: RMS(u)/d = 1.9595918 > 1, so u is divided by it.
    history, _ = run(
        [[[0.0, 0.0], [0.0, 0.0]]],
        [[[[1.0, 2.0], [3.0, 4.0]]]],
        foreach=foreach,
        min_dim=0,
        lr=1.0,
        multiply_by_parameter_scale=False,
        clip_threshold=0.5,
    )
    u = t64([[0.77459667, 1.09544512], [1.03923048, 0.9797959]])
    torch.testing.assert_close(-history[0][0], u / 1.9595918, rtol=1e-7, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_2_vector_first_step(foreach):
    # u = sign(g) at t = 1; θ = [3, 4] has RMS 3.5355339, lr = 0.01 → Δθ = ∓0.03535534.
    history, _ = run([[3.0, 4.0]], [[[0.5, -2.0]]], foreach=foreach, lr=0.01)
    torch.testing.assert_close(
        history[0][0] - t64([3.0, 4.0]), t64([-0.03535534, 0.03535534]), rtol=1e-7, atol=0
    )


def test_oracle_3_beta2_schedule():
    got = [adafactor_beta2(t) for t in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, [0.0, 0.42565082, 0.58475635, 0.67012302], atol=1e-8)
    assert adafactor_beta2(7, beta2=0.9) == 0.9


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_4_vector_second_step(foreach):
    # Derived by hand: v1 = g1² = [1, 1]; β̂2 = 1 − 2^−0.8 = 0.42565082;
    # v2 = 0.42565082·1 + 0.57434918·[100, 0.01] = [57.860568572, 0.431394314276];
    # u2 = [10/√57.86056857, 0.1/√0.43139431] = [1.3146454768, 0.1522519247];
    # RMS(u2) = 0.93580804 < 1, no clipping. θ0 = 0, lr = 1, no scaling: θ2 = −u1 − u2.
    history, states = run(
        [[0.0, 0.0]],
        [[[1.0, 1.0]], [[10.0, 0.1]]],
        foreach=foreach,
        lr=1.0,
        multiply_by_parameter_scale=False,
    )
    torch.testing.assert_close(states[0][2], t64([57.860568572, 0.431394314276]), rtol=1e-9, atol=0)
    torch.testing.assert_close(
        history[0][0] - history[1][0], t64([1.3146454768, 0.1522519247]), rtol=1e-9, atol=0
    )


def test_oracle_5_factored_shapes():
    axes = adafactor_factored_axes((2, 128, 256))
    assert axes == (2, 1)  # v_r (2,128,1) averages the largest axis, v_c (2,1,256) the second
    assert adafactor_factored_axes((100, 300)) is None
    assert adafactor_factored_axes((768, 2)) is None
    assert adafactor_factored_axes((128, 128)) == (1, 0)
    assert adafactor_factored_axes((3, 3, 256, 512)) == (3, 2)  # v_r (3,3,256,1), v_c (3,3,1,512)
    assert adafactor_factored_axes((7,)) is None
    assert adafactor_factored_axes((5, 3, 2), factored_dims="last_two") == (2, 1)


# --- edge cases (docs/reference/algorithms.md#adafactor-edge-cases) -------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradient_at_first_step_gives_zero_update(foreach):
    # v = ε1 and u = 0 (no 0/0).
    history, states = run([[1.0, -2.0]], [[[0.0, 0.0]]], foreach=foreach, lr=0.01)
    torch.testing.assert_close(history[0][0], t64([1.0, -2.0]), rtol=0, atol=0)
    torch.testing.assert_close(states[0][2], t64([1e-30, 1e-30]))


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_initialised_parameter_still_moves(foreach):
    # max(ε2, RMS(0)) = 1e-3: the first step is lr·1e-3·sign(g).
    history, _ = run([[0.0, 0.0, 0.0]], [[[2.0, -1.0, 0.5]]], foreach=foreach, lr=0.1)
    torch.testing.assert_close(history[0][0], t64([-1e-4, 1e-4, -1e-4]), rtol=1e-12, atol=0)


# --- the NumPy reference over 10 steps --------------------------------------------------------

CONFIGS = [
    {},
    {"min_dim": 0},  # every ≥2-D tensor factored over its two largest dims
    {"factored_dims": "last_two", "weight_decay": 0.1},
    {"min_dim": 4, "beta1": 0.9, "weight_decay": 0.05},
    {"min_dim": 0, "beta1": 0.8, "momentum_mode": "scaled", "clip_threshold": 0.5},
    {"min_dim": 0, "relative_step": True, "lr": 1.0, "weight_decay": 0.2},
    {"relative_step": True, "lr": 1.0, "multiply_by_parameter_scale": False, "beta2": 0.9},
    {"min_dim": 0, "clip_threshold": None, "eps1": 1e-3, "eps2": 0.5, "decay_rate": 0.5},
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_numpy_reference_over_ten_steps(config, foreach):
    rng = np.random.default_rng(len(str(config)))
    thetas = [rng.normal(size=s) * 0.3 for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(10)]
    kw = {"lr": 0.05, **config}
    factored_dims = kw.pop("factored_dims", "two_largest")
    min_dim = kw.pop("min_dim", 128)
    history, _ = run(
        thetas, grads, foreach=foreach, factored_dims=factored_dims, min_dim=min_dim, **kw
    )
    ref_kw = {
        "lr": kw["lr"],
        "relative_step": kw.get("relative_step", False),
        "beta1": kw.get("beta1", 0.0),
        "decay_rate": kw.get("decay_rate", 0.8),
        "beta2": kw.get("beta2"),
        "eps1": kw.get("eps1", 1e-30),
        "eps2": kw.get("eps2", 1e-3),
        "clip": kw.get("clip_threshold", 1.0),
        "scale": kw.get("multiply_by_parameter_scale", True),
        "wd": kw.get("weight_decay", 0.0),
        "momentum_mode": kw.get("momentum_mode", "unit"),
        "factored_dims": factored_dims,
        "min_dim": min_dim,
    }
    factored = 0
    for i, (theta, shape) in enumerate(zip(thetas, SHAPES, strict=True)):
        ref = adafactor_run(theta, [g[i] for g in grads], **ref_kw)
        factored += adafactor_axes(shape, factored_dims=factored_dims, min_dim=min_dim) is not None
        for t in range(10):
            np.testing.assert_allclose(history[t][i].numpy(), ref[t], rtol=1e-10, atol=1e-13)
    if min_dim == 0 or factored_dims == "last_two":
        assert factored == 3  # every ≥2-D shape took the factored path


def test_relative_step_size():
    from danlu.functional import adafactor_step_size

    assert (
        adafactor_step_size(1, lr=1.0, relative_step=True, multiply_by_parameter_scale=True) == 1e-2
    )
    assert adafactor_step_size(
        40000, lr=1.0, relative_step=True, multiply_by_parameter_scale=True
    ) == pytest.approx(1 / math.sqrt(40000))
    assert adafactor_step_size(
        1, lr=0.5, relative_step=True, multiply_by_parameter_scale=False
    ) == pytest.approx(0.5 * 0.05 * 1e-2)
    assert (
        adafactor_step_size(9, lr=3e-4, relative_step=False, multiply_by_parameter_scale=True)
        == 3e-4
    )


def test_momentum_tensor_required():
    p = t64([1.0])
    with pytest.raises(ValueError, match="beta1"):
        adafactor(
            [p],
            [t64([1.0])],
            [None],
            [None],
            [torch.zeros(1, dtype=F64)],
            [None],
            step=1,
            lr=0.1,
            beta1=0.9,
        )

"""Amos against docs/reference/algorithms.md#amos-tests item 1 and the NumPy reference (jestimator
semantics), plus the shell."""

import math

import numpy as np
import pytest
import torch
from reference import amos_run
from torch import nn

import danlu
from danlu.functional import amos, amos_default_eta, amos_slot_shape

F64 = torch.float64
SHAPES = [(6, 9), (7,), (3, 4, 5), (8, 4, 3, 3)]


def t64(x):
    return torch.tensor(x, dtype=F64)


@pytest.mark.parametrize("foreach", [False, True])
def test_oracle_1_two_steps(foreach):
    # docs/reference/algorithms.md#amos-tests item 1: scalar v, ξ = 0.01, η = 0.5, β = 0.999, ζ =
    # 0.25, θ0 = [1, −1], g = [3, 4] twice (g2 = 12.5).
    p = t64([1.0, -1.0])
    v, b = torch.zeros((), dtype=F64), torch.zeros((), dtype=F64)
    g = t64([3.0, 4.0])
    kw = {"lr": 0.01, "eta": 0.5, "beta": 0.999, "zeta": 0.25, "foreach": foreach}
    amos([p], [g], [v], [b], [None], step=1, **kw)
    # t = 1: c = d = 1, v̂ = 12.5, γ = 1e-4, Δθ = [−0.00429264, −0.00560685], b = 1e-4
    torch.testing.assert_close(p, t64([0.99570736, -1.00560685]), rtol=0, atol=5e-9)
    torch.testing.assert_close(b, t64(1e-4), rtol=1e-12, atol=0)
    amos([p], [g], [v], [b], [None], step=2, **kw)
    # t = 2, derived by hand: v2 = 0.999·0.0125 + 0.001·12.5 = 0.0249875;
    # 1/v̂ = (1 − 0.999²)/0.0249875 = 0.08; c = (1 + 0.25·√0.01·1e-4)^−½ = 0.99999875;
    # d = 1/(1 + 0.25·√0.005·1e-4) = 0.99999823224; γ = c·1e-4·12.5·0.08 = 0.99999875e-4;
    # Δθ = d·(−0.005·√0.08·[3, 4] − ½γ·θ1) = [−0.00429241840, −0.00560656406];
    # θ2 = [0.99141494091, −1.01121341831]; b2 = 1e-4 + γ·(1 + 1e-4) = 2.00009875e-4.
    torch.testing.assert_close(v, t64(0.0249875), rtol=1e-12, atol=0)
    torch.testing.assert_close(p, t64([0.99141494091, -1.01121341831]), rtol=0, atol=1e-11)
    torch.testing.assert_close(b, t64(2.00009875e-4), rtol=1e-9, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradient_moves_nothing(foreach):
    # docs/reference/algorithms.md#amos-edge-cases: v = 0 is clamped to ε, so the update is 0, and γ
    # = 0 (no decay, b unchanged).
    p = t64([[0.5, -0.25], [1.0, 2.0]])
    v, b = torch.zeros(2, 1, dtype=F64), torch.full((2, 1), 0.3, dtype=F64)
    amos(
        [p],
        [torch.zeros(2, 2, dtype=F64)],
        [v],
        [b],
        [None],
        step=1,
        lr=0.1,
        eta=0.5,
        foreach=foreach,
    )
    torch.testing.assert_close(p, t64([[0.5, -0.25], [1.0, 2.0]]), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.full((2, 1), 0.3, dtype=F64), rtol=0, atol=0)


def test_slot_shapes():
    assert amos_slot_shape((32, 64)) == (32, 1)  # one per output feature of a Linear
    assert amos_slot_shape((16, 8, 3, 3)) == (16, 1, 1, 1)  # one per output channel
    assert amos_slot_shape((64,)) == ()
    assert amos_slot_shape(()) == ()
    assert amos_slot_shape((32, 64), "scalar") == ()
    assert amos_slot_shape((32, 64), "full") == (32, 64)


def test_default_eta():
    # docs/reference/algorithms.md#amos-optimizer: bias 0.5; hidden √(2/fan_in); output √(1/fan_in);
    # fan_in in PyTorch's layout
    assert amos_default_eta((64,)) == 0.5
    assert amos_default_eta((32, 64)) == pytest.approx(math.sqrt(2 / 64))
    assert amos_default_eta((16, 8, 3, 3)) == pytest.approx(math.sqrt(2 / 72))
    assert amos_default_eta((10, 64), rule="lecun") == pytest.approx(math.sqrt(1 / 64))
    assert amos_default_eta((4, 4), elementwise=True) == 0.5


CONFIGS = [
    {"slots": "per_output"},
    {"slots": "scalar", "momentum": 0.9},
    {"slots": "full", "clip": 0.5},
    {"slots": "per_output", "init_b": 50.0, "fr": 0.3, "center": 0.5, "beta": 0.98},
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_numpy_reference_over_ten_steps(config, foreach):
    xi = 0.05
    rng = np.random.default_rng(len(str(config)))
    thetas = [rng.normal(size=s) * 0.3 for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(10)]
    slot_shapes = [amos_slot_shape(s, config["slots"]) for s in SHAPES]
    etas = [amos_default_eta(s) for s in SHAPES]
    params = [torch.tensor(x) for x in thetas]
    vs = [torch.zeros(s, dtype=F64) for s in slot_shapes]
    bs = [torch.full(s, config.get("init_b", 0.0), dtype=F64) for s in slot_shapes]
    momentum = config.get("momentum", 0.0)
    ms = [torch.zeros_like(p) if momentum else None for p in params]
    history = []
    for t, step_grads in enumerate(grads, start=1):
        amos(
            params,
            [torch.tensor(g) for g in step_grads],
            vs,
            bs,
            ms,
            step=t,
            lr=xi,
            eta=etas,
            beta=config.get("beta", 0.999),
            finetune_rate=config.get("fr", 1.0),
            center=config.get("center", 0.0),
            momentum=momentum,
            clip_value=config.get("clip"),
            foreach=foreach,
        )
        history.append([p.clone() for p in params])
    for i, theta in enumerate(thetas):
        ref, ref_v, ref_b = amos_run(
            theta,
            [g[i] for g in grads],
            xi=xi,
            eta=etas[i],
            slot_shape=slot_shapes[i],
            beta=config.get("beta", 0.999),
            fr=config.get("fr", 1.0),
            init_b=config.get("init_b", 0.0),
            center=config.get("center", 0.0),
            momentum=momentum,
            clip=config.get("clip"),
        )
        for t in range(10):
            np.testing.assert_allclose(history[t][i].numpy(), ref[t], rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(vs[i].numpy(), ref_v, rtol=1e-11)
        np.testing.assert_allclose(bs[i].numpy(), ref_b, rtol=1e-11)


def test_center_is_amos_on_the_shifted_parameter():
    # Decay toward c = 1 (norm gains) is Amos on θ − 1: same gradients, shifted trajectory.
    rng = np.random.default_rng(3)
    theta = rng.normal(size=6) * 0.2
    grads = [rng.normal(size=6) for _ in range(20)]
    shifted = nn.Parameter(torch.tensor(theta + 1.0))
    plain = nn.Parameter(torch.tensor(theta))
    o1 = danlu.Amos([{"params": [shifted], "center": 1.0}], lr=0.2)
    o2 = danlu.Amos([plain], lr=0.2)
    for g in grads:
        shifted.grad, plain.grad = torch.tensor(g), torch.tensor(g)
        o1.step()
        o2.step()
    torch.testing.assert_close(shifted.detach() - 1.0, plain.detach(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(plain.detach(), torch.tensor(theta))


# --- the shell ----------------------------------------------------------------------------------


def test_reduced_slots_per_output_feature():
    layer = nn.Linear(64, 32)
    opt = danlu.Amos(layer.parameters(), momentum=0.0)
    layer(torch.randn(5, 64)).sum().backward()
    opt.step()
    w, b = opt.state[layer.weight], opt.state[layer.bias]
    assert w["exp_avg_sq"].shape == w["b"].shape == (32, 1)
    assert b["exp_avg_sq"].shape == b["b"].shape == ()
    assert set(w) == {"step", "exp_avg_sq", "b"}
    assert w["step"].dtype == torch.float32 and w["step"].item() == 1.0


def test_group_eta_rules_and_param_groups_output_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    groups = danlu.param_groups(model, output_layer=model[2])
    etas = {g["eta"] for g in groups}
    assert etas == {"auto", "output", 0.5}
    x = torch.randn(4, 8)

    def train(opt, model):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    opt = danlu.Amos(groups, lr=0.05)
    # the same run with explicit numbers: √(2/8) hidden, √(1/16) output, 0.5 for the rest
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    explicit = [
        {"params": [twin[0].weight], "eta": math.sqrt(2 / 8)},
        {"params": [twin[2].weight], "eta": math.sqrt(1 / 16)},
        {"params": [twin[1].weight], "eta": 0.5, "center": 1.0},
        {"params": [twin[0].bias, twin[1].bias, twin[2].bias], "eta": 0.5},
    ]
    opt_twin = danlu.Amos(explicit, lr=0.05)
    train(opt, model)
    train(opt_twin, twin)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_norm_gain_decays_toward_one_with_param_groups():
    # With noise-only gradients Amos's decay pulls a norm gain toward its centre: 1 via
    # param_groups' center tag, toward 0 without it (jestimator).
    torch.manual_seed(0)
    gains = {}
    for tagged in (True, False):
        gain = nn.Parameter(torch.full((64,), 1.5))
        group = (
            {"params": [gain], "center": 1.0, "kind": "elementwise"}
            if tagged
            else {"params": [gain]}
        )
        opt = danlu.Amos([group], lr=0.5, beta=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(300):
            gain.grad = torch.randn(64, generator=gen) * 0.01
            opt.step()
        gains[tagged] = gain.detach().mean().item()
    assert 1.0 < gains[True] < 1.5
    assert gains[False] < gains[True]


def test_init_b_slows_learning_for_fine_tuning():
    # jestimator's init_b: a large b (pre-trained tensors) makes d small, so steps are smaller.
    moved = {}
    for init_b in (0.0, 1e4):
        p = nn.Parameter(torch.ones(4, 4))
        opt = danlu.Amos([p], lr=0.1, init_b=init_b)
        p.grad = torch.ones(4, 4)
        opt.step()
        moved[init_b] = (1 - p.detach()).abs().max().item()
        assert opt.state[p]["b"].min().item() >= init_b
    assert moved[1e4] < 0.2 * moved[0.0]


def test_foreach_step_does_not_read_tensors_back_to_the_host(monkeypatch):
    params = [nn.Parameter(torch.randn(s)) for s in [(6, 13), (7,), (3, 4, 5)]]
    opt = danlu.Amos(params, lr=1e-2, momentum=0.9, clip_value=1.0, foreach=True)

    def forbidden(self):
        raise AssertionError(".item() called inside step()")

    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", forbidden)
            opt.step()

"""LoRA-Pro (danlu.lora.LoRAPro, lora_pro_gradients) against docs/reference/algorithms.md#lora-pro
and NumPy references."""

import copy

import numpy as np
import pytest
import torch
from lora_models import batch, two_adapter_model
from reference import (
    adamw_step,
    lora_pro_blog,
    lora_pro_c_by_least_squares,
    lora_pro_full_adam,
    lora_pro_paper_from_blog,
)
from torch import nn

from danlu.lora import LoRALinear, LoRAPro, LoRATriple, lora_pro_gradients

F64 = torch.float64
G_SPEC = np.array([[1.0, 2.0], [3.0, 4.0]])
# docs/reference/algorithms.md#lora-pro-tests in PEFT names: lora_B = blog A = [[2],[0]], lora_A =
# blog B = [[1, 0]].
B_SPEC = np.array([[2.0], [0.0]])
A_SPEC = np.array([[1.0, 0.0]])

# Held-back values, derived by hand from docs/reference/algorithms.md#lora-pro-rule (s = 1), paper
# form:
#   BᵀB = 4, AAᵀ = 1, g_A = BᵀG = [2, 4], g_B = G Aᵀ = [1, 3]ᵀ;
#   Sylvester: 4X + X·1 = −(1/4)·g_A Aᵀ = −(1/4)·2  ⇒  X = −0.1;
#   ĝ_A = (1/4)[2, 4] + X[1, 0] = [0.4, 1];  ĝ_B = (I − BB⁺)g_B − BX = [0, 3]ᵀ + [0.2, 0]ᵀ.
# Blog form, same numbers: AᵀA·C + C·BBᵀ = −Aᵀ G_A (BBᵀ)^{-1} ⇒ 5C = −2, C = −0.4, so
# H_A = [1, 3]ᵀ + [2, 0]ᵀ·(−0.4) = [0.2, 3]ᵀ = ĝ_B and H_B = [0, 1] + 0.4·[1, 0] = [0.4, 1] = ĝ_A;
# the objective ‖H_A − G_A‖² + ‖H_B − G_B‖² = 4C² + (2 + C)² + 9 is smallest at C = −0.4
# (8C + 2(2 + C) = 0), where it is 0.64 + 11.56 = 12.2.
#   "zero" (X = 0 in the paper form): ĝ_A = [0.5, 1], ĝ_B = [0, 3]ᵀ.
EXPECTED = {
    "sylvester": ([[0.4, 1.0]], [[0.2], [3.0]]),
    # docs/reference/algorithms.md#lora-differences (X = −0.25)
    "symmetric": ([[0.25, 1.0]], [[0.5], [3.0]]),
    "zero": ([[0.5, 1.0]], [[0.0], [3.0]]),
}


def t64(x):
    return torch.tensor(np.asarray(x), dtype=F64)


def spec_grads(s):
    """LoRA gradients of the fixed full gradient G_SPEC at scale s: g_A = s BᵀG, g_B = s G Aᵀ."""
    return s * B_SPEC.T @ G_SPEC, s * G_SPEC @ A_SPEC.T


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetric", "zero"])
def test_oracle_spec_example(x_mode):
    gA, gB = spec_grads(1.0)
    hat_A, hat_B = lora_pro_gradients(
        t64(A_SPEC), t64(B_SPEC), t64(gA), t64(gB), 1.0, x_mode=x_mode, ridge=0.0
    )
    np.testing.assert_allclose(hat_A.numpy(), EXPECTED[x_mode][0], atol=1e-12)
    np.testing.assert_allclose(hat_B.numpy(), EXPECTED[x_mode][1], atol=1e-12)
    # every X gives the same reconstruction; the residual [[0, 0], [0, 4]] is unavoidable
    recon = B_SPEC @ hat_A.numpy() + hat_B.numpy() @ A_SPEC
    np.testing.assert_allclose(recon, [[1.0, 2.0], [3.0, 0.0]], atol=1e-12)


def test_oracle_spec_example_blog_form_and_minimality():
    # The NumPy reference reproduces the docs/reference/algorithms.md blog-form numbers (C = 0 and
    # symmetric) ...
    H_A, H_B = lora_pro_blog(G_SPEC, B_SPEC, A_SPEC, "c_zero")
    np.testing.assert_allclose(H_A, [[1.0], [3.0]])
    np.testing.assert_allclose(H_B, [[0.0, 1.0]])
    H_A, H_B = lora_pro_blog(G_SPEC, B_SPEC, A_SPEC, "symmetric")
    np.testing.assert_allclose(H_A, [[0.5], [3.0]])
    np.testing.assert_allclose(H_B, [[0.25, 1.0]])
    # ... and the Sylvester choice is the closest to the raw gradients (objective 12.2).
    GA, GB = G_SPEC @ A_SPEC.T, B_SPEC.T @ G_SPEC

    def objective(choice):
        H_A, H_B = lora_pro_blog(G_SPEC, B_SPEC, A_SPEC, choice)
        return np.sum((H_A - GA) ** 2) + np.sum((H_B - GB) ** 2)

    assert objective("sylvester") == pytest.approx(12.2)
    assert objective("sylvester") < min(objective(c) for c in ("c_zero", "symmetric", "zero_paper"))


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetric", "zero"])
def test_scale_halves_adjusted_gradients(x_mode):
    # docs/reference/algorithms.md#lora-pro-tests: with G fixed, s = 2 halves every adjusted
    # gradient; G̃ is unchanged.
    out = {}
    for s in (1.0, 2.0):
        gA, gB = spec_grads(s)
        out[s] = lora_pro_gradients(
            t64(A_SPEC), t64(B_SPEC), t64(gA), t64(gB), s, x_mode=x_mode, ridge=0.0
        )
    for one, two in zip(out[1.0], out[2.0], strict=True):
        torch.testing.assert_close(two, one / 2)
    equivalent = {s: s * (t64(B_SPEC) @ a + b @ t64(A_SPEC)) for s, (a, b) in out.items()}
    torch.testing.assert_close(equivalent[2.0], equivalent[1.0])


def random_problem(seed, out_f=7, in_f=6, r=3):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((out_f, in_f)),
        rng.standard_normal((r, in_f)),
        rng.standard_normal((out_f, r)),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("x_mode", "choice"),
    [("sylvester", "sylvester"), ("symmetric", "symmetric"), ("zero", "zero_paper")],
)
def test_paper_form_equals_blog_form(seed, x_mode, choice):
    """danlu's paper-form X gives the blog-form C's adjusted gradients on random matrices."""
    G, A, B = random_problem(seed)
    s = 1.7
    gA, gB = s * B.T @ G, s * G @ A.T
    hat_A, hat_B = lora_pro_gradients(t64(A), t64(B), t64(gA), t64(gB), s, x_mode=x_mode, ridge=0)
    ref_A, ref_B = lora_pro_paper_from_blog(G, A, B, s, choice)
    np.testing.assert_allclose(hat_A.numpy(), ref_A, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(hat_B.numpy(), ref_B, rtol=1e-9, atol=1e-11)
    # s(B ĝ_A + ĝ_B A) is G minus what LoRA cannot reach: (I − P_B) G (I − P_A)
    P_B = B @ np.linalg.solve(B.T @ B, B.T)
    P_A = A.T @ np.linalg.solve(A @ A.T, A)
    expected = G - (np.eye(7) - P_B) @ G @ (np.eye(6) - P_A)
    recon = s * (B @ hat_A.numpy() + hat_B.numpy() @ A)
    np.testing.assert_allclose(recon, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_sylvester_minimises_distance_to_raw_gradients(seed):
    """The Sylvester C equals the minimiser of ‖H_A − G_A‖² + ‖H_B − G_B‖² found by least
    squares from the objective itself (independent of the Sylvester equation)."""
    G, A, B = random_problem(seed, out_f=6, in_f=8, r=2)
    # blog names: left factor = lora_B, right factor = lora_A
    C = lora_pro_c_by_least_squares(G, B, A)
    H_A = G @ A.T @ np.linalg.inv(A @ A.T) + B @ C
    gA, gB = B.T @ G, G @ A.T
    _, hat_B = lora_pro_gradients(t64(A), t64(B), t64(gA), t64(gB), 1.0, ridge=0)
    np.testing.assert_allclose(hat_B.numpy(), H_A, rtol=1e-9, atol=1e-11)


def full_rank_layer(in_f=6, out_f=5, r=2, alpha=4.0, dtype=F64, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=False, dtype=dtype), r, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def effective_weight(layer):
    return (layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A).detach().double()


def np_(t):
    return t.detach().double().numpy().copy()  # a copy: float64 .numpy() shares memory


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetric", "zero"])
def test_one_sgd_step_matches_spec(x_mode):
    """docs/reference/algorithms.md#lora-pro-tests: W1 − W0 = −η(H_A B + A H_B) + η² H_A H_B in blog
    names; with scale s the second-order term is η²/s·H_A H_B (W = W0 + s·BA and each ĝ = H/s)."""
    layer = full_rank_layer()  # s = 2
    G = np.random.default_rng(0).standard_normal((5, 6))
    eta = 0.05
    x = torch.eye(6, dtype=F64)
    A0, B0, W0 = np_(layer.lora_A), np_(layer.lora_B), effective_weight(layer).numpy()
    opt = LoRAPro(
        layer, inner=torch.optim.SGD([layer.lora_A, layer.lora_B], lr=eta), x_mode=x_mode, ridge=0.0
    )
    (layer(x) * t64(G.T)).sum().backward()  # loss <G, W>: its W-gradient is G
    opt.step()
    choice = {"zero": "zero_paper"}.get(x_mode, x_mode)
    H_A, H_B = lora_pro_blog(G, B0, A0, choice)
    expected = -eta * (H_A @ A0 + B0 @ H_B) + eta**2 / layer.scale * H_A @ H_B
    np.testing.assert_allclose(effective_weight(layer).numpy() - W0, expected, atol=1e-12)


def loss_of(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()


def full_weight_grads(model, data):
    """The gradient of the loss w.r.t. each adapted layer's effective weight, by autograd on a
    copy where the effective weight is an ordinary parameter (independent of LoRAPro)."""
    twin = copy.deepcopy(model)
    weights = []
    for layer in (twin[0], twin[2]):
        w = nn.Parameter(effective_weight(layer).to(layer.base.weight.dtype))
        layer.base.weight = w
        with torch.no_grad():
            layer.lora_B.zero_()
        weights.append(w)
    grads = torch.autograd.grad(loss_of(twin, data), weights)
    return [g.double().numpy() for g in grads]


def test_efficient_mode_default_adamw_matches_reference():
    model = two_adapter_model()
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "wd": 0.1}
    opt = LoRAPro(model, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, ridge=0.0)
    ref = [
        {
            "A": np_(layer.lora_A),
            "B": np_(layer.lora_B),
            "s": layer.scale,
            "mA": 0.0,
            "vA": 0.0,
            "mB": 0.0,
            "vB": 0.0,
        }
        for layer in (model[0], model[2])
    ]
    for t in range(1, 4):
        data = batch(seed=t)
        Gs = full_weight_grads(model, data)
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()
        for r, G in zip(ref, Gs, strict=True):
            gA, gB = lora_pro_paper_from_blog(G, r["A"], r["B"], r["s"], "sylvester")
            r["A"], r["mA"], r["vA"] = adamw_step(r["A"], r["mA"], r["vA"], gA, t, **kw)
            r["B"], r["mB"], r["vB"] = adamw_step(r["B"], r["mB"], r["vB"], gB, t, **kw)
        for r, layer in zip(ref, (model[0], model[2]), strict=True):
            np.testing.assert_allclose(np_(layer.lora_A), r["A"], rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(np_(layer.lora_B), r["B"], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("x_mode", ["sylvester", "symmetric"])
def test_full_mode_matches_reference(x_mode):
    """docs/reference/algorithms.md#lora-pro "With Adam": full-state Adam on G̃, projected back,
    with the base weight decayed by 1 − ηλ and the factors by √(1 − ηλ)."""
    layer = full_rank_layer(in_f=7, out_f=6, r=2, alpha=3.0)
    target = np.random.default_rng(5).standard_normal((6, 7))
    x = torch.eye(7, dtype=F64)
    kw = {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-8}
    expected = lora_pro_full_adam(
        np_(layer.base.weight),
        np_(layer.lora_A),
        np_(layer.lora_B),
        lambda W: W - target,
        4,
        s=layer.scale,
        wd=0.1,
        choice=x_mode,
        **kw,
    )
    opt = LoRAPro(layer, mode="full", x_mode=x_mode, weight_decay=0.1, ridge=0.0, **kw)
    for _ in range(4):
        opt.zero_grad()
        # ½‖W − T‖² written through the layer: its W-gradient is W − T
        (0.5 * (layer(x) - t64(target.T)).square().sum()).backward()
        opt.step()
    for got, ref in zip((layer.base.weight, layer.lora_A, layer.lora_B), expected, strict=True):
        np.testing.assert_allclose(np_(got), ref, rtol=1e-9, atol=1e-11)
    state = opt.state[layer.lora_A]
    assert state["exp_avg"].shape == (6, 7) and state["exp_avg"].dtype == torch.float64


def test_full_mode_trains_other_parameters_with_adamw():
    model = two_adapter_model()
    head_bias = model[2].base.bias
    head_bias.requires_grad_(True)
    opt = LoRAPro(model, mode="full", lr=1e-2, weight_decay=0.01)
    assert opt.param_groups[-1]["lora_scale"] is None
    assert opt.param_groups[-1]["params"] == [head_bias]
    p, m, v = np_(head_bias), 0.0, 0.0
    for t in (1, 2):
        opt.zero_grad()
        loss_of(model, batch(seed=t)).backward()
        g = np_(head_bias.grad)
        opt.step()
        p, m, v = adamw_step(p, m, v, g, t, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.01)
    np.testing.assert_allclose(np_(head_bias), p, rtol=1e-12)


def test_bf16_linear_algebra_in_fp32():
    layer = full_rank_layer(dtype=torch.bfloat16)
    x = torch.eye(6, dtype=torch.bfloat16)
    G = torch.randn(5, 6)
    opt = LoRAPro(layer, inner=torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.0))
    (layer(x).float() * G.T).sum().backward()
    raw_A, raw_B = layer.lora_A.grad.float(), layer.lora_B.grad.float()
    expected = lora_pro_gradients(
        layer.lora_A.float(), layer.lora_B.float(), raw_A, raw_B, layer.scale
    )
    assert expected[0].dtype == torch.float32
    opt.step()
    assert layer.lora_A.grad.dtype == torch.bfloat16
    assert torch.equal(layer.lora_A.grad, expected[0].bfloat16())
    assert torch.equal(layer.lora_B.grad, expected[1].bfloat16())


def test_full_mode_bf16_keeps_fp32_state_through_resume():
    layer = full_rank_layer(dtype=torch.bfloat16)
    x = torch.eye(6, dtype=torch.bfloat16)
    opt = LoRAPro(layer, mode="full", lr=1e-2)
    (layer(x).float().square().sum()).backward()
    opt.step()
    assert layer.lora_A.dtype == torch.bfloat16
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(layer)
    opt2 = LoRAPro(twin, mode="full", lr=1e-2)
    opt2.load_state_dict(saved)
    state = opt2.state[twin.lora_A]
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], opt.state[layer.lora_A]["exp_avg"])


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_state_dict_resume_is_bit_identical(mode):
    model = two_adapter_model()
    opt = LoRAPro(model, mode=mode, lr=1e-2)

    def run(m, o, seeds):
        for seed in seeds:
            o.zero_grad()
            loss_of(m, batch(seed=seed)).backward()
            o.step()

    run(model, opt, [1, 2])
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    run(model, opt, [3, 4])
    opt2 = LoRAPro(twin, mode=mode, lr=1e-2)
    opt2.load_state_dict(saved)
    run(twin, opt2, [3, 4])
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_the_inner_optimizer():
    model = two_adapter_model()
    opt = LoRAPro(model, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss_of(model, batch()).backward()
    opt.step()
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.inner.param_groups
    assert isinstance(opt, torch.optim.Optimizer)


def test_adapters_without_gradients_are_skipped():
    model = two_adapter_model()
    opt = LoRAPro(model, inner=torch.optim.SGD(model.parameters(), lr=0.1))
    first = [p.clone() for p in model[0].parameters()]
    second = [p.clone() for p in model[2].parameters()]
    model[2](torch.randn(3, 8, dtype=F64)).sum().backward()  # only the second adapter
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(first, model[0].parameters(), strict=True))
    assert not torch.equal(second[0], model[2].lora_A)  # parameters(): lora_A comes first


# -- bad input ---------------------------------------------------------------------------------


def test_zero_initialised_lora_B_is_refused_with_advice():
    layer = LoRALinear(nn.Linear(6, 5), 2)  # PEFT-style init: lora_B = 0
    with pytest.raises(ValueError, match=r"lora_B .* full rank.*LoRA-GA"):
        LoRAPro(layer)


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_rank_lost_during_training_raises_and_changes_nothing(mode):
    model = two_adapter_model()
    opt = LoRAPro(model, mode=mode, lr=1e-2)
    loss_of(model, batch()).backward()
    opt.step()
    with torch.no_grad():
        model[2].lora_B[:, 0] = model[2].lora_B[:, 1]  # rank 2 of 3
    opt.zero_grad()
    loss_of(model, batch(seed=1)).backward()
    params = [p.clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"lora_B of .* full rank"):
        opt.step()
    for p, before, g in zip(model.parameters(), params, grads, strict=True):
        assert torch.equal(p, before)
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    torch.testing.assert_close(opt.state_dict()["state"], state["state"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["efficient", "full"])
@pytest.mark.parametrize("fault", ["missing", "nan"])
def test_bad_gradients_raise_and_change_nothing(mode, fault):
    model = two_adapter_model()
    opt = LoRAPro(model, mode=mode, lr=1e-2)
    loss_of(model, batch()).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, batch(seed=1)).backward()
    if fault == "missing":
        model[0].lora_B.grad = None
    else:
        model[0].lora_A.grad[0, 0] = float("nan")
    params = [p.clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    error = ValueError if fault == "missing" else FloatingPointError
    with pytest.raises(error, match="no gradient" if fault == "missing" else "non-finite"):
        opt.step()
    for p, before, g in zip(model.parameters(), params, grads, strict=True):
        assert torch.equal(p, before)
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(opt.state_dict()["state"], state["state"], rtol=0, atol=0)


def leaf(*shape):
    return nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize(
    ("lora", "kw", "match"),
    [
        ([(leaf(2, 6), leaf(5, 3), 1.0)], {}, r"lora\[0\].*same r"),
        ([(leaf(2, 6, 1), leaf(5, 2), 1.0)], {}, "lora_A must be"),
        ([(leaf(5, 6), leaf(5, 5), 1.0)], {}, r"rank r=5 must be in \[1, min"),
        ([(leaf(2, 6), leaf(5, 2), 0.0)], {}, "scale must be"),
        ([(leaf(2, 6), leaf(5, 2), 1.0, torch.zeros(6, 6))], {}, "base_weight"),
        ([(leaf(2, 6), leaf(5, 2))], {}, "tuple"),
        ([(torch.randn(2, 6), leaf(5, 2), 1.0)], {}, "requiring grad"),
        ([], {}, "no LoRA adapters"),
        ([(leaf(2, 6), leaf(5, 2), 1.0)], {"mode": "fast"}, "mode"),
        ([(leaf(2, 6), leaf(5, 2), 1.0)], {"x_mode": "symmetry"}, "x_mode"),
        ([(leaf(2, 6), leaf(5, 2), 1.0)], {"ridge": -1.0}, "ridge"),
        ([(leaf(2, 6), leaf(5, 2), 1.0)], {"mode": "full", "weight_decay": 0.1}, "base weight"),
        ([(leaf(2, 6), leaf(5, 2), 1.0)], {"lr": -1.0}, "lr"),
        (
            [(leaf(2, 6), leaf(5, 2), 1.0)],
            {"inner": torch.optim.SGD([leaf(3)], lr=0.1)},
            "does not hold",
        ),
    ],
)
def test_bad_construction(lora, kw, match):
    with pytest.raises(ValueError, match=match):
        LoRAPro(lora, **kw)


def test_shared_factor_and_inner_conflicts():
    A, B = leaf(2, 6), leaf(5, 2)
    with pytest.raises(ValueError, match="more than one triple"):
        LoRAPro([(A, B, 1.0), (A, leaf(5, 2), 1.0)])
    inner = torch.optim.SGD([A, B], lr=0.1)
    with pytest.raises(ValueError, match="inner optimizer"):
        LoRAPro([(A, B, 1.0)], inner=inner, lr=0.1)
    with pytest.raises(ValueError, match="mode='full'"):
        LoRAPro([(A, B, 1.0)], inner=inner, mode="full")
    opt = LoRAPro([LoRATriple(A, B, 1.0)], inner=inner)
    assert opt.param_groups is inner.param_groups

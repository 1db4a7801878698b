"""danlu.AdamW against docs/reference/algorithms.md#hidden-accumulation-tests and the NumPy
reference (tests/reference.py)."""

import numpy as np
import pytest
import torch
from reference import adam_accumulated
from torch import nn

import danlu
from danlu.functional import adamw

F64 = torch.float64


@pytest.mark.parametrize("foreach", [False, True])
def test_spec_3e_hidden_accumulation_scalar(foreach):
    # docs/reference/algorithms.md#hidden-accumulation-tests: k=2, β=(0.9, 0.999), ε=0, micro-grads
    # 1 then 3, m0=v0=0, lr=1: m = 0.05 then 0.2 (= 0.1·mean), v = 0.0005 then 0.005, update 2/√5 =
    # 0.894427.
    p = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = danlu.AdamW([p], lr=1.0, eps=0.0, weight_decay=0.0, grad_accum_steps=2, foreach=foreach)
    p.grad = torch.tensor([1.0], dtype=F64)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].item() == pytest.approx(0.05, abs=1e-15)
    assert state["exp_avg_sq"].item() == pytest.approx(0.0005, abs=1e-15)
    assert p.item() == 0.0, "no update on the first micro-step"
    assert state["step"].item() == 0 and state["micro_step"] == 1
    p.grad = torch.tensor([3.0], dtype=F64)
    opt.step()
    assert state["exp_avg"].item() == pytest.approx(0.2, abs=1e-15)
    assert state["exp_avg_sq"].item() == pytest.approx(0.005, abs=1e-15)
    assert p.item() == pytest.approx(-2 / 5**0.5, abs=1e-12)  # -0.894427
    # bias correction counts updates: counting micro-steps would give 0.665576
    assert state["step"].item() == 1 and state["micro_step"] == 2


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
def test_against_numpy_reference(foreach, k, eps_inside_sqrt):
    rng = np.random.default_rng(k)
    theta0 = rng.normal(size=(4, 3))
    micro = [rng.normal(size=(4, 3)) for _ in range(3 * k + 1)]
    kw = {"lr": 0.05, "beta1": 0.85, "beta2": 0.99, "eps": 1e-3, "wd": 0.2}
    expected = adam_accumulated(theta0, micro, k=k, eps_inside_sqrt=eps_inside_sqrt, **kw)
    p = torch.tensor(theta0)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    for t, g in enumerate(micro):
        adamw(
            [p],
            [torch.tensor(g)],
            [m],
            [v],
            [step],
            lr=kw["lr"],
            beta1=kw["beta1"],
            beta2=kw["beta2"],
            eps=kw["eps"],
            weight_decay=kw["wd"],
            eps_inside_sqrt=eps_inside_sqrt,
            grad_accum_steps=k,
            first_micro_step=t % k == 0,
            last_micro_step=(t + 1) % k == 0,
            foreach=foreach,
        )
        theta, m_ref, v_ref = expected[t]
        np.testing.assert_allclose(p.numpy(), theta, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m.numpy(), m_ref, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-12, atol=1e-14)
    assert step.item() == len(micro) // k


def test_hidden_momentum_is_the_momentum_of_the_mean_gradient():
    # docs/reference/algorithms.md#hidden-accumulation-rule: m after a window equals one k=1 step on
    # the mean gradient, exactly in float64 up to reassociation; v uses the mean of squares (larger
    # than the square of the mean).
    rng = np.random.default_rng(3)
    grads = [torch.tensor(rng.normal(size=5)) for _ in range(8)]
    acc = nn.Parameter(torch.zeros(5, dtype=F64))
    one = nn.Parameter(torch.zeros(5, dtype=F64))
    oa = danlu.AdamW([acc], lr=0.0, weight_decay=0.0, grad_accum_steps=4)
    oo = danlu.AdamW([one], lr=0.0, weight_decay=0.0)
    for i in range(0, 8, 4):
        for g in grads[i : i + 4]:
            acc.grad = g
            oa.step()
        one.grad = sum(grads[i : i + 4]) / 4
        oo.step()
    torch.testing.assert_close(oa.state[acc]["exp_avg"], oo.state[one]["exp_avg"])
    assert (oa.state[acc]["exp_avg_sq"] >= oo.state[one]["exp_avg_sq"]).all()


def test_weight_decay_only_on_updates():
    p = nn.Parameter(torch.ones(3, dtype=F64))
    opt = danlu.AdamW([p], lr=0.1, weight_decay=0.5, grad_accum_steps=3)
    for _ in range(2):
        p.grad = torch.zeros(3, dtype=F64)
        opt.step()
        assert torch.equal(p.detach(), torch.ones(3, dtype=F64))
    p.grad = torch.zeros(3, dtype=F64)
    opt.step()
    # zero gradient, ε > 0: only the decay acts, θ·(1 − ηλ) = 0.95
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95, dtype=F64))


def test_maximize_with_accumulation_leaves_grads_alone():
    a = nn.Parameter(torch.ones(4))
    b = nn.Parameter(torch.ones(4))
    oa = danlu.AdamW([a], lr=0.1, grad_accum_steps=2, maximize=True)
    ob = danlu.AdamW([b], lr=0.1, grad_accum_steps=2)
    for i in range(4):
        g = torch.full((4,), float(i + 1))
        a.grad, b.grad = g, -g
        oa.step()
        ob.step()
        assert torch.equal(a.grad, g)
    assert torch.equal(a.detach(), b.detach())


def test_resume_mid_window_in_bf16_keeps_the_window():
    # load_state_dict casts floating state tensors to the parameter dtype; the micro-step count
    # must survive that exactly (bf16 cannot count past 256).
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = danlu.AdamW([p], lr=0.1, grad_accum_steps=3)
    for _ in range(301):  # 100 updates and one micro-step into the next window
        p.grad = torch.ones(3, dtype=torch.bfloat16)
        opt.step()
    q = nn.Parameter(p.detach().clone())
    resumed = danlu.AdamW([q], lr=0.1, grad_accum_steps=3)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[q]["micro_step"] == 301
    for expected_updates in (100, 101):
        q.grad = torch.ones(3, dtype=torch.bfloat16)
        resumed.step()
        assert resumed.state[q]["step"].item() == expected_updates

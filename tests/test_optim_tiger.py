"""danlu.Tiger's shell: non-finite handling, kinds, centers, accumulation windows
(docs/reference/algorithms.md#tiger)."""

import copy
import itertools

import pytest
import torch
from torch import nn

import danlu

NAN, INF = float("nan"), float("inf")


def params_and_opt(**kw):
    gamma = nn.Parameter(torch.tensor([1.5, 0.5]))
    kernel = nn.Parameter(torch.tensor([[2.0, -1.0], [0.5, 0.25]]))
    groups = [
        {"params": [gamma], "kind": "elementwise", "center": 1.0, "param_names": ["norm.weight"]},
        {"params": [kernel], "kind": "matrix", "param_names": ["linear.weight"]},
    ]
    return gamma, kernel, danlu.Tiger(groups, lr=0.01, beta=0.9, **kw)


def warm_up(opt, *params):
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_shrink_per_tensor(bad):
    # docs/reference/algorithms.md#tiger-tests item 3: θ ← (θ − c)·s + c, momentum untouched, the
    # finite tensor still steps
    gamma, kernel, opt = params_and_opt()
    warm_up(opt, gamma, kernel)
    g0, k0 = gamma.detach().clone(), kernel.detach().clone()
    m_gamma = opt.state[gamma]["exp_avg"].clone()
    gamma.grad = torch.tensor([1.0, bad])
    kernel.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(gamma.detach(), (g0 - 1) * 0.99 + 1)
    assert torch.equal(opt.state[gamma]["exp_avg"], m_gamma)
    assert not torch.equal(kernel.detach(), k0)
    assert torch.isfinite(kernel).all()


def test_shrink_oracle_values():
    # docs/reference/algorithms.md#tiger-tests item 3 literally: gamma [1.5, 0.5] → [1.495, 0.505];
    # kernel [2, -1] → [1.98, -0.99]
    gamma = nn.Parameter(torch.tensor([1.5, 0.5], dtype=torch.float64))
    kernel = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    opt = danlu.Tiger([{"params": [gamma], "center": 1.0}, {"params": [kernel], "kind": "matrix"}])
    gamma.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
    kernel.grad = torch.tensor([INF, 1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(gamma.detach(), torch.tensor([1.495, 0.505], dtype=torch.float64))
    torch.testing.assert_close(kernel.detach(), torch.tensor([1.98, -0.99], dtype=torch.float64))
    assert torch.count_nonzero(opt.state[gamma]["exp_avg"]) == 0


def test_skip_leaves_param_and_momentum():
    gamma, kernel, opt = params_and_opt(nonfinite="skip")
    warm_up(opt, gamma, kernel)
    g0, m0 = gamma.detach().clone(), opt.state[gamma]["exp_avg"].clone()
    gamma.grad = torch.tensor([NAN, 1.0])
    kernel.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(gamma.detach(), g0)
    assert torch.equal(opt.state[gamma]["exp_avg"], m0)


def test_raise_names_the_parameter_and_modifies_nothing():
    gamma, kernel, opt = params_and_opt(nonfinite="raise")
    warm_up(opt, gamma, kernel)
    before = (copy.deepcopy(opt.state_dict()), gamma.detach().clone(), kernel.detach().clone())
    gamma.grad = torch.ones(2)
    kernel.grad = torch.tensor([[1.0, INF], [0.0, 0.0]])
    with pytest.raises(FloatingPointError, match=r"linear\.weight"):
        opt.step()
    assert torch.equal(gamma.detach(), before[1])
    assert torch.equal(kernel.detach(), before[2])
    after = opt.state_dict()
    for idx, state in before[0]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["state"][idx][key])


def test_raise_on_first_step_creates_no_state():
    gamma, kernel, opt = params_and_opt(nonfinite="raise")
    gamma.grad = torch.ones(2)
    kernel.grad = torch.full((2, 2), NAN)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert len(opt.state) == 0


def test_global_scope_shrinks_everything():
    gamma, kernel, opt = params_and_opt(nonfinite_scope="global")
    warm_up(opt, gamma, kernel)
    g0, k0 = gamma.detach().clone(), kernel.detach().clone()
    mk = opt.state[kernel]["exp_avg"].clone()
    gamma.grad = torch.ones(2)
    kernel.grad = torch.tensor([[NAN, 0.0], [0.0, 0.0]])
    opt.step()
    torch.testing.assert_close(gamma.detach(), (g0 - 1) * 0.99 + 1)
    torch.testing.assert_close(kernel.detach(), k0 * 0.99)
    assert torch.equal(opt.state[kernel]["exp_avg"], mk)


def test_inf_does_not_poison_the_momentum():
    # The reference checks isnan only: +inf then -inf would leave NaN in m.
    p = nn.Parameter(torch.ones(3))
    opt = danlu.Tiger([p], lr=0.01)
    for g in ([INF, 1.0, 1.0], [-INF, 1.0, 1.0], [1.0, 1.0, 1.0]):
        p.grad = torch.tensor(g)
        opt.step()
    assert torch.isfinite(opt.state[p]["exp_avg"]).all()
    assert torch.isfinite(p).all()


def test_nan_on_first_micro_step_skips_that_windows_decay():
    # docs/reference/algorithms.md#tiger-edge-cases: with k=2, a NaN on the window's first
    # micro-step leaves m as it was, so the β-decay of that window is skipped; the micro-step still
    # counts.
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = danlu.Tiger(
        [{"params": [p], "kind": "matrix"}], lr=0.01, beta=0.9, weight_decay=0.0, grad_accum_steps=2
    )
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()  # window 1 done: m = 0.1
    m1 = opt.state[p]["exp_avg"].clone()
    p.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
    opt.step()  # first micro-step of window 2: shrink, m untouched
    assert torch.equal(opt.state[p]["exp_avg"], m1)
    p.grad = torch.tensor([3.0, 3.0], dtype=torch.float64)
    opt.step()  # last micro-step: m = m1 + 0.05·3 (no decay this window)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m1 + 0.05 * 3)
    assert opt.state[p]["step"].item() == 4


def test_accumulation_moves_params_only_on_the_last_micro_step():
    p = nn.Parameter(torch.randn(4, 4))
    opt = danlu.Tiger([p], lr=0.01, grad_accum_steps=3)
    history = [p.detach().clone()]
    for _ in range(6):
        p.grad = torch.randn(4, 4)
        opt.step()
        history.append(p.detach().clone())
    moved = [not torch.equal(a, b) for a, b in itertools.pairwise(history)]
    assert moved == [False, False, True, False, False, True]


def test_untagged_groups_fall_back_by_ndim():
    bias = nn.Parameter(torch.tensor([0.1, -0.1], dtype=torch.float64))
    weight = nn.Parameter(torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.float64))
    opt = danlu.Tiger([bias, weight], lr=0.01, beta=0.9, weight_decay=0.0, rms_floor=0.0)
    bias.grad = torch.tensor([2.0, -3.0], dtype=torch.float64)
    weight.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([0.095, -0.095], dtype=torch.float64))
    eta = 0.01 * 2.5  # RMS([[3,-4],[0,0]]) = 2.5
    torch.testing.assert_close(
        weight.detach(), torch.tensor([[3 - eta, -4 - eta], [-eta, -eta]], dtype=torch.float64)
    )


def test_embedding_kind_on_param_groups_model():
    model = nn.Sequential(nn.Embedding(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))
    opt = danlu.Tiger(danlu.param_groups(model), lr=0.01, weight_decay=0.0, rms_floor=0.0)
    w0 = model[0].weight.detach().clone()
    model[0].weight.grad = torch.ones(4, 2)
    opt.step()
    delta = (w0 - model[0].weight.detach()).abs()[:, 0]
    torch.testing.assert_close(delta[0] / delta[1], torch.tensor(5.0))

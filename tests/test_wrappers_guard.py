"""NonFiniteGuard: skip / shrink / raise, per tensor or global, for any optimizer
(docs/reference/algorithms.md#tiger-rule, docs/reference/algorithms.md#tiger-edge-cases,
#tiger-tests item 3)."""

import copy

import pytest
import torch
from torch import nn

import danlu

NAN, INF = float("nan"), float("inf")


def setup(inner="adamw", **kw):
    gamma = nn.Parameter(torch.tensor([1.5, 0.5], dtype=torch.float64))
    kernel = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    groups = [
        {"params": [gamma], "center": 1.0, "param_names": ["norm.weight"]},
        {"params": [kernel], "param_names": ["linear.weight"]},
    ]
    opt = torch.optim.AdamW(groups, lr=0.1) if inner == "adamw" else danlu.Tiger(groups, lr=0.1)
    return gamma, kernel, danlu.NonFiniteGuard(opt, **kw)


def warm_up(opt, *params):
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def state_of(opt):
    return copy.deepcopy(opt.state_dict()["state"])


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for idx in a:
        assert a[idx].keys() == b[idx].keys()
        for key in a[idx]:
            assert torch.equal(a[idx][key], b[idx][key]), (idx, key)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_skip_tensor_scope(bad):
    gamma, kernel, guard = setup()
    warm_up(guard, gamma, kernel)
    g0 = gamma.detach().clone()
    gamma_state = copy.deepcopy(guard.state[gamma])
    # the same step on the kernel alone, with a bare optimizer
    twin = nn.Parameter(kernel.detach().clone())
    bare = torch.optim.AdamW([twin], lr=0.1)
    bare.load_state_dict(
        {
            "state": {0: copy.deepcopy(guard.state[kernel])},
            "param_groups": [{**guard.param_groups[1], "params": [0]}],
        }
    )
    bad_grad = torch.tensor([1.0, bad], dtype=torch.float64)
    gamma.grad = bad_grad
    kernel.grad = twin.grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
    guard.step()
    bare.step()
    assert torch.equal(gamma.detach(), g0)
    for key, value in gamma_state.items():
        assert torch.equal(guard.state[gamma][key], value), key  # step count included
    assert torch.equal(kernel.detach(), twin.detach())
    assert gamma.grad is bad_grad, "the user's gradient is put back"
    assert (guard.steps, guard.skipped_steps, guard.skipped_tensors) == (3, 1, 1)
    assert guard.last_nonfinite == ["'norm.weight' (shape (2,))"]


def test_skip_global_scope_changes_nothing():
    gamma, kernel, guard = setup(scope="global")
    warm_up(guard, gamma, kernel)
    before = (gamma.detach().clone(), kernel.detach().clone(), state_of(guard))
    gamma.grad = torch.ones(2, dtype=torch.float64)
    kernel.grad = torch.tensor([NAN, 0.0], dtype=torch.float64)
    guard.step()
    assert torch.equal(gamma.detach(), before[0]) and torch.equal(kernel.detach(), before[1])
    assert_state_equal(before[2], state_of(guard))
    assert (guard.skipped_steps, guard.skipped_tensors) == (1, 2)


@pytest.mark.parametrize("inner", ["adamw", "tiger"])
def test_shrink_spec_2e3(inner):
    # docs/reference/algorithms.md#tiger-tests item 3, s = 0.99: gamma (centre 1) [1.5, 0.5] →
    # [1.495, 0.505]; kernel (centre 0) [2, -1] → [1.98, -0.99]; the optimizer state is not touched.
    gamma, kernel, guard = setup(inner, mode="shrink", scope="global")
    gamma.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
    kernel.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    guard.step()
    torch.testing.assert_close(gamma.detach(), torch.tensor([1.495, 0.505], dtype=torch.float64))
    torch.testing.assert_close(kernel.detach(), torch.tensor([1.98, -0.99], dtype=torch.float64))
    assert len(guard.state) == 0


def test_shrink_tensor_scope_steps_the_finite_tensor():
    gamma, kernel, guard = setup(mode="shrink", shrink_ratio=0.5)
    gamma.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    kernel.grad = torch.tensor([INF, 1.0], dtype=torch.float64)
    guard.step()
    torch.testing.assert_close(kernel.detach(), torch.tensor([1.0, -0.5], dtype=torch.float64))
    # Adam's first step is ±lr (ε aside), plus AdamW's decay θ(1 − 0.1·0.01)
    expected = torch.tensor([1.5, 0.5], dtype=torch.float64) * (1 - 1e-3) - 0.1
    torch.testing.assert_close(gamma.detach(), expected, rtol=1e-6, atol=1e-8)


def test_raise_names_the_tensor_and_modifies_nothing():
    gamma, kernel, guard = setup(mode="raise")
    warm_up(guard, gamma, kernel)
    before = (gamma.detach().clone(), kernel.detach().clone(), state_of(guard), guard.steps)
    gamma.grad = torch.ones(2, dtype=torch.float64)
    kernel.grad = torch.tensor([1.0, -INF], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"linear\.weight"):
        guard.step()
    assert torch.equal(gamma.detach(), before[0]) and torch.equal(kernel.detach(), before[1])
    assert_state_equal(before[2], state_of(guard))
    assert guard.steps == before[3] and guard.skipped_steps == 0


def test_counts_over_a_run_and_closure():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    guard = danlu.NonFiniteGuard(danlu.Lion(model.parameters(), lr=1e-2))
    x = torch.randn(8, 3)
    for i in range(10):

        def closure(i=i):
            guard.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            if i % 4 == 1:
                model.bias.grad[0] = NAN
            return loss

        loss = guard.step(closure)
        assert torch.is_tensor(loss)
    assert (guard.steps, guard.skipped_steps, guard.skipped_tensors) == (10, 3, 3)
    assert torch.isfinite(model.bias).all()


def test_sparse_gradients_are_checked():
    embed = nn.Embedding(5, 3, sparse=True)
    guard = danlu.NonFiniteGuard(torch.optim.SparseAdam(embed.parameters(), lr=0.1))
    w0 = embed.weight.detach().clone()
    embed(torch.tensor([1, 2])).sum().backward()
    embed.weight.grad = torch.sparse_coo_tensor(
        embed.weight.grad._indices(), torch.full((2, 3), NAN), (5, 3), check_invariants=True
    )
    guard.step()
    assert torch.equal(embed.weight.detach(), w0) and guard.skipped_tensors == 1
    guard.zero_grad()
    embed(torch.tensor([1, 2])).sum().backward()
    guard.step()
    assert not torch.equal(embed.weight.detach(), w0) and guard.skipped_tensors == 1


def test_inside_gradient_accumulation_checks_the_window_mean():
    p = nn.Parameter(torch.zeros(2))
    guard = danlu.NonFiniteGuard(torch.optim.SGD([p], lr=1.0))
    opt = danlu.GradientAccumulation(guard, steps=2)
    for g in ([1.0, NAN], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]):
        opt.zero_grad()
        (p * torch.tensor(g)).sum().backward()
        opt.step()
    # the first window is skipped whole (its mean is NaN), the second applies its mean
    assert torch.equal(p.detach(), torch.tensor([-3.0, -3.0]))
    assert guard.steps == 2 and guard.skipped_steps == 1

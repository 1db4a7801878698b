"""danlu.AdamW against its peer torch.optim.AdamW: with grad_accum_steps=1 they agree (same
defaults, state keys and results); with k > 1 danlu hides the accumulation in the moments, which
torch does not offer (torch + danlu.GradientAccumulation is the exact-accumulation comparison,
in tests/test_wrappers_accumulation.py)."""

import inspect

import pytest
import torch
from torch import nn

import danlu


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_k1_equals_torch_adamw(foreach, weight_decay):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 1, 2)]
    init = [torch.randn(s) for s in shapes]
    ours = [nn.Parameter(x.clone()) for x in init]
    theirs = [nn.Parameter(x.clone()) for x in init]
    kw = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    a = danlu.AdamW(ours, foreach=foreach, **kw)
    b = torch.optim.AdamW(theirs, foreach=foreach, **kw)
    for _ in range(12):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=1e-6, atol=1e-12)
    # a torch AdamW checkpoint loads into danlu.AdamW and continues identically
    c = danlu.AdamW([nn.Parameter(q.detach().clone()) for q in theirs], foreach=foreach, **kw)
    c.load_state_dict(b.state_dict())
    assert c.state[c.param_groups[0]["params"][0]]["exp_avg"].shape == shapes[0]
    # and it steps as torch's continues
    mine = c.param_groups[0]["params"]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(mine, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        c.step()
        b.step()
    for p, q in zip(mine, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_same_defaults_as_torch():
    ours = inspect.signature(danlu.AdamW).parameters
    theirs = inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay", "maximize", "foreach"):
        assert ours[name].default == theirs[name].default, name

"""danlu.Lion / danlu.Tiger next to the peers that implement the same algorithms."""

import pytest
import torch
from torch import nn

import danlu

lion_pytorch = pytest.importorskip("lion_pytorch")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

SHAPES = [(17, 33), (129,), (3, 5, 7), (1,)]


def random_problem(seed, steps=20):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
        {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 0.1},
    ],
)
def test_lion_equals_lion_pytorch(kw, foreach):
    """Same algorithm (google/automl's): equal to float rounding over 20 steps."""
    params, grads = random_problem(0)
    ours = [nn.Parameter(p.clone()) for p in params]
    theirs = [nn.Parameter(p.clone()) for p in params]
    o1 = danlu.Lion(ours, foreach=foreach, **kw)
    o2 = lion_pytorch.Lion(theirs, **kw)
    for step_grads in grads:
        for a, b, g in zip(ours, theirs, step_grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs, strict=True):
        # parameters move in steps of exactly lr: any disagreement in a sign would show as lr
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            o1.state[a]["exp_avg"], o2.state[b]["exp_avg"], rtol=1e-6, atol=1e-7
        )


def test_lion_state_dict_interchanges_with_lion_pytorch():
    p = nn.Parameter(torch.randn(4, 4))
    theirs = lion_pytorch.Lion([p], lr=1e-3)
    p.grad = torch.randn(4, 4)
    theirs.step()
    ours = danlu.Lion([p], lr=1e-3)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[p]["exp_avg"], theirs.state[p]["exp_avg"])
    # and it steps: one more step of each from the same point agrees
    q = nn.Parameter(p.detach().clone())
    twin = lion_pytorch.Lion([q], lr=1e-3)
    twin.load_state_dict(theirs.state_dict())
    p.grad = torch.randn(4, 4)
    q.grad = p.grad.clone()
    ours.step()
    twin.step()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_tiger_differs_from_pytorch_optimizer_by_the_rms_factor():
    """pytorch_optimizer.Tiger is plain sign-momentum with decoupled decay: no RMS-relative lr,
    no 0.5 for element-wise tensors, no accumulation or NaN handling. One step of danlu.Tiger
    with relative lr α equals one step of theirs with lr = α·RMS(θ) (matrix) or 0.5·α
    (element-wise, no decay)."""
    torch.manual_seed(0)
    w0, b0 = torch.randn(8, 8, dtype=torch.float64) * 0.3, torch.randn(8, dtype=torch.float64)
    gw, gb = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    alpha, wd = 1e-3, 0.01

    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    ours = danlu.Tiger(
        [{"params": [w], "kind": "matrix"}, {"params": [b], "kind": "elementwise"}],
        lr=alpha,
        weight_decay=wd,
    )
    w.grad, b.grad = gw.clone(), gb.clone()
    ours.step()

    rms = w0.pow(2).mean().sqrt().item()
    tw, tb = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    theirs = pytorch_optimizer.Tiger(
        [
            {"params": [tw], "lr": alpha * rms, "weight_decay": wd},
            {"params": [tb], "lr": 0.5 * alpha, "weight_decay": 0.0},
        ],
        beta=0.965,
    )
    tw.grad, tb.grad = gw.clone(), gb.clone()
    theirs.step()
    torch.testing.assert_close(w, tw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b, tb, rtol=1e-12, atol=1e-15)

    # With the same lr argument the two are different algorithms: theirs moves every entry by
    # α, ours by α·RMS(θ) (here about 0.3·α).
    naive_w = nn.Parameter(w0.clone())
    naive = pytorch_optimizer.Tiger([naive_w], lr=alpha, weight_decay=0.0)
    naive_w.grad = gw.clone()
    naive.step()
    ratio = ((w0 - w.detach()).abs().mean() / (w0 - naive_w.detach()).abs().mean()).item()
    assert ratio == pytest.approx(rms, rel=0.05)
    assert not torch.allclose(w, naive_w)

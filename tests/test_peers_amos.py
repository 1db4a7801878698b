"""danlu.Amos next to pytorch_optimizer.Amos (docs/reference/algorithms.md#amos-optimizer,
PEERS.md).

pytorch_optimizer keeps v and b as one scalar per tensor and fixes η by ndim (1-D 0.5, 2-D
√(2/size(1)), otherwise √(1/size(1))). With those settings danlu is the same algorithm; the
defaults differ on purpose and the tests below show where.
"""

import math

import pytest
import torch
from torch import nn

import danlu

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

SHAPES = [(17, 33), (129,), (3, 5, 7), (8, 4, 3, 3)]


def their_eta(shape):
    if len(shape) <= 1:
        return 0.5
    return math.sqrt((2 if len(shape) == 2 else 1) / shape[1])


def problem(seed, steps=10):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.3 for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    return params, grads


def run(make_opt, params, grads):
    ps = [nn.Parameter(p.clone()) for p in params]
    opt = make_opt(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def ours_like_theirs(ps, **kw):
    groups = [{"params": [p], "eta": their_eta(tuple(p.shape))} for p in ps]
    return danlu.Amos(groups, slots="scalar", **kw)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equals_pytorch_optimizer_amos_with_scalar_slots(momentum, foreach):
    params, grads = problem(0)
    kw = {"lr": 0.05, "beta": 0.99, "momentum": momentum}
    ours, o1 = run(lambda ps: ours_like_theirs(ps, foreach=foreach, **kw), params, grads)
    theirs, o2 = run(lambda ps: pytorch_optimizer.Amos(ps, foreach=foreach, **kw), params, grads)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for p, q in zip(o1.state, o2.state, strict=True):
        torch.testing.assert_close(o1.state[p]["b"], o2.state[q]["decay"], rtol=1e-5, atol=0)
        torch.testing.assert_close(
            o1.state[p]["exp_avg_sq"], o2.state[q]["exp_avg_sq"], rtol=1e-5, atol=0
        )


def test_default_slots_differ_per_output_feature():
    """danlu's default keeps one v and b per output feature of matrices and conv kernels
    (jestimator's shape_fn examples); pytorch_optimizer one scalar per tensor. The updates
    differ as soon as rows have different gradient scales."""
    params, grads = problem(1)
    for step_grads in grads:
        step_grads[0][:5] *= 10  # some output rows with 10× larger gradients
    per_output, o1 = run(
        lambda ps: danlu.Amos(
            [{"params": [p], "eta": their_eta(tuple(p.shape))} for p in ps], lr=0.05
        ),
        params,
        grads,
    )
    theirs, o2 = run(lambda ps: pytorch_optimizer.Amos(ps, lr=0.05), params, grads)
    state = o1.state[next(iter(o1.state))]
    assert state["exp_avg_sq"].shape == (17, 1)
    assert o2.state[next(iter(o2.state))]["exp_avg_sq"].shape == ()
    assert not torch.allclose(per_output[0], theirs[0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(per_output[1], theirs[1], rtol=1e-5, atol=1e-7)  # vectors: scalar


def test_default_eta_differs_for_conv_kernels():
    """danlu's η = √(2/fan_in) uses fan_in = in·kh·kw for a (out, in, kh, kw) kernel (and
    √(2/…) for every hidden ≥2-D tensor); pytorch_optimizer uses √(1/size(1)) for ndim > 2."""
    from danlu.algorithms.amos.optimizer import resolve_eta

    kernel = torch.zeros(8, 4, 3, 3)
    assert resolve_eta("auto", kernel, None) == pytest.approx(math.sqrt(2 / 36))
    assert their_eta(tuple(kernel.shape)) == pytest.approx(math.sqrt(1 / 4))
    params, grads = problem(2)
    ours, _ = run(lambda ps: danlu.Amos(ps, lr=0.05, slots="scalar"), params, grads)
    theirs, _ = run(lambda ps: pytorch_optimizer.Amos(ps, lr=0.05), params, grads)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)  # 2-D: same η
    assert not torch.allclose(ours[3], theirs[3], rtol=1e-3, atol=1e-5)


def test_maximize_leaves_the_users_gradient_alone():
    """pytorch_optimizer negates p.grad in place under maximize; danlu does not."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    g = torch.tensor([1.0, -2.0, 3.0])
    ours = danlu.Amos([p], lr=0.05, maximize=True)
    theirs = pytorch_optimizer.Amos([q], lr=0.05, maximize=True)
    p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    theirs.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(p.grad, g)
    assert torch.equal(q.grad, -g)

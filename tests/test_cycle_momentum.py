"""torch's OneCycleLR and CyclicLR with every danlu optimizer, cycle_momentum True and False.

torch cycles ``group["betas"][0]`` when the optimizer's defaults have ``betas``, else
``group["momentum"]``, else refuses. What danlu does (docs/recipes.md, "Schedulers"):

* AdamW, AdaX, Lion: β1 is cycled, as for torch.optim.AdamW, and each step uses the cycled β1
  (checked against NumPy float64 re-implementations).
* Tiger, AdaFactor: torch refuses at construction (their momentum is ``beta``/``beta1``);
  Amos: its ``momentum`` (0 = off) would be switched on, so ``step()`` refuses before changing
  anything. All three errors say ``cycle_momentum``.
* cycle_momentum=False: every optimizer follows the lr cycle and keeps its momentum settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

import danlu
from tests import reference

STEPS = 8
SCHEDULERS = {
    "OneCycleLR": lambda opt, cycle: OneCycleLR(
        opt, max_lr=1e-2, total_steps=STEPS, cycle_momentum=cycle
    ),
    "CyclicLR": lambda opt, cycle: CyclicLR(
        opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=cycle
    ),
}
MOMENTUM_KEYS = ("betas", "beta", "beta1", "momentum")
# "momentum" in defaults, but cycling it changes the algorithm: refused by step()
REFUSED_AT_STEP = ("amos",)
# torch cycles β1 of "betas" or "momentum" where the defaults hold one, and refuses otherwise
# (generated from the registry, so that a new optimizer is classified as torch classifies it)
REFUSED_BY_TORCH = tuple(
    n
    for n, info in sorted(danlu.REGISTRY.items())
    if not {"betas", "momentum"} & set(info.defaults)
)
CYCLED = tuple(n for n in sorted(danlu.REGISTRY) if n not in REFUSED_BY_TORCH + REFUSED_AT_STEP)


def test_the_classification_is_the_expected_one():
    # the six optimizers as they were classified by hand before the lists were generated
    expected = {"adamw": CYCLED, "adax": CYCLED, "lion": CYCLED, "adafactor": REFUSED_BY_TORCH}
    expected |= {"tiger": REFUSED_BY_TORCH, "amos": REFUSED_AT_STEP}
    assert all(name in group for name, group in expected.items())


def make(name: str):
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 5, generator=gen, dtype=torch.float64))
    return param, danlu.REGISTRY[name].cls([param])


def grads():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


def momentum_settings(group):
    return {k: group[k] for k in MOMENTUM_KEYS if k in group}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", sorted(danlu.REGISTRY))
def test_without_cycle_momentum_every_optimizer_follows_the_lr_cycle(name, sched):
    param, opt = make(name)
    settings = momentum_settings(opt.param_groups[0])
    scheduler = SCHEDULERS[sched](opt, False)
    # the lrs torch's scheduler gives a plain SGD optimizer
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    plain_scheduler = SCHEDULERS[sched](plain, False)
    start = param.detach().clone()
    for g in grads():
        assert opt.param_groups[0]["lr"] == pytest.approx(plain.param_groups[0]["lr"], rel=1e-12)
        param.grad = g
        opt.step()
        scheduler.step()
        plain.step()  # no gradient: only keeps the scheduler's call order
        plain_scheduler.step()
        assert momentum_settings(opt.param_groups[0]) == settings
    assert torch.isfinite(param).all() and not torch.equal(param, start)
    if name == "amos":  # momentum 0: no momentum buffer
        assert set(opt.state[param]) <= {"step", "exp_avg_sq", "b"}, set(opt.state[param])


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", REFUSED_BY_TORCH)
def test_cycle_momentum_is_refused_at_construction_for_tiger_and_adafactor(name, sched):
    _, opt = make(name)
    settings = momentum_settings(opt.param_groups[0])
    lr = opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="cycle_momentum"):
        SCHEDULERS[sched](opt, True)
    assert momentum_settings(opt.param_groups[0]) == settings
    # torch's CyclicLR writes base_lr (1e-3) into every group before it refuses (it held only by
    # chance while every optimizer refused here had the default lr 1e-3); OneCycleLR refuses first
    assert opt.param_groups[0]["lr"] == (1e-3 if sched == "CyclicLR" else lr)


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_cycle_momentum_is_refused_by_amos_step_before_anything_changes(sched):
    param, opt = make("amos")
    SCHEDULERS[sched](opt, True)
    start = param.detach().clone()
    param.grad = grads()[0]
    with pytest.raises(ValueError, match=r"param_groups\[0\]: momentum .*cycle_momentum=False"):
        opt.step()
    assert torch.equal(param, start)
    assert not opt.state


def adax_step(theta, m, v, g, t, *, lr, beta1, beta2, eps, wd):
    """AdaX in the blog's unnormalised form (v_t = (1+β2)v + β2 g²), float64."""
    m = beta1 * m + (1 - beta1) * g
    v = (1 + beta2) * v + beta2 * g**2
    v_hat = v / ((1 + beta2) ** t - 1)
    theta = theta - lr * (m / (np.sqrt(v_hat) + eps) + wd * theta)
    return theta, m, v


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", CYCLED)
def test_cycle_momentum_cycles_beta1_and_each_step_uses_it(name, sched):
    param, opt = make(name)
    beta2 = opt.param_groups[0]["betas"][1]
    scheduler = SCHEDULERS[sched](opt, True)
    # torch's own AdamW under the same scheduler: the β1 sequence danlu's groups must show
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    torch_scheduler = SCHEDULERS[sched](torch_opt, True)
    theta = param.detach().numpy().copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    beta1s = []
    for t, g in enumerate(grads(), start=1):
        group = opt.param_groups[0]
        lr, beta1 = float(group["lr"]), group["betas"][0]
        assert beta1 == pytest.approx(torch_opt.param_groups[0]["betas"][0], rel=1e-12)
        assert group["betas"][1] == beta2
        beta1s.append(beta1)
        wd = group["weight_decay"]
        g_np = g.numpy()
        if name == "lion":
            theta, m = reference.lion_step(theta, m, g_np, lr=lr, beta1=beta1, beta2=beta2, wd=wd)
        elif name == "adamw":
            theta, m, v = reference.adamw_step(
                theta, m, v, g_np, t, lr=lr, betas=(beta1, beta2), eps=group["eps"], wd=wd
            )
        else:
            theta, m, v = adax_step(
                theta, m, v, g_np, t, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], wd=wd
            )
        param.grad = g
        opt.step()
        scheduler.step()
        torch_opt.step()  # no gradient: only keeps the scheduler's call order
        torch_scheduler.step()
        np.testing.assert_allclose(param.detach().numpy(), theta, rtol=1e-10, atol=1e-12)
    assert len(set(beta1s)) > 2, beta1s  # it did cycle

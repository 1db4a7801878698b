"""A torch.compile'd step containing ``opt.step()`` equals eager, and an LR scheduler changing a
tensor lr does not recompile it (pytorch#133898), for every registered optimizer.

Each case runs the same steps twice, eagerly and compiled (Inductor, CPU), with a StepLR that
changes the tensor lr after every step, and compares parameters and state. The compiled run
counts the frames Dynamo compiles (``CompileCounterWithBackend``): the count after the first
step must not grow (no recompile when the lr, the step counters or the state change).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import danlu
from danlu.registry import REGISTRY

STEPS = 5

# A step size per optimizer that moves the tiny model visibly (Amos's lr is ξ ≈ 1/√N).
LR = {"lion": 1e-2, "tiger": 1e-2, "adafactor": 1e-2, "adax": 1e-2, "amos": 0.1, "adamw": 1e-2}

# (optimizer, extra arguments): the default path, the foreach path, and settings that
# exercise code a compiled step must trace without reading counters or flags to the host.
CASES = [
    ("lion", {}),
    ("lion", {"foreach": True}),
    ("tiger", {}),
    ("tiger", {"foreach": True, "nonfinite_scope": "global"}),
    ("adafactor", {}),
    # the relative step with a tensor multiplier (lr=None would make it the float 1.0)
    (
        "adafactor",
        {
            "foreach": True,
            "relative_step": True,
            "lr": 1.0,
            "beta1": 0.9,
            "min_dim_size_to_factor": 4,
        },
    ),
    ("adax", {}),
    ("adax", {"foreach": True}),
    ("amos", {}),
    ("amos", {"foreach": True, "momentum": 0.5}),
    ("adamw", {}),
    ("adamw", {"foreach": True}),
]


def test_every_registered_optimizer_is_covered():
    assert {name for name, _ in CASES} == set(REGISTRY) == set(LR)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # the optimizers share DanluOptimizer.step's code object, whose cache holds 8 entries
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def run(name: str, kwargs: dict, *, compiled: bool, steps: int = STEPS, grads=None):
    """``steps`` steps of ``name`` on the tiny model; returns (model, optimizer, frame counts
    after each step). ``grads(model, step)`` sets the gradients (default: an MSE loss)."""
    model = make_model()
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", LR[name])
    if lr is not None:
        lr = torch.tensor(lr)
    opt = danlu.create_optimizer(name, model, lr=lr, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))

    def step():
        opt.step()
        opt.zero_grad()

    counter = CompileCounterWithBackend("inductor")
    stepper = torch.compile(step, backend=counter) if compiled else step
    frames = []
    for i in range(steps):
        if grads is None:
            torch.nn.functional.mse_loss(model(x), y).backward()
        else:
            grads(model, i)
        stepper()
        sched.step()
        frames.append(counter.frame_count)
    return model, opt, frames


def assert_same_run(eager, compiled, *, rtol=1e-5, atol=1e-6):
    (m_e, o_e, _), (m_c, o_c, _) = eager, compiled
    for a, b in zip(m_e.parameters(), m_c.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    for p_e, p_c in zip(m_e.parameters(), m_c.parameters(), strict=True):
        s_e, s_c = o_e.state[p_e], o_c.state[p_c]
        assert s_e.keys() == s_c.keys()
        for key in s_e:
            torch.testing.assert_close(s_c[key], s_e[key], rtol=rtol, atol=atol, msg=key)
    for g_e, g_c in zip(o_e.param_groups, o_c.param_groups, strict=True):
        assert g_c.keys() == g_e.keys()
        torch.testing.assert_close(g_c["lr"], g_e["lr"])


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_compiled_step_equals_eager_without_recompiling(name, kwargs):
    eager = run(name, kwargs, compiled=False)
    compiled = run(name, kwargs, compiled=True)
    frames = compiled[2]
    assert frames[0] > 0
    assert frames == [frames[0]] * STEPS, f"recompiled when the lr changed: {frames}"
    assert_same_run(eager, compiled)

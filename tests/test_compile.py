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
from optimizer_cases import CASES as OPTIMIZER_CASES
from torch._dynamo.testing import CompileCounterWithBackend

import danlu
from danlu.registry import REGISTRY

STEPS = 5

# A step size per optimizer that moves the tiny model visibly (Amos's lr is ξ ≈ 1/√N).
LR = {"lion": 1e-2, "tiger": 1e-2, "adafactor": 1e-2, "adax": 1e-2, "amos": 0.1, "adamw": 1e-2}

# (optimizer, extra arguments, backend): the default and the foreach path of every optimizer,
# and settings that a compiled step must trace without reading counters or flags to the
# host. "aot_eager" captures and recompiles exactly as Inductor does but skips its code
# generation (seconds of C++ compilation per graph on a CI core); Inductor's numbers for
# every optimizer and parameter kind are checked on a language model in
# tests/test_compile_real_lm.py, and here for Tiger (the docs' recipe) and its non-finite
# policy.
CASES = [
    ("lion", {}, "aot_eager"),
    ("lion", {"foreach": True}, "aot_eager"),
    ("tiger", {}, "inductor"),
    ("tiger", {"foreach": True, "nonfinite_scope": "global"}, "aot_eager"),
    ("adafactor", {}, "aot_eager"),
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
        "aot_eager",
    ),
    ("adax", {}, "aot_eager"),
    ("adax", {"foreach": True}, "aot_eager"),
    ("amos", {}, "aot_eager"),
    ("amos", {"foreach": True, "momentum": 0.5}, "aot_eager"),
    ("adamw", {}, "aot_eager"),
    ("adamw", {"foreach": True}, "aot_eager"),
]

# A registered optimizer not listed above: its default path and its foreach path (where it
# declares one), at its conformance lr (tests/optimizer_cases.py). Add a line above to tune it.
for _name in sorted(set(REGISTRY) - {n for n, _, _ in CASES}):
    LR.setdefault(_name, OPTIMIZER_CASES[_name]["kwargs"]["lr"])
    CASES.append((_name, {}, "aot_eager"))
    if "foreach" in REGISTRY[_name].paths:
        CASES.append((_name, {"foreach": True}, "aot_eager"))


def test_every_registered_optimizer_is_covered():
    assert {name for name, _, _ in CASES} == set(REGISTRY) == set(LR)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # the optimizers share DanluOptimizer.step's code object, whose cache holds 8 entries
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def run(
    name: str,
    kwargs: dict,
    *,
    compiled: bool,
    steps: int = STEPS,
    grads=None,
    backend: str = "inductor",
):
    """``steps`` steps of ``name`` on the tiny model; returns (model, optimizer, frame counts
    after each step). ``grads(model, step)`` sets the gradients (default: an MSE loss).
    ``backend="aot_eager"`` skips Inductor's code generation, for the tests about what
    Dynamo captures and recompiles."""
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

    counter = CompileCounterWithBackend(backend)
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


@pytest.mark.parametrize(
    ("name", "kwargs", "backend"), CASES, ids=[f"{n}-{b}-{k}" for n, k, b in CASES]
)
def test_compiled_step_equals_eager_without_recompiling(name, kwargs, backend):
    eager = run(name, kwargs, compiled=False)
    compiled = run(name, kwargs, compiled=True, backend=backend)
    frames = compiled[2]
    assert frames[0] > 0
    assert frames == [frames[0]] * STEPS, f"recompiled when the lr changed: {frames}"
    assert_same_run(eager, compiled)


def nonfinite_grads(model, step):
    """Gradients of a fixed loss, with an inf in the first layer's bias on step 2 and a NaN
    in the last layer's weight on step 3."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.mse_loss(model(x), torch.zeros(16, 1)).backward()
    if step == 2:
        model[0].bias.grad[3] = float("inf")
    if step == 3:
        model[2].weight.grad[0, 5] = float("nan")


@pytest.mark.parametrize(
    ("nonfinite", "scope", "backend"),
    [("shrink", "tensor", "inductor"), ("skip", "global", "aot_eager")],
)
def test_compiled_tiger_applies_the_nonfinite_policy_like_eager(nonfinite, scope, backend):
    kwargs = {"nonfinite": nonfinite, "nonfinite_scope": scope}
    eager = run("tiger", kwargs, compiled=False, grads=nonfinite_grads)
    compiled = run("tiger", kwargs, compiled=True, grads=nonfinite_grads, backend=backend)
    frames = compiled[2]
    assert frames == [frames[0]] * STEPS, f"a non-finite gradient recompiled: {frames}"
    assert_same_run(eager, compiled)
    for p in compiled[0].parameters():
        assert torch.isfinite(p).all() and torch.isfinite(compiled[1].state[p]["exp_avg"]).all()


@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_compiled_accumulation_compiles_once_per_window_position(name):
    # with grad_accum_steps=k the window position decides what a micro-step does (decay or
    # not, move or not): at most 3 variants (first, middle, last), compiled in the first
    # window and reused after it
    kwargs = {"grad_accum_steps": 3}
    eager = run(name, kwargs, compiled=False, steps=9)
    compiled = run(name, kwargs, compiled=True, steps=9, backend="aot_eager")
    frames = compiled[2]
    assert frames[2] == frames[8], frames
    assert frames[:3] == [frames[0], frames[0] + 1, frames[0] + 2], frames
    assert_same_run(eager, compiled)
    assert compiled[1].micro_step == eager[1].micro_step == 9


def test_compiled_step_checks_like_eager_and_a_failed_step_changes_nothing():
    model, opt, _ = run("tiger", {}, compiled=True, steps=2, backend="aot_eager")
    step = torch.compile(opt.step, backend="aot_eager")
    x = torch.randn(4, 8)
    model(x).sum().backward()
    before = {p: (p.clone(), opt.state[p]["exp_avg"].clone()) for p in model.parameters()}
    micro_step = opt.micro_step
    opt.param_groups[0]["lr"].fill_(-1.0)  # e.g. a custom scheduler gone wrong
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be a number in \[0, "):
        step()
    opt.param_groups[0]["lr"].fill_(1e-3)
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    for group in opt.param_groups:
        group["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in .*nothing was modified"):
        step()
    for p, (value, exp_avg) in before.items():
        assert torch.equal(p, value) and torch.equal(opt.state[p]["exp_avg"], exp_avg)
    assert opt.micro_step == micro_step


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_compiled_train_step_equals_eager_without_recompiling(name):
    # the docs' recipe: forward, backward and the step in one compiled function
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))
    params, frames = {}, []
    for compiled in (False, True):
        model = make_model()
        opt = danlu.create_optimizer(name, model, lr=torch.tensor(LR[name]))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)

        def train_step(model=model, opt=opt):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(train_step, backend=counter) if compiled else train_step
        for _ in range(STEPS):
            step()
            sched.step()
            if compiled:
                frames.append(counter.frame_count)
        params[compiled] = [p.detach().clone() for p in model.parameters()]
    assert frames[0] > 0
    assert frames == [frames[0]] * STEPS, f"recompiled when the lr changed: {frames}"
    for a, b in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

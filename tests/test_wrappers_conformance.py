"""Conformance checks for every wrapper (DESIGN.md "Correctness"): checkpoints resume bit for bit
(the wrapper's own counters and buffers included), lr schedulers act on the inner lr, bad
arguments raise ValueError naming the argument."""

import copy
import itertools
import warnings

import pytest
import torch
from test_conformance import TinyNet, make_data
from torch import nn

import danlu
from danlu.wrappers import OptimizerWrapper


def tiger(model, **kw):
    return danlu.Tiger(danlu.param_groups(model), lr=2e-2, **kw)


def adamw(model, **kw):
    return danlu.AdamW(danlu.param_groups(model), lr=1e-2, **kw)


BUILDERS = {
    "accumulation-tiger": lambda m: danlu.GradientAccumulation(tiger(m), steps=3),
    "accumulation-torch-sgd": lambda m: danlu.GradientAccumulation(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), steps=2
    ),
    "update-every": lambda m: danlu.UpdateEvery(
        adamw(m, betas=danlu.accumulation_betas((0.9, 0.999), 3)), steps=3
    ),
    "guard-skip": lambda m: danlu.NonFiniteGuard(adamw(m)),
    "guard-shrink-global": lambda m: danlu.NonFiniteGuard(
        tiger(m), mode="shrink", scope="global", shrink_ratio=0.9
    ),
    "lazy": lambda m: danlu.Lazy(tiger(m), lazy_moments=False),
    "lazy-moments-torch-adam": lambda m: danlu.Lazy(
        torch.optim.Adam(m.parameters(), lr=1e-2), params=[m.embed.weight], lazy_moments=True
    ),
    "multi": lambda m: danlu.MultiOptimizer.adam_for_embeddings(m, lr=2e-2),
    "in-backward-tiger": lambda m: danlu.step_in_backward(tiger(m, grad_accum_steps=2)),
    "in-backward-lion": lambda m: danlu.step_in_backward(
        danlu.Lion(danlu.param_groups(m), lr=3e-3, weight_decay=0.1)
    ),
    "nested": lambda m: danlu.GradientAccumulation(
        danlu.NonFiniteGuard(danlu.Lazy(adamw(m), lazy_moments=True)), steps=2
    ),
}
NAMES = sorted(BUILDERS)
POISONED = {3, 7}  # micro-steps whose gradient of the hidden layer is made NaN


def sparse_tokens(n=64, vocab=11, seq=5, seed=0):
    # Tokens 0..6 only, so rows 7..10 of the table are absent (the lazy wrappers have work to do).
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (n, seq), generator=gen)
    return tokens, make_data(n, vocab, seq, seed=seed)[1]


def build(name, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    return model, BUILDERS[name](model)


def train(model, opt, steps, data, start=0, poison=False):
    tokens, target = data
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = (model(tokens[i % 4 :: 4]) - target[i % 4 :: 4]).pow(2).mean()
        loss.backward()
        if poison and i in POISONED and model.hidden.weight.grad is not None:
            model.hidden.weight.grad[0, 0] = float("nan")
        opt.step()


def assert_same(a, b, path="state_dict"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", NAMES)
def test_is_an_optimizer_and_trains(name):
    model, opt = build(name)
    assert isinstance(opt, torch.optim.Optimizer)
    data = sparse_tokens()
    tokens, target = data
    before = (model(tokens) - target).pow(2).mean().item()
    train(model, opt, 60, data)
    after = (model(tokens) - target).pow(2).mean().item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_identical(name):
    poison = name.startswith("guard") or name == "nested"
    data = sparse_tokens()
    model, opt = build(name)
    train(model, opt, 5, data, poison=poison)  # 5: mid-window for the accumulating wrappers
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 6, data, start=5, poison=poison)
    expected = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    model2, opt2 = build(name, seed=123)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, 6, data, start=5, poison=poison)
    assert_same(expected[0], model2.state_dict(), "model")
    assert_same(expected[1], opt2.state_dict())
    if poison:
        guard = next(o for o in danlu.wrappers._base.unwrap(opt2) if hasattr(o, "skipped_steps"))
        assert guard.skipped_steps >= 1


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_acts_on_the_inner_lr(name):
    model, opt = build(name)
    innermost = [o for o in danlu.wrappers._base.unwrap(opt)][-1]
    inner_groups = (
        opt.param_groups if isinstance(innermost, danlu.MultiOptimizer) else innermost.param_groups
    )
    lr0 = [g["lr"] for g in inner_groups]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        train(model, opt, 1, sparse_tokens())
        sched.step()
    assert [g["lr"] for g in inner_groups] == pytest.approx([lr / 2 for lr in lr0])


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_of_another_kind_raises_and_changes_nothing(name):
    model, opt = build(name)
    train(model, opt, 2, sparse_tokens())
    before = copy.deepcopy(opt.state_dict())
    wrong = {"state": {}, "param_groups": [], "danlu_wrappers": [{"type": "Elsewhere"}]}
    if isinstance(opt, danlu.MultiOptimizer):
        wrong = {"optimizers": {"other": {}}}
    with pytest.raises(ValueError):
        opt.load_state_dict(wrong)
    assert_same(before, opt.state_dict())


def foreign():
    return nn.Parameter(torch.ones(3, 2))


def plain():
    return danlu.Tiger([nn.Parameter(torch.ones(4, 2))], lr=0.1)


BAD_ARGUMENTS = [
    ("optimizer", lambda: danlu.GradientAccumulation("adam", steps=2)),
    ("steps", lambda: danlu.GradientAccumulation(plain(), steps=0)),
    ("steps", lambda: danlu.GradientAccumulation(plain(), steps=2.0)),
    ("steps", lambda: danlu.UpdateEvery(plain(), steps=-1)),
    ("betas", lambda: danlu.accumulation_betas(1.0, 2)),
    (r"betas\[1\]", lambda: danlu.accumulation_betas((0.9, 1.5), 2)),
    ("steps", lambda: danlu.accumulation_betas((0.9, 0.99), 0)),
    ("mode", lambda: danlu.NonFiniteGuard(plain(), mode="ignore")),
    ("scope", lambda: danlu.NonFiniteGuard(plain(), scope="layer")),
    ("shrink_ratio", lambda: danlu.NonFiniteGuard(plain(), shrink_ratio=0.0)),
    ("shrink_ratio", lambda: danlu.NonFiniteGuard(plain(), shrink_ratio=1.01)),
    ("optimizer", lambda: danlu.NonFiniteGuard(danlu.GradientAccumulation(plain(), 2))),
    ("params", lambda: danlu.Lazy(plain(), params=[foreign()])),
    ("params", lambda: danlu.Lazy(plain())),  # no kind="embedding" group to default to
    ("params", lambda: danlu.Lazy(plain(), params=[])),
    ("lazy_moments", lambda: danlu.Lazy(plain(), params=None, lazy_moments="yes")),
    ("optimizers", lambda: danlu.MultiOptimizer([])),
    ("optimizers", lambda: danlu.MultiOptimizer(plain())),
    ("disjoint", lambda: _overlapping()),
    ("model", lambda: danlu.MultiOptimizer.adam_for_embeddings(nn.Linear(2, 2))),
    ("optimizer", lambda: danlu.step_in_backward(danlu.GradientAccumulation(plain(), 2))),
    ("optimizer", lambda: danlu.step_in_backward(danlu.UpdateEvery(plain(), 2))),
    ("scope", lambda: danlu.step_in_backward(danlu.NonFiniteGuard(plain(), scope="global"))),
    (
        "nonfinite_scope",
        lambda: danlu.step_in_backward(danlu.Tiger([foreign()], nonfinite_scope="global")),
    ),
    ("weight_decay", lambda: danlu.diagnostics.embedding_drift(torch.ones(3, 2), 0.0)),
    ("threshold", lambda: danlu.diagnostics.embedding_drift(torch.ones(3, 2), 0.1, threshold=2)),
    ("embedding_dim", lambda: danlu.nn.tied_embedding_std(10, 0)),
    ("weight", lambda: danlu.nn.init_tied_embedding_(torch.ones(3))),
]


def _overlapping():
    shared = foreign()
    return danlu.MultiOptimizer([danlu.Tiger([shared]), torch.optim.SGD([shared], lr=0.1)])


@pytest.mark.parametrize(
    "arg,make", BAD_ARGUMENTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_arguments_raise_value_error_naming_the_argument(arg, make):
    with pytest.raises(ValueError, match=arg):
        make()


def test_wrappers_share_the_inner_objects():
    inner = plain()
    for wrapper in (
        danlu.GradientAccumulation(inner, 2),
        danlu.NonFiniteGuard(inner),
        danlu.UpdateEvery(inner, 2),
    ):
        assert isinstance(wrapper, OptimizerWrapper)
        assert wrapper.param_groups is inner.param_groups
        assert wrapper.state is inner.state
        assert wrapper.defaults is inner.defaults
        extra = nn.Parameter(torch.ones(2))
        wrapper.add_param_group({"params": [extra], "lr": 0.5})
        assert inner.param_groups[-1]["params"][0] is extra
        inner.param_groups.pop()


def test_deepcopy_of_a_wrapper_is_independent():
    p = nn.Parameter(torch.ones(3))
    opt = danlu.GradientAccumulation(danlu.Tiger([p], lr=0.1), steps=2)
    clone = copy.deepcopy(opt)
    assert clone.optimizer is not opt.optimizer and clone.steps == 2
    for _ in itertools.repeat(None, 2):
        p.grad = torch.ones(3)
        opt.step()
    assert clone.micro_step == 0 and opt.updated

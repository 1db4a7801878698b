"""MultiOptimizer: several optimizers over disjoint parameters as one
(docs/reference/algorithms.md#embedding-drift-fixes item 3)."""

import pytest
import torch
from test_conformance import TinyNet, make_data
from torch import nn

import danlu


def train(model, opt, steps):
    tokens, target = make_data()
    for _ in range(steps):
        opt.zero_grad()
        (model(tokens) - target).pow(2).mean().backward()
        opt.step()


def test_equals_the_optimizers_stepped_separately():
    torch.manual_seed(0)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())

    def split(model):
        emb = danlu.AdamW([model.embed.weight], lr=1e-2, weight_decay=0.0)
        rest = [p for n, p in model.named_parameters() if not n.startswith("embed")]
        return emb, danlu.Tiger(rest, lr=2e-2)

    multi = danlu.MultiOptimizer(split(a))
    emb, rest = split(b)
    tokens, target = make_data()
    for _ in range(5):
        multi.zero_grad()
        (a(tokens) - target).pow(2).mean().backward()
        multi.step()
        emb.zero_grad()
        rest.zero_grad()
        (b(tokens) - target).pow(2).mean().backward()
        emb.step()
        rest.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    multi.zero_grad()
    assert all(p.grad is None for p in a.parameters())


def test_adam_for_embeddings_one_liner():
    torch.manual_seed(0)
    model = TinyNet()
    opt = danlu.MultiOptimizer.adam_for_embeddings(
        model, danlu.Tiger, lr=2e-2, weight_decay=0.05, embedding_lr=3e-3
    )
    assert list(opt.optimizers) == ["embeddings", "rest"]
    emb, rest = opt["embeddings"], opt["rest"]
    assert isinstance(emb, danlu.AdamW) and isinstance(rest, danlu.Tiger)
    assert [p for g in emb.param_groups for p in g["params"]] == [model.embed.weight]
    assert emb.param_groups[0]["lr"] == 3e-3 and emb.param_groups[0]["weight_decay"] == 0.0
    kinds = {g["kind"]: g for g in rest.param_groups}
    assert set(kinds) == {"matrix", "elementwise"}
    assert kinds["matrix"]["weight_decay"] == 0.05
    assert all(g["weight_decay"] == 0.0 for g in rest.param_groups if g["kind"] == "elementwise")
    assert len(opt.param_groups) == len(emb.param_groups) + len(rest.param_groups)
    train(model, opt, 3)
    assert set(opt.state[model.embed.weight]) == {"exp_avg", "exp_avg_sq", "step"}
    assert set(opt.state[model.hidden.weight]) == {"exp_avg", "step"}
    assert len(opt.state) == len(list(model.parameters()))
    assert opt.state.get(nn.Parameter(torch.ones(1))) is None


def test_tied_embedding_is_given_once():
    emb = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 4), head)
    opt = danlu.MultiOptimizer.adam_for_embeddings(model, lr=1e-3)
    owned = [p for _, p in danlu.wrappers._base.iter_params(opt)]
    assert sum(p is emb.weight for p in owned) == 1
    assert opt.owner(emb.weight) is opt["embeddings"]


def test_one_scheduler_for_all_and_one_per_optimizer():
    torch.manual_seed(0)
    model = TinyNet()
    opt = danlu.MultiOptimizer.adam_for_embeddings(model, lr=2e-2, embedding_lr=1e-2)
    every = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    only_rest = torch.optim.lr_scheduler.StepLR(opt["rest"], step_size=1, gamma=0.1)
    train(model, opt, 1)
    every.step()
    only_rest.step()
    assert opt["embeddings"].param_groups[0]["lr"] == pytest.approx(5e-3)
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt["rest"].param_groups)


def test_add_param_group_names_the_optimizer_and_keeps_disjoint():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = danlu.MultiOptimizer({"x": torch.optim.SGD([a], lr=0.1), "y": danlu.Tiger([b])})
    c = nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="optimizer"):
        opt.add_param_group({"params": [c]})
    with pytest.raises(ValueError, match="disjoint"):
        opt.add_param_group({"params": [a]}, optimizer="y")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        opt.add_param_group({"params": [c]}, optimizer="z")
    opt.add_param_group({"params": [c], "lr": 0.5}, optimizer="y")
    assert opt.owner(c) is opt["y"] and opt.param_groups[-1]["lr"] == 0.5


def test_wrappers_compose_around_it():
    torch.manual_seed(0)
    model = TinyNet()
    multi = danlu.MultiOptimizer.adam_for_embeddings(model, lr=2e-2)
    opt = danlu.GradientAccumulation(danlu.NonFiniteGuard(multi), steps=2)
    train(model, opt, 4)
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())

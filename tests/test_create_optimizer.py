"""danlu.create_optimizer in both argument orders: danlu's (name, params) and timm's
(model_or_params, name), with timm's no-decay convention for 1-D parameters."""

import pytest
import torch
from torch import nn

import danlu
from danlu.registry import REGISTRY


class ConvNet(nn.Module):
    """A timm-like model: conv, batch norm, embedding, positional table, linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(7, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.scale = nn.Parameter(torch.ones(4))  # 1-D, not called bias
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward(self, x, tokens):
        h = self.bn(self.conv(x)).mean(dim=(2, 3)) * self.scale
        h = h + self.embed(tokens).mean(dim=1) + self.pos_embed.mean(dim=(0, 1))
        return self.head(h)


def timm_expected_decay(model, weight_decay):
    """timm's rule (param_groups_weight_decay), written out independently of danlu."""
    skip = model.no_weight_decay()
    return {
        name: 0.0 if p.ndim <= 1 or name.endswith(".bias") or name in skip else weight_decay
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def decay_of_each_parameter(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


# Amos has no λ (its decay is adaptive, docs/reference/algorithms.md#amos-optimizer), so it takes no
# weight_decay argument.
DECAYING = sorted(n for n, info in REGISTRY.items() if "weight_decay" in info.defaults)


@pytest.mark.parametrize("name", DECAYING)
def test_timm_order_applies_the_timm_no_decay_convention(name):
    model = ConvNet()
    opt = danlu.create_optimizer(model, name, lr=1e-3, weight_decay=0.05)
    assert type(opt) is REGISTRY[name].cls
    assert decay_of_each_parameter(opt, model) == timm_expected_decay(model, 0.05)
    # the frozen layer is left out, every trainable parameter is in exactly one group
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())


def test_both_orders_and_the_opt_keyword_give_the_same_groups():
    model = ConvNet()
    a = danlu.create_optimizer("tiger", model, lr=1e-3, weight_decay=0.05)
    b = danlu.create_optimizer(model, "tiger", lr=1e-3, weight_decay=0.05)
    c = danlu.create_optimizer(model, opt="TIGER", lr=1e-3, weight_decay=0.05)
    for other in (b, c):
        assert len(other.param_groups) == len(a.param_groups)
        for ga, gb in zip(a.param_groups, other.param_groups, strict=True):
            assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]
            assert {k: v for k, v in ga.items() if k != "params"} == {
                k: v for k, v in gb.items() if k != "params"
            }


def test_kinds_are_kept_for_tiger():
    model = ConvNet()
    opt = danlu.create_optimizer(model, "tiger", lr=1e-3)
    kind = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert kind["embed.weight"] == "embedding"
    assert kind["conv.weight"] == kind["head.weight"] == kind["pos_embed"] == "matrix"
    assert kind["bn.weight"] == kind["scale"] == kind["head.bias"] == "elementwise"
    # pos_embed is a matrix without decay (no_weight_decay), in a group of its own
    group = next(g for g in opt.param_groups if "pos_embed" in g["param_names"])
    assert group["param_names"] == ["pos_embed"] and group["weight_decay"] == 0.0


def test_weight_decay_default_comes_from_the_optimizer():
    model = ConvNet()
    opt = danlu.create_optimizer(model, "tiger")
    decay = decay_of_each_parameter(opt, model)
    assert decay == timm_expected_decay(model, REGISTRY["tiger"].defaults["weight_decay"])


def test_filter_bias_and_bn_false_gives_one_untagged_group():
    model = ConvNet()
    opt = danlu.create_optimizer(model, "lion", weight_decay=0.1, filter_bias_and_bn=False)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.1 and "kind" not in group
    assert len(group["params"]) == sum(p.requires_grad for p in model.parameters())


def test_iterables_of_parameters_and_groups_pass_through():
    model = ConvNet()
    opt = danlu.create_optimizer(model.head.parameters(), "adamw", lr=1e-2)
    assert [p.shape for p in opt.param_groups[0]["params"]] == [(2, 4), (2,)]
    groups = [{"params": [model.head.weight], "lr": 0.5}, {"params": [model.head.bias]}]
    opt = danlu.create_optimizer(groups, "lion", lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3]


def test_the_created_optimizer_trains():
    torch.manual_seed(0)
    model = ConvNet()
    opt = danlu.create_optimizer(model, "tiger", lr=1e-2)
    x, tokens = torch.randn(8, 3, 6, 6), torch.randint(0, 7, (8, 3))
    target = torch.randn(8, 2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x, tokens) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("tiger",), {}, "params"),
        (("tiger", "lion"), {}, "params"),
        ((), {"opt": "tiger"}, None),
        ((nn.Linear(2, 2),), {}, "opt"),
        ((nn.Linear(2, 2), [nn.Parameter(torch.ones(1))]), {}, "one optimizer name"),
        (("tiger", nn.Linear(2, 2)), {"opt": "lion"}, "opt"),
        ((nn.Linear(2, 2), "tiger"), {"opt": "lion"}, "opt"),
        ((nn.Linear(2, 2), "adamq"), {}, "unknown optimizer"),
        ((nn.Linear(2, 2), "tiger"), {"filter_bias_and_bn": "yes"}, "filter_bias_and_bn"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        danlu.create_optimizer(*args, **kwargs)

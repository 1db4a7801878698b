"""danlu.param_groups: kinds, centers, weight decay
(docs/reference/algorithms.md#tiger-edge-cases)."""

import pytest
import torch
from torch import nn

import danlu
from danlu.params import classify_parameters


class LlamaRMSNorm(nn.Module):  # a third-party norm recognised by its class name
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.rms = LlamaRMSNorm(4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_kinds_and_centers():
    table = {name: (kind, center) for name, _, kind, center in classify_parameters(Model())}
    assert table == {
        "embed.weight": ("embedding", 0.0),
        "proj.weight": ("matrix", 0.0),
        "proj.bias": ("elementwise", 0.0),
        "ln.weight": ("elementwise", 1.0),
        "ln.bias": ("elementwise", 0.0),
        "bn.weight": ("elementwise", 1.0),
        "bn.bias": ("elementwise", 0.0),
        "rms.weight": ("elementwise", 1.0),
        "conv.weight": ("matrix", 0.0),
        "conv.bias": ("elementwise", 0.0),
        "scale": ("elementwise", 0.0),
    }


def test_groups_weight_decay_and_names():
    model = Model()
    groups = danlu.param_groups(model, weight_decay=0.05)
    by_kind = {(g["kind"], g["center"]): g for g in groups}
    assert by_kind[("matrix", 0.0)]["weight_decay"] == 0.05
    assert by_kind[("embedding", 0.0)]["weight_decay"] == 0.05
    assert by_kind[("elementwise", 1.0)]["weight_decay"] == 0.0
    assert by_kind[("elementwise", 0.0)]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups)
    assert n == len({id(p) for p in model.parameters() if p.requires_grad})
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])


def test_without_weight_decay_uses_optimizer_default():
    groups = danlu.param_groups(Model())
    opt = danlu.Tiger(groups, weight_decay=0.02)
    wds = {g["kind"] + str(g["center"]): g["weight_decay"] for g in opt.param_groups}
    assert wds["matrix0.0"] == 0.02 and wds["elementwise0.0"] == 0.0


def test_groups_work_with_torch_optimizers():
    opt = torch.optim.AdamW(danlu.param_groups(Model(), weight_decay=0.1))
    assert len(opt.param_groups) == 4


@pytest.mark.parametrize("bad", [-1.0, "0.1", True])
def test_bad_weight_decay(bad):
    with pytest.raises(ValueError, match="weight_decay"):
        danlu.param_groups(Model(), weight_decay=bad)


def test_existing_groups_are_unchanged_and_gain_eta():
    # Without output_layer: the same four groups as before, now with Amos's eta tags.
    groups = danlu.param_groups(Model(), weight_decay=0.05)
    assert [(g["kind"], g["center"]) for g in groups] == [
        ("matrix", 0.0),
        ("embedding", 0.0),
        ("elementwise", 1.0),
        ("elementwise", 0.0),
    ]
    assert [g["eta"] for g in groups] == ["auto", "auto", 0.5, 0.5]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)


@pytest.mark.parametrize("spec", ["module", "name", "param", "param_name", "list"])
def test_output_layer_gets_its_own_group(spec):
    model = Net()
    output_layer = {
        "module": model.head,
        "name": "head",
        "param": model.head.weight,
        "param_name": "head.weight",
        "list": [model.head],
    }[spec]
    groups = danlu.param_groups(model, weight_decay=0.1, output_layer=output_layer)
    by_key = {(g["kind"], g["eta"]): g for g in groups}
    out = by_key[("matrix", "output")]
    assert out["param_names"] == ["head.weight"] and out["weight_decay"] == 0.1
    assert by_key[("matrix", "auto")]["param_names"] == ["hidden.weight", "conv.weight"]
    assert "head.bias" in by_key[("elementwise", 0.5)]["param_names"]
    assert len(groups) == 5  # hidden layers of different fan_in share one "auto" group


def test_amos_reads_the_eta_tags():
    from danlu.algorithms.amos.optimizer import resolve_eta

    model = Net()
    opt = danlu.Amos(danlu.param_groups(model, output_layer=model.head))
    etas = {}
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            etas[name] = resolve_eta(group["eta"], p, group["kind"])
    assert etas["hidden.weight"] == pytest.approx((2 / 4) ** 0.5)
    assert etas["conv.weight"] == pytest.approx((2 / 24) ** 0.5)  # fan_in = in·k = 8·3
    assert etas["embed.weight"] == pytest.approx((2 / 4) ** 0.5)  # fan_in = dim
    assert etas["head.weight"] == pytest.approx((1 / 8) ** 0.5)
    assert etas["norm.weight"] == etas["head.bias"] == 0.5


@pytest.mark.parametrize("bad", ["nope", nn.Linear(2, 2), 3])
def test_bad_output_layer(bad):
    with pytest.raises(ValueError, match="output_layer"):
        danlu.param_groups(Net(), output_layer=bad)

"""danlu.lora.LoRALinear, inject and adapter discovery (docs/reference/algorithms.md#conventions
naming, docs/reference/algorithms.md#lora)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import danlu
from danlu.lora import LoRALinear, find_lora_adapters, inject, lora_triples


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 12),
        nn.ReLU(),
        nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 6)),
        nn.LayerNorm(6),
    )


def test_forward_is_base_plus_scaled_product():
    base = nn.Linear(7, 5, dtype=torch.float64)
    layer = LoRALinear(base, rank=2, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, dtype=torch.float64)
    W0, b = base.weight.detach().numpy(), base.bias.detach().numpy()
    A, B = layer.lora_A.detach().numpy(), layer.lora_B.detach().numpy()
    expected = x.numpy() @ W0.T + b + 3.0 * x.numpy() @ A.T @ B.T  # s = α/r = 3
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-12)


def test_starts_as_the_base_layer_with_frozen_base():
    base = nn.Linear(6, 4)
    x = torch.randn(2, 6)
    expected = base(x)
    layer = LoRALinear(base, rank=3)
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (4, 3)
    assert not layer.lora_B.any() and layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize(
    ("alpha", "rslora", "expected"), [(None, False, 1.0), (8, False, 2.0), (8, True, 4.0)]
)
def test_scale(alpha, rslora, expected):
    layer = LoRALinear(nn.Linear(10, 10), rank=4, alpha=alpha, rslora=rslora)
    assert math.isclose(layer.scale, expected)


def test_factors_follow_base_dtype():
    layer = LoRALinear(nn.Linear(6, 4, dtype=torch.bfloat16), rank=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("rank", [0, 4, 5, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(6, 4), rank=rank)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"alpha": 0.0}, "alpha"), ({"alpha": math.nan}, "alpha"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_hyper_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(6, 4), rank=2, **kw)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # PEFT-style: equal names or ".suffix"; "1" (the ReLU) is not a Linear
        (["0", "1"], ["0", "2.0", "2.1"]),
        (r"2\.\d", ["2.0", "2.1"]),  # regex, full match
        (lambda name, m: m.out_features == 6, ["2.1"]),
    ],
)
def test_inject_targets(target, expected):
    model = small_model()
    assert inject(model, target=target, rank=2) == expected
    assert [a.name for a in find_lora_adapters(model)] == expected


def test_inject_freezes_everything_else():
    model = small_model()
    x = torch.randn(3, 8)
    before = model(x)
    inject(model, target=r".*", rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in ("0", "2.0", "2.1") for f in "AB"}
    torch.testing.assert_close(model(x), before)


def test_inject_without_freezing():
    model = small_model()
    inject(model, target=["0"], rank=2, freeze_base=False)
    assert model[3].weight.requires_grad
    assert not model[0].base.weight.requires_grad  # the adapted weight itself stays frozen


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"target": ["nothing"], "rank": 2}, "no nn.Linear"),
        ({"target": r".*", "rank": 6}, "rank"),  # 2.1 is 10→6: rank 6 is not below min(10, 6)
        ({"target": r".*", "rank": 2, "alpha": -1}, "alpha"),
        ({"target": r".*", "rank": 2, "dropout": -0.1}, "dropout"),
        ({"target": 3, "rank": 2}, "target"),
    ],
)
def test_inject_bad_input_leaves_model_unchanged(kw, match):
    model = small_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=match):
        inject(model, **kw)
    assert not find_lora_adapters(model)
    assert all(p.requires_grad for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_triples_are_explicit_tensors():
    model = small_model()
    inject(model, target=r"0|2\.1", rank=3, alpha=6)
    triples = lora_triples(model)
    assert [(t.lora_A.shape, t.lora_B.shape, t.scale) for t in triples] == [
        ((3, 8), (12, 3), 2.0),
        ((3, 10), (6, 3), 2.0),
    ]
    assert triples[0].lora_A is model[0].lora_A
    assert triples[1].base_weight is model[2][1].base.weight


def test_exported_from_the_top_level():
    assert danlu.lora.LoRALinear is LoRALinear
    assert "lora" in danlu.__all__

"""danlu.lora next to PEFT (peft 0.21 ships LoRA-GA as LoraGAConfig + preprocess_loraga).

Where they agree: the averaged gradients, and with ``scale="peft_*"`` the initial factors up to
the sign of each singular vector (SVD signs are arbitrary,
docs/reference/algorithms.md#lora-ga-edge-cases; danlu fixes them, PEFT does not) and the
base-weight shift. Where they differ on purpose: danlu's ``"stable"`` is the reference code's (both
factors scaled, no singular values; PEERS.md "PEFT LoRA-GA API").
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from danlu.lora import (
    LoRAPro,
    average_gradients,
    find_lora_adapters,
    inject,
    lora_ga_init_,
    lora_triples,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

# peft's preprocess_loraga counts backward passes with full backward hooks, which warn when the
# inputs do not require grad; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

RANK, ALPHA = 3, 6.0  # s = 2; 4r ≥ min(in, out) for every layer, so PEFT's svd_lowrank is exact


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class GPT2Block(nn.Module):
    """GPT-2 style: Conv1D layers store their weight as (in, out) (PEFT's fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(12, 10)
        self.c_proj = Conv1D(8, 12)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def batches(n=3, in_f=10, out_f=4):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, in_f, generator=gen), torch.randn(16, out_f, generator=gen))
        for _ in range(n)
    ]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def peft_lora_ga(model, targets, direction, scale, data, **cfg):
    """PEFT's own LoRA-GA; returns (peft model, {name: PEFT's averaged gradient})."""
    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=direction, scale=scale),
        **cfg,
    )

    def train_step():
        for batch in data:
            mse(model, batch).backward()

    preprocess_loraga(model, config, train_step)
    grads = {
        name: m._peft_loraga_grad.clone()
        for name, m in model.named_modules()
        if hasattr(m, "_peft_loraga_grad")
    }
    return get_peft_model(model, config), grads


def peft_plain(model, targets, **cfg):
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True, **cfg
    )
    return get_peft_model(model, config)


def assert_equal_up_to_signs(ours, theirs, dim):
    """Rows (dim=0) or columns (dim=1) equal up to one sign each."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    signs = torch.sign((ours * theirs).sum(dim=1 - dim, keepdim=True))
    torch.testing.assert_close(ours * signs, theirs, rtol=1e-4, atol=1e-5)


PEFT_SCALE = {"peft_stable": "stable", "peft_unit": "unit", "peft_gd": "gd_scale"}


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["peft_stable", "peft_unit", "peft_gd"])
def test_peft_variant_equals_peft_lora_ga(direction, scale):
    torch.manual_seed(0)
    original = Net()
    data = batches()
    w_orig = {n: m.weight.detach().clone() for n, m in original.named_modules() if n}
    x = torch.randn(5, 10)
    out_orig = original(x).detach()

    theirs, peft_grads = peft_lora_ga(
        copy.deepcopy(original), ["fc1", "fc2"], direction, PEFT_SCALE[scale], data
    )
    ours = peft_plain(copy.deepcopy(original), ["fc1", "fc2"])
    our_grads = average_gradients(ours, data, mse)
    lora_ga_init_(ours, data, mse, direction=direction, scale=scale, svd="full")

    their_adapters = {a.name.split(".")[-1]: a for a in find_lora_adapters(theirs)}
    for a in find_lora_adapters(ours):
        short = a.name.split(".")[-1]
        b = their_adapters[short]
        torch.testing.assert_close(our_grads[a.name], peft_grads[short], rtol=1e-6, atol=1e-8)
        assert_equal_up_to_signs(a.lora_A, b.lora_A, dim=0)
        assert_equal_up_to_signs(a.lora_B, b.lora_B, dim=1)
        for adapter in (a, b):  # each shifts W0 by its own −s·B0A0
            expected = w_orig[short] - adapter.scale * adapter.lora_B @ adapter.lora_A
            torch.testing.assert_close(adapter.base_weight, expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), out_orig, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), out_orig, atol=1e-5, rtol=1e-5)


def test_reference_stable_scale_differs_from_peft_on_purpose():
    """PEERS.md: PEFT multiplies lora_B by S[r:2r]·m^{1/4}/√γ and leaves lora_A unscaled;
    the reference (danlu's "stable") scales both by m^{1/4}/√γ and uses no S."""
    torch.manual_seed(0)
    original = Net()
    data = batches()
    theirs, peft_grads = peft_lora_ga(copy.deepcopy(original), ["fc1"], "ArB2r", "stable", data)
    ours = peft_plain(copy.deepcopy(original), ["fc1"])
    lora_ga_init_(ours, data, mse, scale="stable", svd="full")
    (a,), (b,) = find_lora_adapters(ours), find_lora_adapters(theirs)
    c = 12**0.25 / 16**0.5  # out_features = 12, γ = 16
    sigma = np.linalg.svd(peft_grads["fc1"].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(a.lora_A.norm(dim=1).detach(), [c] * RANK, rtol=1e-5)
    np.testing.assert_allclose(a.lora_B.norm(dim=0).detach(), [c] * RANK, rtol=1e-5)
    np.testing.assert_allclose(b.lora_A.norm(dim=1).detach(), [1.0] * RANK, rtol=1e-5)
    np.testing.assert_allclose(b.lora_B.norm(dim=0).detach(), sigma[RANK : 2 * RANK] * c, rtol=1e-4)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr"])
def test_fan_in_fan_out_conv1d_against_peft(direction):
    """GPT-2's Conv1D stores W as (in, out). PEFT transposes the gradient but takes "out" for
    the stable scale m^{1/4} from ``weight.shape[0]``, which is in_features there; danlu uses
    out_features (the reference's m = feature_out). So lora_B differs by exactly
    (out/in)^{1/4}; lora_A and the singular vectors agree."""
    torch.manual_seed(0)
    original = GPT2Block()
    data = batches(out_f=8)
    x = torch.randn(5, 10)
    out_orig = original(x).detach()
    targets = ["c_fc", "c_proj"]
    theirs, _ = peft_lora_ga(
        copy.deepcopy(original), targets, direction, "stable", data, fan_in_fan_out=True
    )
    ours = peft_plain(copy.deepcopy(original), targets, fan_in_fan_out=True)
    lora_ga_init_(ours, data, mse, direction=direction, scale="peft_stable", svd="full")
    for a, b in zip(find_lora_adapters(ours), find_lora_adapters(theirs), strict=True):
        assert a.fan_in_fan_out and a.base_weight.shape == (a.in_features, a.out_features)
        assert_equal_up_to_signs(a.lora_A, b.lora_A, dim=0)
        peft_bug = (a.out_features / a.in_features) ** 0.25
        assert_equal_up_to_signs(a.lora_B, b.lora_B * peft_bug, dim=1)
    torch.testing.assert_close(ours(x), out_orig, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(x), out_orig, atol=1e-5, rtol=1e-5)


def test_same_init_on_danlu_and_peft_layers():
    torch.manual_seed(0)
    original = Net()
    data = batches()
    on_peft = peft_plain(copy.deepcopy(original), ["fc1", "fc2"])
    on_danlu = copy.deepcopy(original)
    inject(on_danlu, target=["fc1", "fc2"], rank=RANK, alpha=ALPHA)
    for model in (on_peft, on_danlu):
        lora_ga_init_(model, data, mse)  # defaults: ArB2r, reference "stable", randomized SVD
    for a, b in zip(find_lora_adapters(on_peft), find_lora_adapters(on_danlu), strict=True):
        for x, y in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B), (a.base_weight, b.base_weight)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_lora_pro_on_a_peft_model_uses_its_adapters():
    torch.manual_seed(0)
    data = batches()
    model = peft_plain(Net(), ["fc1", "fc2"])
    lora_ga_init_(model, data, mse)
    twin = copy.deepcopy(model)
    opt = LoRAPro(model, lr=1e-2)
    assert len(opt.triples) == 2 and opt.triples[0].lora_A is lora_triples(model)[0].lora_A
    assert opt.triples[0].scale == ALPHA / RANK
    # the same step from explicit triples on the twin
    triples = [(t.lora_A, t.lora_B, t.scale) for t in lora_triples(twin)]
    opt2 = LoRAPro(triples, lr=1e-2)
    for o, m in ((opt, model), (opt2, twin)):
        for batch in data:
            o.zero_grad()
            mse(m, batch).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_initialised_peft_adapters_are_refused():
    model = peft_plain(Net(), ["fc1"])
    with pytest.raises(ValueError, match="LoRA-GA"):
        LoRAPro(model)

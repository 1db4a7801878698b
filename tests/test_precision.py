"""Low-precision state (state_dtype) and stochastic rounding of bf16 parameters."""

import copy

import pytest
import torch
from torch import nn

import danlu
from danlu.core.precision import stochastic_round_

NAMES = ["lion", "tiger"]


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    torch.manual_seed(0)
    src = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of a bf16 spacing
    dst = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(dst, src)
    values = set(dst.float().unique().tolist())
    assert values <= {1.0, 1.0 + 2**-7}
    # P(up) = 1/8; the mean is 1 + 2^-10 within a few standard errors
    mean = dst.double().mean().item()
    sem = 2**-7 * (0.125 * 0.875 / 200_000) ** 0.5
    assert abs(mean - (1.0 + 2**-10)) < 5 * sem


def test_stochastic_rounding_keeps_exact_values_and_specials():
    src = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), float("nan"), -1e-40])
    dst = torch.empty(7, dtype=torch.bfloat16)
    stochastic_round_(dst, src)
    assert dst[:5].float().tolist() == [1.0, -2.5, 0.0, float("inf"), -float("inf")]
    assert torch.isnan(dst[5])
    assert dst[6].float().item() <= 0


def test_stochastic_rounding_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match="bf16"):
        stochastic_round_(torch.empty(2), torch.empty(2))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_is_kept_through_steps_and_load_state_dict(name):
    model = _model()
    opt = danlu.create_optimizer(name, model, lr=1e-2, state_dtype=torch.bfloat16)
    _train(model, opt, 3)
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    # 2 bytes of state per fp32 parameter
    numel = sum(p.numel() for p in model.parameters())
    state = sum(opt.state[p]["exp_avg"].numel() * 2 for p in model.parameters())
    assert state / numel == 2
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=2)
    reference = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = danlu.create_optimizer(name, model2, lr=1e-2, state_dtype=torch.bfloat16)
    opt2.load_state_dict(saved_opt)  # torch casts the state to fp32 here; the hook undoes it
    for p in model2.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.bfloat16
    _train(model2, opt2, 3, seed=2)
    for a, b in zip(reference, model2.parameters(), strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_tracks_fp32_state(name):
    ref_model, model = _model(), _model()
    ref = danlu.create_optimizer(name, ref_model, lr=1e-3)
    low = danlu.create_optimizer(name, model, lr=1e-3, state_dtype=torch.bfloat16)
    _train(ref_model, ref, 5)
    _train(model, low, 5)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        # a sign flip of a near-zero momentum moves an entry by 2·lr at most
        assert (a - b).abs().max().item() <= 2 * 1e-3 * 5 + 1e-6
        assert (a - b).abs().mean().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_keeps_updates_below_bf16_spacing(name):
    # Parameters at 1.0 (bf16 spacing 2^-7 ≈ 0.0078) and a step of 1e-4 per update: plain
    # bf16 rounding loses every update, stochastic rounding moves the mean by the right amount.
    torch.manual_seed(0)
    n, steps, lr = 20_000, 10, 1e-4
    kw = {"lr": lr, "weight_decay": 0.0}
    if name == "tiger":
        kw["lr"] = 2 * lr  # elementwise kind: η = 0.5·lr
    plain = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    rounded = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    o1 = danlu.REGISTRY[name].cls([plain], stochastic_rounding=False, **kw)
    o2 = danlu.REGISTRY[name].cls([rounded], stochastic_rounding=True, **kw)
    for _ in range(steps):
        plain.grad = torch.ones(n, dtype=torch.bfloat16)
        rounded.grad = torch.ones(n, dtype=torch.bfloat16)
        o1.step()
        o2.step()
    assert torch.equal(plain.detach(), torch.ones(n, dtype=torch.bfloat16))
    expected = 1.0 - steps * lr
    assert rounded.dtype == torch.bfloat16
    assert abs(rounded.double().mean().item() - expected) < 0.05 * steps * lr


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [torch.int32, "bf16"])
def test_bad_state_dtype(name, bad):
    with pytest.raises(ValueError, match="state_dtype"):
        danlu.REGISTRY[name].cls([nn.Parameter(torch.ones(2))], state_dtype=bad)

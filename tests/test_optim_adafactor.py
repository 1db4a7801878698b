"""danlu.AdaFactor's shell: state sizes, lr=None with schedulers, layouts, dtypes
(docs/reference/algorithms.md#adafactor)."""

import copy

import numpy as np
import pytest
import torch
from reference import adafactor_run
from torch import nn

import danlu


def test_factored_matrix_keeps_n_plus_m_statistics():
    # docs/reference/algorithms.md#adafactor-claims: an n×m matrix keeps n + m numbers, not n·m (no
    # momentum with β1 = 0).
    p = nn.Parameter(torch.randn(200, 300))
    opt = danlu.AdaFactor([p])
    p.grad = torch.randn(200, 300)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert state["exp_avg_sq_row"].shape == (200, 1)
    assert state["exp_avg_sq_col"].shape == (1, 300)
    assert state["exp_avg_sq_row"].numel() + state["exp_avg_sq_col"].numel() == 200 + 300


def test_conv_kernel_keeps_other_axes():
    # docs/reference/algorithms.md#adafactor-rule: a (3, 3, 256, 512) kernel keeps v_r (3,3,256,1)
    # and v_c (3,3,1,512).
    p = nn.Parameter(torch.zeros(3, 3, 256, 512))
    opt = danlu.AdaFactor([p], beta1=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg_sq_row"].shape == (3, 3, 256, 1)
    assert opt.state[p]["exp_avg_sq_col"].shape == (3, 3, 1, 512)
    assert opt.state[p]["exp_avg"].shape == p.shape


def test_unfactored_below_threshold():
    p, q = nn.Parameter(torch.randn(100, 300)), nn.Parameter(torch.randn(128, 128))
    opt = danlu.AdaFactor([p, q])
    p.grad, q.grad = torch.randn(100, 300), torch.randn(128, 128)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].shape == (100, 300)
    assert "exp_avg_sq_row" in opt.state[q]


def reference_history(theta, grads, **kw):
    return adafactor_run(theta.double().numpy(), [g.double().numpy() for g in grads], **kw)


def test_lr_none_is_the_relative_step():
    torch.manual_seed(0)
    theta = torch.randn(5, 4, dtype=torch.float64)
    grads = [torch.randn(5, 4, dtype=torch.float64) for _ in range(10)]
    p = nn.Parameter(theta.clone())
    opt = danlu.AdaFactor([p], lr=None, weight_decay=0.1)
    assert opt.param_groups[0]["lr"] == 1.0
    assert opt.param_groups[0]["relative_step"] is True
    ref = reference_history(theta, grads, lr=1.0, relative_step=True, wd=0.1)
    for g, want in zip(grads, ref, strict=True):
        p.grad = g
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("scheduler", ["linear", "step"])
def test_lr_none_works_with_torch_schedulers(scheduler):
    # transformers#11612: lr=None broke schedulers. Here the group lr is a multiplier on the
    # relative step, and a scheduler scales it: LinearLR warms ρ_t up from 0.1·ρ_t.
    torch.manual_seed(1)
    theta = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(8)]
    p = nn.Parameter(theta.clone())
    opt = danlu.AdaFactor([p], lr=None)
    if scheduler == "linear":
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
        multipliers = [0.1 + 0.9 * min(t, 4) / 4 for t in range(8)]
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        multipliers = [0.5 ** (t // 3) for t in range(8)]
    ref = reference_history(theta, grads, lr=1.0, relative_step=True, lr_multipliers=multipliers)
    for g, want in zip(grads, ref, strict=True):
        p.grad = g
        opt.step()
        sched.step()
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)
    assert sched.get_last_lr()[0] == pytest.approx(multipliers[-1] if scheduler == "step" else 1.0)


def test_add_param_group_with_lr_none():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = danlu.AdaFactor([a], lr=1e-3)
    opt.add_param_group({"params": [b], "lr": None})
    assert opt.param_groups[1]["lr"] == 1.0 and opt.param_groups[1]["relative_step"]
    assert opt.param_groups[0]["relative_step"] is False


@pytest.mark.parametrize(
    "lr,scale,factor", [(0.1, True, 0.1), (None, True, 1e-2), (None, False, 5e-4)]
)
def test_weight_decay_is_multiplied_by_the_step_size_not_the_scale(lr, scale, factor):
    # With a zero gradient u = 0, so θ1 = θ0·(1 − α1·λ): α1 = lr, or min(1e-2, 1)·(0.05 without
    # scaling) with lr=None; the parameter scale max(ε2, RMS θ) (here 2.5) does not enter.
    p = nn.Parameter(torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64))
    opt = danlu.AdaFactor([p], lr=lr, weight_decay=0.5, multiply_by_parameter_scale=scale)
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    want = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64) * (1 - factor * 0.5)
    torch.testing.assert_close(p.detach(), want, rtol=1e-15, atol=0)


def test_changing_the_factoring_rule_after_the_first_step_raises_and_changes_nothing():
    p = nn.Parameter(torch.randn(6, 8))
    opt = danlu.AdaFactor([p], min_dim_size_to_factor=4)
    p.grad = torch.randn(6, 8)
    opt.step()
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["min_dim_size_to_factor"] = 128
    p.grad = torch.randn(6, 8)
    with pytest.raises(ValueError, match="factor"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    for key, value in before[1]["state"][0].items():
        assert torch.equal(opt.state[p][key], value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_keep_float32_statistics(dtype):
    # docs/reference/algorithms.md#adafactor-edge-cases: ε1 = 1e-30 is 0 in fp16, so fp16 statistics
    # would give v̂ = 0 and 0/0 = NaN for a zero-gradient column; float32 statistics keep v̂ = ε1
    # and u = 0 there.
    p = nn.Parameter(torch.randn(4, 130).to(dtype))
    opt = danlu.AdaFactor([p], min_dim_size_to_factor=4, beta1=0.9)
    assert torch.tensor(1e-30, dtype=torch.float16) == 0
    for _ in range(3):
        g = torch.randn(4, 130).to(dtype)
        g[:, 0] = 0
        p.grad = g
        opt.step()
    assert opt.state[p]["exp_avg_sq_row"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq_col"].dtype == torch.float32
    assert opt.state[p]["exp_avg"].dtype == dtype
    assert p.dtype == dtype
    assert torch.isfinite(p.float()).all()
    assert (opt.state[p]["exp_avg_sq_col"][..., 0] > 0).all()


def test_foreach_step_does_not_read_tensors_back_to_the_host(monkeypatch):
    # The clipping and parameter-scale factors stay on the device as 0-d tensors: no .item().
    params = [nn.Parameter(torch.randn(s)) for s in [(6, 130), (7,), (3, 4, 5)]]
    opt = danlu.AdaFactor(params, lr=1e-2, beta1=0.9, min_dim_size_to_factor=4, foreach=True)

    def forbidden(self):
        raise AssertionError(".item() called inside step()")

    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", forbidden)
            opt.step()


def test_param_groups_tags_are_accepted():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = danlu.AdaFactor(danlu.param_groups(model, weight_decay=0.01), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))

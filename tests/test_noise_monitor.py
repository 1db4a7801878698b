"""danlu.scaling.NoiseScaleMonitor on one process and under torch.distributed (2-process gloo),
against the NumPy estimate from explicitly computed micro-batch gradients (tests/reference.py)."""

import math
import time

import distributed_noise_worker
import numpy as np
import pytest
import reference
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from danlu.scaling import NoiseScaleMonitor

DIM, MICRO = 6, 8


def _problem(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, DIM, generator=gen)
    y = x @ torch.linspace(-1, 1, DIM) + 0.7 * torch.randn(batch, generator=gen)
    weight = 0.1 * torch.randn(1, DIM, generator=gen)
    bias = torch.tensor([0.3])
    return x, y, weight, bias


_model = distributed_noise_worker.linear_model
_loss = distributed_noise_worker.mse


def _micro_grads(x, y, weight, bias, micro):
    """Gradients of mean((x·w + c - y)²) per micro-batch, by hand in NumPy: 2/b·[xᵀr, Σr]."""
    x, y = x.double().numpy(), y.double().numpy()
    w, c = weight.double().numpy().ravel(), float(bias)
    out = []
    for start in range(0, len(y), micro):
        xs, ys = x[start : start + micro], y[start : start + micro]
        r = xs @ w + c - ys
        out.append(np.concatenate([2 / micro * xs.T @ r, [2 / micro * r.sum()]]))
    return np.array(out)


def test_micro_batch_split_matches_reference():
    x, y, weight, bias = _problem(4 * MICRO)
    model = _model(weight, bias)
    monitor = NoiseScaleMonitor(model, micro_batch_size=MICRO)
    loss = monitor.backward_micro_batches(lambda a, b: _loss(model, a, b), x, y)
    est = monitor.update()
    grads = _micro_grads(x, y, weight, bias, MICRO)
    trace, g2 = reference.noise_scale_from_micro_grads(grads, MICRO)
    assert est.trace_sigma == pytest.approx(trace, rel=1e-4)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-4, abs=1e-5)
    # .grad is the full-batch gradient and the returned loss the full-batch loss
    full = grads.mean(axis=0)
    got = np.concatenate([model.weight.grad.double().numpy().ravel(), model.bias.grad.numpy()])
    assert got == pytest.approx(full, rel=1e-5, abs=1e-6)
    assert loss.item() == pytest.approx(_loss(model, x, y).item(), rel=1e-5)
    assert monitor.b_simple == pytest.approx(trace / g2, rel=1e-4)


@pytest.mark.parametrize("accumulation", ["mean", "sum"])
@pytest.mark.parametrize("loss_scale", [1.0, 1024.0])
def test_manual_accumulation(accumulation, loss_scale):
    """A hand-written accumulation loop; ``accumulation`` sets the units of the two parts and a
    GradScaler-style factor S multiplies both by S², leaving B_simple unchanged."""
    x, y, weight, bias = _problem(4 * MICRO, seed=1)
    model = _model(weight, bias)
    monitor = NoiseScaleMonitor(model.parameters(), MICRO, accumulation=accumulation)
    for xs, ys in zip(x.split(MICRO), y.split(MICRO), strict=True):
        loss = loss_scale * _loss(model, xs, ys)
        (loss / 4 if accumulation == "mean" else loss).backward()
    est = monitor.update()
    trace, g2 = reference.noise_scale_from_micro_grads(
        _micro_grads(x, y, weight, bias, MICRO), MICRO
    )
    assert est.trace_sigma == pytest.approx(loss_scale**2 * trace, rel=1e-4)
    assert est.grad_sq_norm == pytest.approx(loss_scale**2 * g2, rel=1e-4)
    assert est.b_simple == pytest.approx(trace / g2, rel=1e-4)


def test_ema_interval_and_resume():
    x, y, weight, bias = _problem(64 * MICRO, seed=2)
    model = _model(weight, bias)
    monitor = NoiseScaleMonitor(model, micro_batch_size=MICRO, ema=0.5, interval=2)
    raws = []
    for step, (xs, ys) in enumerate(zip(x.split(4 * MICRO), y.split(4 * MICRO), strict=True)):
        monitor.backward_micro_batches(lambda a, b: _loss(model, a, b), xs, ys)
        est = monitor.update()
        model.zero_grad()
        if step % 2:
            assert est is None
        else:
            assert est is not None
            raws.append(est)
        if step == 5:
            break
    # bias-corrected EMAs of the two parts, by hand
    weights = [0.5**2 * 0.5, 0.5 * 0.5, 0.5]
    trace = sum(w * r.trace_sigma for w, r in zip(weights, raws, strict=True)) / sum(weights)
    g2 = sum(w * r.grad_sq_norm for w, r in zip(weights, raws, strict=True)) / sum(weights)
    assert monitor.trace_sigma == pytest.approx(trace)
    assert monitor.grad_sq_norm == pytest.approx(g2)
    assert monitor.b_simple == pytest.approx(trace / g2)
    other = NoiseScaleMonitor(_model(weight, bias), micro_batch_size=MICRO, ema=0.5, interval=2)
    other.load_state_dict(monitor.state_dict())
    assert other.b_simple == monitor.b_simple and other.steps == monitor.steps


def test_single_backward_gives_no_estimate_and_remove_stops_hooks():
    x, y, weight, bias = _problem(MICRO)
    model = _model(weight, bias)
    with NoiseScaleMonitor(model, micro_batch_size=MICRO) as monitor:
        _loss(model, x, y).backward()
        assert monitor.update() is None
        assert math.isnan(monitor.b_simple)
    model.zero_grad()
    _loss(model, x, y).backward()
    _loss(model, x, y).backward()
    assert monitor.update() is None  # hooks removed: nothing recorded


@pytest.mark.parametrize(
    "kwargs,name",
    [({"micro_batch_size": 0}, "micro_batch_size"), ({"micro_batch_size": 8, "ema": 1.0}, "ema"),
     ({"micro_batch_size": 8, "interval": 0}, "interval"),
     ({"micro_batch_size": 8, "accumulation": "avg"}, "accumulation")],
)  # fmt: skip
def test_monitor_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NoiseScaleMonitor(nn.Linear(2, 1), **kwargs)
    with pytest.raises(ValueError, match="params"):
        NoiseScaleMonitor(nn.Linear(2, 1).requires_grad_(False), micro_batch_size=8)
    monitor = NoiseScaleMonitor(nn.Linear(2, 1), micro_batch_size=8)
    with pytest.raises(ValueError, match="multiple"):
        monitor.backward_micro_batches(lambda a: a.sum(), torch.ones(12, 2))


# -- torch.distributed ---------------------------------------------------------------------------


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_processes_gloo(tmp_path):
    """Per-rank squared norms are all-gathered, the averaged gradient comes from DDP: with 2
    ranks × 2 micro-batches the estimate equals the NumPy one over all 4 micro-batches."""
    world, local_passes = 2, 2
    x, y, weight, bias = _problem(world * local_passes * MICRO, seed=3)
    args = (world, str(tmp_path / "store"), str(tmp_path), MICRO, local_passes, x, y, weight, bias)
    context = mp.start_processes(
        distributed_noise_worker.run, args=args, nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 300  # a hang fails the test instead of the whole run
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    trace, g2 = reference.noise_scale_from_micro_grads(
        _micro_grads(x, y, weight, bias, MICRO), MICRO
    )
    for rank in range(world):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["trace"] == pytest.approx(trace, rel=1e-4)
        assert result["g2"] == pytest.approx(g2, rel=1e-4, abs=1e-5)


@pytest.mark.gpu
def test_monitor_on_cuda_matches_reference():
    x, y, weight, bias = _problem(4 * MICRO)
    model = _model(weight, bias).cuda()
    monitor = NoiseScaleMonitor(model, micro_batch_size=MICRO)
    monitor.backward_micro_batches(lambda a, b: _loss(model, a, b), x.cuda(), y.cuda())
    est = monitor.update()
    trace, g2 = reference.noise_scale_from_micro_grads(
        _micro_grads(x, y, weight, bias, MICRO), MICRO
    )
    assert est.trace_sigma == pytest.approx(trace, rel=1e-3)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-3, abs=1e-4)

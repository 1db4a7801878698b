"""danlu.schedules against docs/reference/algorithms.md#tiger-tests item 6."""

import pytest
import torch

import danlu
from danlu.schedules import PiecewiseLinearLR, piecewise_linear


@pytest.mark.parametrize(
    "t,want",
    [(0, 0.0), (500, 0.5), (999, 0.999), (1000, 1.0), (1500, 0.55), (2000, 0.1), (5000, 0.1)],
)
def test_from_zero(t, want):
    assert piecewise_linear(t, {1000: 1, 2000: 0.1}) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("t,want", [(0, 1.0), (500, 1.0), (1000, 1.0), (1500, 0.55)])
def test_not_from_zero(t, want):
    assert piecewise_linear(t, {1000: 1, 2000: 0.1}, from_zero=False) == pytest.approx(want)


README_SCHEDULE = {40000: 1, 160000: 0.5, 640000: 0.1, 1280000: 0.01}


@pytest.mark.parametrize(
    "t,want",
    [
        (20000, 0.5),
        (100000, 0.75),
        (400000, 0.3),
        (960000, 0.055),
        (1280000, 0.01),
        (5000000, 0.01),
    ],
)
def test_readme_schedule(t, want):
    assert piecewise_linear(t, README_SCHEDULE) == pytest.approx(want, abs=1e-12)


def test_default_is_constant():
    assert piecewise_linear(0, {0: 1}) == 1.0
    assert piecewise_linear(10**9, {0: 1}) == 1.0


def test_unsorted_keys_are_sorted():
    assert piecewise_linear(1500, {2000: 0.1, 1000: 1}) == pytest.approx(0.55)


@pytest.mark.parametrize("bad", [{}, None, {-5: 1.0}])
def test_bad_schedule(bad):
    with pytest.raises(ValueError, match="schedule"):
        piecewise_linear(0, bad)


def test_scheduler_drives_tiger_lr():
    p = torch.nn.Parameter(torch.ones(3))
    opt = danlu.Tiger([p], lr=2e-3)
    sched = PiecewiseLinearLR(opt, {10: 1, 20: 0.5})
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen[0] == 0.0
    assert seen[5] == pytest.approx(1e-3)
    assert seen[10] == pytest.approx(2e-3)
    assert seen[15] == pytest.approx(1.5e-3)
    assert seen[24] == pytest.approx(1e-3)


def test_scheduler_state_dict_round_trip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = danlu.Lion([p], lr=1.0)
    sched = PiecewiseLinearLR(opt, {10: 1})
    for _ in range(4):
        opt.step()
        sched.step()
    other = PiecewiseLinearLR(danlu.Lion([torch.nn.Parameter(torch.ones(3))], lr=1.0), {10: 1})
    other.load_state_dict(sched.state_dict())
    assert other.last_epoch == 4

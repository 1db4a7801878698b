"""Every danlu scheduler and wrapper resumes exactly from a torch.distributed.checkpoint (DCP)
checkpoint and from a ``torch.load(weights_only=True)`` one, and the resumed objects can be
saved again (DCP turns dict keys into strings; a state dict that mixes ``20`` and ``'20'``
cannot be saved a second time, so checkpoints would stop)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import danlu
from danlu import schedules
from danlu.distributed import get_optimizer_state_dict, set_optimizer_state_dict
from danlu.wrappers import OptimizerWrapper

# DCP without a process group saves and loads in one process, and says so in a warning.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB, DIM = 10, 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(tokens)).square().mean()


@dataclass
class Case:
    name: str
    build: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]]
    save_after: int = 6  # DCP of GradientAccumulation needs a window boundary
    nan_on: tuple[int, ...] = ()  # steps whose gradient gets a NaN (for NonFiniteGuard)


def lion(model: nn.Module) -> torch.optim.Optimizer:
    return danlu.Lion(model.parameters(), lr=1e-2, weight_decay=0.1)


def tiger(model: nn.Module) -> torch.optim.Optimizer:
    return danlu.Tiger(danlu.param_groups(model, weight_decay=0.01), lr=1e-2)


def with_sched(make_opt, make_sched):
    def build(model):
        opt = make_opt(model)
        return opt, make_sched(opt)

    return build


def no_sched(make_opt):
    return lambda model: (make_opt(model), None)


SCHEDULERS = [
    Case(
        "PiecewiseLinearLR-int-keys",
        with_sched(lion, lambda o: schedules.PiecewiseLinearLR(o, {3: 1.0, 10: 0.1})),
    ),
    Case(
        "PiecewiseLinearLR-float-keys",
        with_sched(tiger, lambda o: schedules.PiecewiseLinearLR(o, {0.5: 0.2, 2.5: 1.0, 7.5: 0.3})),
    ),
    Case(
        "PiecewiseLinearLR-not-from-zero",
        with_sched(
            lion, lambda o: schedules.PiecewiseLinearLR(o, {2: 0.5, 9: 1.0}, from_zero=False)
        ),
    ),
    Case(
        "InverseSquareDecayLR",
        with_sched(lion, lambda o: schedules.InverseSquareDecayLR(o, 4, warmup_steps=2)),
    ),
    Case(
        "InverseTimeDecayLR",
        with_sched(tiger, lambda o: schedules.InverseTimeDecayLR(o, alpha0=1e-3, rate=50.0)),
    ),
]

WRAPPERS = [
    Case(
        "GradientAccumulation",
        no_sched(lambda m: danlu.GradientAccumulation(lion(m), steps=2)),
    ),
    Case("UpdateEvery", no_sched(lambda m: danlu.UpdateEvery(lion(m), steps=3)), save_after=7),
    Case(
        "NonFiniteGuard",
        no_sched(lambda m: danlu.NonFiniteGuard(tiger(m), mode="skip")),
        nan_on=(2, 7),
    ),
    Case("Lazy", no_sched(lambda m: danlu.Lazy(tiger(m), lazy_moments=True))),
    Case(
        "MultiOptimizer",
        no_sched(lambda m: danlu.MultiOptimizer.adam_for_embeddings(m, danlu.Tiger, lr=1e-2)),
    ),
    Case("StepInBackward", no_sched(lambda m: danlu.step_in_backward(tiger(m)))),
    Case(
        "GradientAccumulation(NonFiniteGuard)+PiecewiseLinearLR",
        with_sched(
            lambda m: danlu.GradientAccumulation(danlu.NonFiniteGuard(lion(m)), steps=2),
            lambda o: schedules.PiecewiseLinearLR(o, {4: 1.0, 12: 0.2}),
        ),
        nan_on=(3,),
    ),
]

CASES = SCHEDULERS + WRAPPERS


def test_every_scheduler_and_wrapper_is_covered():
    """A new scheduler or wrapper must be added to the cases above."""
    scheds = {
        name
        for name in schedules.__all__
        if isinstance(getattr(schedules, name), type)
        and issubclass(getattr(schedules, name), torch.optim.lr_scheduler.LRScheduler)
    }
    wrappers = {
        name
        for name in danlu.wrappers.__all__
        if isinstance(getattr(danlu.wrappers, name), type)
        and issubclass(getattr(danlu.wrappers, name), torch.optim.Optimizer)
        and getattr(danlu.wrappers, name) is not OptimizerWrapper
    }
    covered = " ".join(case.name for case in CASES)
    assert scheds and wrappers
    missing = [name for name in sorted(scheds | wrappers) if name not in covered]
    assert not missing, missing


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB // 2, (2, 3), generator=gen)  # half the rows: Lazy matters


def build(case: Case):
    torch.manual_seed(0)
    model = Tiny()
    opt, sched = case.build(model)
    return model, opt, sched


def train(case: Case, model, opt, sched, start: int, stop: int) -> list[float]:
    lrs = []
    for step in range(start, stop):
        model(batch(step)).backward()
        if step in case.nan_on:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad[0] = float("nan")
                    break
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(case, resumed, reference):
    (model_a, lrs_a), (model_b, lrs_b) = resumed, reference
    assert lrs_a == lrs_b, case.name
    for (name, a), b in zip(snapshot(model_a).items(), snapshot(model_b).values(), strict=True):
        assert torch.equal(a, b), f"{case.name}: {name} differs from the uninterrupted run"


TOTAL = 12


def reference_run(case):
    model, opt, sched = build(case)
    train(case, model, opt, sched, 0, case.save_after)
    return model, train(case, model, opt, sched, case.save_after, TOTAL)


def dcp_state(model, opt, sched) -> dict[str, Any]:
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    if sched is not None:
        state["sched"] = sched.state_dict()
    return state


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dcp_round_trip_equals_uninterrupted_run(case, tmp_path):
    reference = reference_run(case)

    model, opt, sched = build(case)
    train(case, model, opt, sched, 0, case.save_after)
    dcp.save(dcp_state(model, opt, sched), checkpoint_id=tmp_path / "first")

    def resume(checkpoint):
        model, opt, sched = build(case)
        state = dcp_state(model, opt, sched)
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        return model, opt, sched

    model, opt, sched = resume(tmp_path / "first")
    # the resumed objects save again (this failed for PiecewiseLinearLR: keys 20 and '20')
    dcp.save(dcp_state(model, opt, sched), checkpoint_id=tmp_path / "second")
    lrs = train(case, model, opt, sched, case.save_after, TOTAL)
    assert_same_run(case, (model, lrs), reference)

    model, opt, sched = resume(tmp_path / "second")
    lrs = train(case, model, opt, sched, case.save_after, TOTAL)
    assert_same_run(case, (model, lrs), reference)


def weights_only_checkpoint(model, opt, sched) -> dict[str, Any]:
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    if sched is not None:
        state["sched"] = sched.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_weights_only_round_trip_equals_uninterrupted_run(case):
    # mid-window for the accumulating wrappers: their running sums travel too
    case = Case(case.name, case.build, save_after=case.save_after - 1, nan_on=case.nan_on)
    reference = reference_run(case)

    model, opt, sched = build(case)
    train(case, model, opt, sched, 0, case.save_after)
    checkpoint = weights_only_checkpoint(model, opt, sched)
    for _ in range(2):  # resume, and resume from the resumed objects' own checkpoint
        model, opt, sched = build(case)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optim"])
        if sched is not None:
            sched.load_state_dict(checkpoint["sched"])
        checkpoint = weights_only_checkpoint(model, opt, sched)
    lrs = train(case, model, opt, sched, case.save_after, TOTAL)
    assert_same_run(case, (model, lrs), reference)


# -- PiecewiseLinearLR's saved forms -------------------------------------------------------------


def piecewise(last_epoch: int = 0):
    opt = danlu.Lion([nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = schedules.PiecewiseLinearLR(opt, {20: 1.0, 100: 0.1})
    for _ in range(last_epoch):
        opt.step()
        sched.step()
    return sched


def old_state(keys: Callable[[int], list[Any]]) -> dict[str, Any]:
    """A state dict as the previous version wrote it (dict schedule, ``_knots``), with the
    schedule's keys replaced by ``keys(step)``."""
    state = piecewise(30).state_dict()
    state["schedule"] = {k: v for step, v in ((20, 1.0), (100, 0.1)) for k in keys(step)}
    state["_knots"] = [(0.0, 0.0), (20.0, 1.0), (100.0, 0.1)]
    return state


@pytest.mark.parametrize(
    "keys",
    [lambda s: [s], lambda s: [str(s)], lambda s: [s, str(s)], lambda s: [float(s)]],
    ids=["int", "str", "int-and-str", "float"],
)
def test_piecewise_loads_the_older_forms_and_never_keeps_two_keys(keys, tmp_path):
    sched = piecewise()
    sched.load_state_dict(old_state(keys))
    assert sched.last_epoch == 30
    assert sched.get_last_lr() == pytest.approx([1.0 - 0.9 * 10 / 80])
    assert sched.state_dict()["schedule"] == [[20, 1.0], [100, 0.1]]
    assert sorted(sched.schedule) == [20, 100]
    dcp.save({"sched": sched.state_dict()}, checkpoint_id=tmp_path / "ok")


def test_piecewise_state_dict_has_no_number_keys():
    def number_keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                assert isinstance(key, str), f"key {key!r}"
                number_keys(value)
        elif isinstance(node, list | tuple):
            for item in node:
                number_keys(item)

    number_keys(piecewise(3).state_dict())


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({20: 1.0, "20": 0.5, 100: 0.1}, "two multipliers"),
        ({"twenty": 1.0}, "must be numbers"),
        ([[20, 1.0, 3]], "pairs"),
        ([[-1, 1.0]], ">= 0"),
        (42, "list of pairs"),
    ],
)
def test_piecewise_refuses_a_bad_saved_schedule_and_changes_nothing(schedule, message):
    sched = piecewise(5)
    before = sched.state_dict()
    state = piecewise(30).state_dict()
    state["schedule"] = schedule
    with pytest.raises(ValueError, match=message):
        sched.load_state_dict(state)
    assert sched.state_dict() == before


def test_dcp_round_trip_into_a_live_scheduler_keeps_one_key_per_step(tmp_path):
    """The issue's repro: DCP loads into the scheduler's own state dict, then saves again."""
    sched = piecewise(25)
    dcp.save({"sched": sched.state_dict()}, checkpoint_id=tmp_path / "a")
    state = {"sched": sched.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path / "a")
    sched.load_state_dict(state["sched"])
    assert list(sched.schedule) == [20, 100]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"sched": sched.state_dict()}, checkpoint_id=tmp_path / "b")

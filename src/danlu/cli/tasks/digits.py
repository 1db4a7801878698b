"""``digits``: scikit-learn's bundled 8×8 handwritten digits, a small MLP, test accuracy."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from danlu.cli.common import Baseline, Context, RunResult, RunSpec, make_optimizer
from danlu.cli.sweep import Report, SweepTask
from danlu.cli.tasks._loop import train

NAME = "digits"
DESCRIPTION = "8×8 digits (scikit-learn), MLP 64-128-64-10, batch 64; test accuracy"
BATCH = 64
STEPS, QUICK_STEPS = 1500, 300
#: seconds per training step on one core (measured; for the ETA)
STEP_SECONDS = 0.0018


@functools.lru_cache(maxsize=4)
def _load_cpu(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train_idx, test_idx = order[:cut], order[cut:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def load(device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Features in [0, 1], an 80/20 split fixed by the seed."""
    return tuple(t.to(device) for t in _load_cpu(seed))


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.LayerNorm(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def batches(
    x: torch.Tensor, y: torch.Tensor, batch: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches, epoch after epoch, the same order for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            yield x[idx], y[idx]


def baseline(num_train: int) -> Baseline:
    return Baseline(lr=3e-3, weight_decay=0.01, batches_per_epoch=num_train // BATCH, vision=True)


class DigitsTask(SweepTask):
    name = NAME
    description = DESCRIPTION
    metric = "test accuracy"
    higher_is_better = True
    # the centres of the lr grids: each optimizer's registration (CompareSettings.centres),
    # measured with benchmarks/compare_centres.py (docs/compare.md)
    timing_steps = 150
    tolerance = 0.015  # 1.5 points of accuracy: about 5 of the 360 test images

    def baseline(self, ctx: Context) -> Baseline:
        return baseline(1437)  # 80 % of the 1797 images

    def steps(self, ctx: Context) -> int:
        return ctx.steps or (QUICK_STEPS if ctx.quick else STEPS)

    def run_cost(self, ctx: Context, steps: int, timing: bool = False) -> float:
        return 0.3 + steps * STEP_SECONDS

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {"batch": BATCH, "train": 1437, "test": 360}

    def train(self, spec: RunSpec, report: Report) -> RunResult:
        device = torch.device(spec.device)
        x_train, y_train, x_test, y_test = load(device, spec.seed)

        def accuracy() -> float:
            return (model(x_test).argmax(-1) == y_test).float().mean().item()

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(m(x), y)

        torch.manual_seed(spec.seed)
        model = make_model().to(device)
        return train(
            spec,
            model=model,
            opt=make_optimizer(spec.optimizer, model, spec.hparams),
            batches=batches(x_train, y_train, BATCH, spec.seed),
            loss_fn=loss_fn,
            evaluate=accuracy,
            eval_every=max(spec.steps // 10, 1),
            report=report,
            device=device,
        )


TASK = DigitsTask()

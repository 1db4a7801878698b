"""``digits``: scikit-learn's bundled 8×8 handwritten digits, a small MLP, test accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from danlu.cli.common import Baseline, Context, TaskResult
from danlu.cli.tasks._loop import compare_optimizers

NAME = "digits"
DESCRIPTION = "8×8 digits (scikit-learn), MLP 64-128-64-10, batch 64; test accuracy"
BATCH = 64


def load(device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Features in [0, 1], an 80/20 split fixed by the seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train_idx, test_idx = order[:cut], order[cut:]
    return (
        x[train_idx].to(device),
        y[train_idx].to(device),
        x[test_idx].to(device),
        y[test_idx].to(device),
    )


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
    return Baseline(
        lr=3e-3, weight_decay=0.01, batches_per_epoch=num_train // BATCH, tiger_beta=0.945
    )


def run(ctx: Context) -> TaskResult:
    x_train, y_train, x_test, y_test = load(ctx.device, ctx.seed)
    steps = ctx.steps or (300 if ctx.quick else 1500)
    base = baseline(len(x_train))

    def accuracy(model: nn.Module) -> float:
        return (model(x_test).argmax(-1) == y_test).float().mean().item()

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    runs = compare_optimizers(
        ctx,
        task=NAME,
        base=base,
        make_model=lambda: make_model().to(ctx.device),
        batches=lambda: batches(x_train, y_train, BATCH, ctx.seed),
        loss_fn=loss_fn,
        evaluate=accuracy,
        steps=steps,
    )
    return TaskResult(
        name=NAME,
        description=DESCRIPTION,
        metric="test accuracy",
        higher_is_better=True,
        runs=runs,
        settings={
            "steps": steps,
            "batch": BATCH,
            "train": len(x_train),
            "test": len(x_test),
            "adamw_baseline": {"lr": base.lr, "weight_decay": base.weight_decay},
        },
    )

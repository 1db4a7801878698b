"""The training loop the per-optimizer tasks share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from danlu.cli.common import (
    Baseline,
    Context,
    PeakMemory,
    RunResult,
    make_optimizer,
    seed_everything,
    state_bytes_per_param,
    timer,
    transfer_hparams,
    warmup_steps,
)


def warm_up(
    make_model: Callable[[], nn.Module],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int = 3,
) -> None:
    """A few unrecorded steps on a throwaway model, so that one-time costs (thread pools, the
    autograd engine, allocator growth) do not land in the first optimizer's time and memory."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def train(
    ctx: Context,
    *,
    label: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    hparams: dict[str, Any],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    evaluate: Callable[[], float],
    eval_every: int,
    progress_title: str,
) -> RunResult:
    """Train for ``steps`` steps; record the loss every step and ``evaluate()`` every
    ``eval_every`` steps and at the end. Time per step excludes evaluation."""
    result = RunResult(label=label, hparams=hparams)
    bar = ctx.progress(progress_title, steps)
    elapsed = 0.0
    with PeakMemory(ctx.device) as memory:
        for step in range(1, steps + 1):
            x, y = next(batches)
            with timer() as t:
                model.train()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, x, y)
                loss.backward()
                opt.step()
                loss_value = loss.item()
            if step > warmup_steps(steps):
                elapsed += t[0]
            result.steps.append(step)
            result.losses.append(loss_value)
            if step % eval_every == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    result.eval_steps.append(step)
                    result.metrics.append(evaluate())
            bar.advance()
    bar.close()
    result.final_metric = result.metrics[-1]
    result.seconds_per_step = elapsed / (steps - warmup_steps(steps))
    result.state_bytes_per_param = state_bytes_per_param(opt, model)
    result.peak_memory_bytes = memory.peak
    return result


def compare_optimizers(
    ctx: Context,
    *,
    task: str,
    base: Baseline,
    make_model: Callable[[], nn.Module],
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    steps: int,
) -> list[RunResult]:
    """Warm up, then train a fresh model (same seed, same batches) with each of
    ``ctx.optimizers`` under the hyper-parameters transferred from ``base``."""
    warm_up(make_model, batches(), loss_fn)
    runs = []
    for name in ctx.optimizers:
        seed_everything(ctx.seed)
        model = make_model()
        hparams = transfer_hparams(name, base, ctx.lr.get(name))
        runs.append(
            train(
                ctx,
                label=name,
                model=model,
                opt=make_optimizer(name, model, hparams),
                hparams=hparams,
                batches=batches(),
                loss_fn=loss_fn,
                steps=steps,
                evaluate=partial(evaluate, model),
                eval_every=max(steps // 10, 1),
                progress_title=f"{task} · {name}",
            )
        )
    return runs

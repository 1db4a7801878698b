"""The training loop the optimizer-sweep tasks share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from danlu.cli.common import (
    PeakMemory,
    RunResult,
    RunSpec,
    state_bytes_per_param,
    warmup_steps,
)
from danlu.cli.sweep import Report


def train(
    spec: RunSpec,
    *,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate: Callable[[], float],
    eval_every: int,
    report: Report,
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> RunResult:
    """Train for ``spec.steps`` steps; record the loss every step and ``evaluate()`` every
    ``eval_every`` steps and at the end. A timing run (``spec.purpose == "timing"``) skips the
    evaluation and measures the time per step (wall and CPU, leaving out the first few steps)
    and the peak memory; a sweep run measures neither (it shares the machine with others)."""
    timing = spec.purpose == "timing"
    result = RunResult(
        label=spec.label,
        hparams=spec.hparams,
        optimizer=spec.optimizer,
        seed=spec.seed,
        factor=spec.factor,
        rule=spec.rule,
        extra=dict(extra or {}),
    )
    steps = spec.steps
    skip = warmup_steps(steps)
    wall = cpu = 0.0
    memory = PeakMemory(device) if timing else contextlib.nullcontext()
    with memory:
        for step in range(1, steps + 1):
            x, y = next(batches)
            t0, c0 = time.perf_counter(), time.thread_time()
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            loss_value = loss.item()
            if step > skip:
                wall += time.perf_counter() - t0
                cpu += time.thread_time() - c0
            result.steps.append(step)
            result.losses.append(loss_value)
            if not timing and (step % eval_every == 0 or step == steps):
                model.eval()
                with torch.no_grad():
                    result.eval_steps.append(step)
                    result.metrics.append(evaluate())
            report(1)
    if result.metrics:
        result.final_metric = result.metrics[-1]
    if timing:
        result.seconds_per_step = wall / max(steps - skip, 1)
        result.cpu_seconds_per_step = cpu / max(steps - skip, 1)
        if isinstance(memory, PeakMemory):
            result.peak_memory_bytes = memory.peak
    result.state_bytes_per_param = state_bytes_per_param(opt, model)
    return result


def factored_state(opt: torch.optim.Optimizer, model: nn.Module) -> list[dict[str, Any]]:
    """For every parameter with two or more dimensions: its shape and the number of entries of
    its optimizer state (the step counter left out), to check AdaFactor's n + m claim."""
    rows = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or p not in opt.state:
            continue
        entries = sum(
            v.numel() for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0
        )
        rows.append({"name": name, "shape": list(p.shape), "state_entries": entries})
    return rows

"""``accumulation``: SPEC §3 and §11. Tiger with ``grad_accum_steps=k`` on micro-batches equals
k = 1 on k-times larger batches (the accumulation hidden in its momentum is exact); AdamW's
"no-code" recipe (β → 1 − (1 − β)/k, update every k) and the blog's hidden-accumulation Adam
next to exact accumulation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import danlu
from danlu.cli.common import (
    Context,
    PeakMemory,
    RunResult,
    TaskResult,
    seed_everything,
    state_bytes_per_param,
    timer,
    warmup_steps,
)
from danlu.cli.tasks import digits

NAME = "accumulation"
DESCRIPTION = "digits MLP: k = 4 micro-batches of 16 vs batches of 64; training loss per update"
K, MICRO = 4, 16
TIGER: dict[str, Any] = {"lr": 2e-3, "weight_decay": 0.01, "beta": 0.945}
ADAMW: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.01, "betas": (0.9, 0.999)}
VARIANTS = {
    "tiger batch 64": "Tiger, k = 1, batches of 64",
    "tiger 4×16 hidden": "Tiger, grad_accum_steps = 4, micro-batches of 16",
    "adamw batch 64": "AdamW, batches of 64",
    "adamw 4×16 exact": "AdamW in GradientAccumulation(steps=4)",
    "adamw 4×16 hidden": "danlu.AdamW(grad_accum_steps=4): v from the mean of squares",
    "adamw 4×16 recipe": "AdamW with β → 1−(1−β)/4, updating every 4th micro-step (UpdateEvery)",
}


def make(variant: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = danlu.param_groups(model)
    if variant == "tiger batch 64":
        return danlu.Tiger(groups, **TIGER)
    if variant == "tiger 4×16 hidden":
        return danlu.Tiger(groups, grad_accum_steps=K, **TIGER)
    if variant == "adamw batch 64":
        return danlu.AdamW(groups, **ADAMW)
    if variant == "adamw 4×16 exact":
        return danlu.GradientAccumulation(danlu.AdamW(groups, **ADAMW), steps=K)
    if variant == "adamw 4×16 hidden":
        return danlu.AdamW(groups, grad_accum_steps=K, **ADAMW)
    betas = danlu.accumulation_betas(ADAMW["betas"], K)
    return danlu.UpdateEvery(danlu.AdamW(groups, **{**ADAMW, "betas": betas}), steps=K)


def run(ctx: Context) -> TaskResult:
    x_train, y_train, x_test, y_test = digits.load(ctx.device, ctx.seed)
    updates = ctx.steps or (60 if ctx.quick else 300)
    runs = []
    for variant, label in VARIANTS.items():
        seed_everything(ctx.seed)
        model = digits.make_model().to(ctx.device)
        opt = make(variant, model)
        micro = "4×16" in variant
        result = RunResult(
            label=variant,
            hparams=dict(TIGER if "tiger" in variant else ADAMW),
            extra={"description": label, "micro_batches": K if micro else 1},
        )
        batches = digits.batches(x_train, y_train, K * MICRO, ctx.seed)
        bar = ctx.progress(f"{NAME} · {variant}", updates)
        elapsed = 0.0
        with PeakMemory(ctx.device) as memory:
            for update in range(1, updates + 1):
                x, y = next(batches)
                with timer() as t:
                    if micro:
                        total = 0.0
                        for xs, ys in zip(x.split(MICRO), y.split(MICRO), strict=True):
                            opt.zero_grad(set_to_none=True)
                            loss = nn.functional.cross_entropy(model(xs), ys)
                            loss.backward()
                            opt.step()
                            total += loss.item()
                        loss_value = total / K
                    else:
                        opt.zero_grad(set_to_none=True)
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                        opt.step()
                        loss_value = loss.item()
                if update > warmup_steps(updates):
                    elapsed += t[0]
                result.steps.append(update)
                result.losses.append(loss_value)
                bar.advance()
        bar.close()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
        result.eval_steps.append(updates)
        result.metrics.append(accuracy)
        result.final_metric = accuracy
        result.seconds_per_step = elapsed / (updates - warmup_steps(updates))
        result.state_bytes_per_param = state_bytes_per_param(opt, model)
        result.peak_memory_bytes = memory.peak
        result.extra["params"] = [p.detach().cpu().clone() for p in model.parameters()]
        runs.append(result)
    by_label = {r.label: r for r in runs}
    a, b = by_label["tiger batch 64"], by_label["tiger 4×16 hidden"]
    param_gap = max(
        (p - q).abs().max().item()
        for p, q in zip(a.extra["params"], b.extra["params"], strict=True)
    )
    loss_gap = max(abs(p - q) for p, q in zip(a.losses, b.losses, strict=True))
    for r in runs:
        del r.extra["params"]
    return TaskResult(
        name=NAME,
        description=DESCRIPTION,
        metric="test accuracy",
        higher_is_better=True,
        runs=runs,
        settings={
            "updates": updates,
            "k": K,
            "micro_batch": MICRO,
            "tiger": TIGER,
            "adamw": {**ADAMW, "betas": list(ADAMW["betas"])},
            "tiger_max_param_difference": param_gap,
            "tiger_max_loss_difference": loss_gap,
        },
        notes=[
            f"Tiger k=4 vs k=1 on 4× batches: max |Δθ| = {param_gap:.2e}, "
            f"max |Δloss| = {loss_gap:.2e} (float rounding: the accumulation is exact)."
        ],
    )

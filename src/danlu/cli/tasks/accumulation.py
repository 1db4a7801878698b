"""``accumulation``: gradient accumulation hidden in momentum (blog: kexue.fm/archives/8634;
docs: the Tiger and AdamW pages, ``danlu.GradientAccumulation``). Tiger with
``grad_accum_steps=k`` on micro-batches equals k = 1 on k-times larger batches (the
accumulation hidden in its momentum is exact); AdamW's "no-code" recipe (β → 1 − (1 − β)/k,
update every k) and the blog's hidden-accumulation Adam next to exact accumulation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import danlu
from danlu.cli.common import (
    Context,
    PeakMemory,
    RunResult,
    RunSpec,
    TaskResult,
    seed_everything,
    state_bytes_per_param,
    warmup_steps,
)
from danlu.cli.sweep import Report, Task
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


UPDATES, QUICK_UPDATES, TIMING_UPDATES = 300, 60, 60
#: seconds per update on one core (measured; for the ETA)
UPDATE_SECONDS = 0.002
#: the run each variant is compared with: the same optimizer on the large batch
REFERENCE = {
    "tiger 4×16 hidden": "tiger batch 64",
    "adamw 4×16 exact": "adamw batch 64",
    "adamw 4×16 hidden": "adamw batch 64",
    "adamw 4×16 recipe": "adamw batch 64",
}
TAIL = 10  # the final metric: the mean training loss of the last TAIL updates


class AccumulationTask(Task):
    name = NAME
    description = DESCRIPTION
    metric = f"training loss (last {TAIL} updates)"
    higher_is_better = False

    def updates(self, ctx: Context) -> int:
        return ctx.steps or (QUICK_UPDATES if ctx.quick else UPDATES)

    def _spec(self, ctx: Context, variant: str, updates: int, purpose: str) -> RunSpec:
        return RunSpec(
            task=NAME,
            label=variant,
            optimizer="tiger" if "tiger" in variant else "adamw",
            hparams=dict(TIGER if "tiger" in variant else ADAMW),
            seed=ctx.seed,
            steps=updates,
            quick=ctx.quick,
            device=str(ctx.device),
            purpose=purpose,
            cost=0.2 + updates * UPDATE_SECONDS,
        )

    def plan(self, ctx: Context) -> list[RunSpec]:
        return [self._spec(ctx, v, self.updates(ctx), "sweep") for v in VARIANTS]

    def timing_specs(self, ctx: Context, result: TaskResult | None) -> list[RunSpec]:
        updates = min(TIMING_UPDATES, self.updates(ctx))
        return [self._spec(ctx, v, updates, "timing") for v in VARIANTS]

    def timing_cost(self, ctx: Context) -> float:
        return sum(s.cost for s in self.timing_specs(ctx, None))

    def execute(self, spec: RunSpec, report: Report) -> RunResult:
        device = torch.device(spec.device)
        variant, updates, timing = spec.label, spec.steps, spec.purpose == "timing"
        x_train, y_train, x_test, y_test = digits.load(device, spec.seed)
        seed_everything(spec.seed)
        model = digits.make_model().to(device)
        opt = make(variant, model)
        micro = "4×16" in variant
        result = RunResult(
            label=variant,
            hparams={k: list(v) if isinstance(v, tuple) else v for k, v in spec.hparams.items()},
            optimizer=spec.optimizer,
            seed=spec.seed,
            extra={"description": VARIANTS[variant], "micro_batches": K if micro else 1},
        )
        batches = digits.batches(x_train, y_train, K * MICRO, spec.seed)
        skip = warmup_steps(updates)
        wall = cpu = 0.0
        memory = PeakMemory(device) if timing else contextlib.nullcontext()
        with memory:
            for update in range(1, updates + 1):
                x, y = next(batches)
                t0, c0 = time.perf_counter(), time.thread_time()
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
                if update > skip:
                    wall += time.perf_counter() - t0
                    cpu += time.thread_time() - c0
                result.steps.append(update)
                result.losses.append(loss_value)
                report(1)
        result.state_bytes_per_param = state_bytes_per_param(opt, model)
        if timing:
            result.seconds_per_step = wall / max(updates - skip, 1)
            result.cpu_seconds_per_step = cpu / max(updates - skip, 1)
            if isinstance(memory, PeakMemory):
                result.peak_memory_bytes = memory.peak
            return result
        with torch.no_grad():
            accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
        result.eval_steps = list(result.steps)
        result.metrics = [
            sum(result.losses[max(0, i - TAIL + 1) : i + 1]) / min(i + 1, TAIL)
            for i in range(len(result.losses))
        ]
        result.final_metric = result.metrics[-1]
        result.extra["test_accuracy"] = accuracy
        # plain lists: results cross process boundaries (a tensor would go through shared memory)
        result.extra["params"] = [p.detach().cpu().flatten().tolist() for p in model.parameters()]
        return result

    def summarize(
        self, ctx: Context, specs: Sequence[RunSpec], results: Sequence[RunResult]
    ) -> TaskResult:
        by_label = {r.label: r for r in results}
        for run in results:
            reference = by_label.get(REFERENCE.get(run.label, ""))
            if reference is None:
                continue
            run.extra["max_param_difference"] = max(
                abs(a - b)
                for p, q in zip(run.extra["params"], reference.extra["params"], strict=True)
                for a, b in zip(p, q, strict=True)
            )
            run.extra["max_loss_difference"] = max(
                abs(p - q) for p, q in zip(run.losses, reference.losses, strict=True)
            )
        for run in results:
            del run.extra["params"]
        tiger = by_label.get("tiger 4×16 hidden")
        param_gap = tiger.extra["max_param_difference"] if tiger else float("nan")
        loss_gap = tiger.extra["max_loss_difference"] if tiger else float("nan")
        return TaskResult(
            name=NAME,
            description=DESCRIPTION,
            metric=self.metric,
            higher_is_better=False,
            runs=list(results),
            settings={
                "updates": self.updates(ctx),
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
            columns=[
                ("test accuracy", "test_accuracy", ".4f"),
                ("max |Δθ| vs batch 64", "max_param_difference", ".1e"),
                ("max |Δloss| vs batch 64", "max_loss_difference", ".1e"),
            ],
        )


TASK = AccumulationTask()

"""How the centres of ``danlu compare``'s lr grids were chosen: a wider sweep of the same tasks.

For each optimizer this runs the task at ``centre × factor`` for every factor (default ×¼ … ×4,
five points two apart), with the same seeds for all, in parallel worker processes (one thread
each), and prints the mean final metric per lr and the best. The default run's grid is then
×½, ×1, ×2 around the best lr found here. Extra variants (``--variant tiger:beta=0.9``) run the
same grid with other hyper-parameters.

    python benchmarks/compare_centres.py --task charlm --seeds 3 --jobs 2
    python benchmarks/compare_centres.py --task digits --factors 0.125,0.25,0.5,1,2,4,8

The results (every run's final metric and CPU seconds) go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import defaultdict
from typing import Any

import torch
from rich.console import Console

from danlu.cli.common import Context, RunSpec, optimizer_choices
from danlu.cli.runner import Progress, available_cores, execute
from danlu.cli.sweep import SweepTask, mean
from danlu.cli.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="charlm", choices=["charlm", "digits"])
    parser.add_argument("--optimizers", default=",".join(optimizer_choices()))
    parser.add_argument("--factors", default="0.25,0.5,1,2,4")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=available_cores())
    parser.add_argument("--centre", action="append", default=[], metavar="NAME=LR")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE")
    parser.add_argument("--only-variants", action="store_true")
    parser.add_argument("--out", default="compare_centres.json")
    args = parser.parse_args()

    task = TASKS[args.task]
    assert isinstance(task, SweepTask)
    centres = {k: float(v) for k, v in (c.split("=") for c in args.centre)}
    ctx = Context(
        optimizers=args.optimizers.split(","),
        steps=args.steps,
        seed=args.seed,
        device=torch.device("cpu"),
        quick=False,
        lr=centres,
        text=None,
        seeds=args.seeds,
    )
    factors = [float(f) for f in args.factors.split(",")]
    variants: list[tuple[str, str, dict[str, Any]]] = []
    if not args.only_variants:
        variants = [(n, n, {}) for n in ctx.optimizers]
    for item in args.variant:
        name, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        variants.append((f"{name} {key}={value}", name, {key: float(value)}))

    steps = task.steps(ctx)
    specs = []
    for label, name, override in variants:
        hparams = {**task.grid_hparams(name, ctx), **override}
        for factor in factors:
            for i in range(ctx.seeds):
                specs.append(
                    RunSpec(
                        task=task.name,
                        label=label,
                        optimizer=name,
                        hparams={**hparams, "lr": task.centre(name, ctx) * factor},
                        seed=ctx.seed + i,
                        steps=steps,
                        quick=False,
                        device="cpu",
                        factor=factor,
                        cost=task.run_cost(ctx, steps),
                    )
                )
    specs = [dataclasses.replace(s, index=i) for i, s in enumerate(specs)]
    console = Console()
    start = time.perf_counter()
    with Progress(console, specs) as progress:
        results = execute(specs, jobs=args.jobs, progress=progress)
    seconds = time.perf_counter() - start

    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    cpu = []
    for spec, result in zip(specs, results, strict=True):
        table[spec.label][spec.hparams["lr"]].append(result.final_metric)
        cpu.append(result.run_cpu_seconds)
    sign = -1.0 if task.higher_is_better else 1.0
    summary = {}
    for label, by_lr in table.items():
        means = {lr: mean(v) for lr, v in sorted(by_lr.items())}
        best = min(means, key=lambda lr: sign * means[lr] if math.isfinite(means[lr]) else 1e9)
        summary[label] = {"means": means, "best_lr": best, "seeds": dict(by_lr)}
        row = "  ".join(f"{lr:.3g}: {m:.4f}" for lr, m in means.items())
        console.print(f"{label:>18}  best {best:.3g}  |  {row}", highlight=False)
    console.print(
        f"{len(specs)} runs in {seconds:.0f} s; CPU seconds per run: mean {mean(cpu):.1f}, "
        f"max {max(cpu):.1f}",
        highlight=False,
    )
    with open(args.out, "w") as f:
        json.dump(
            {
                "task": task.name,
                "steps": steps,
                "factors": factors,
                "seeds": ctx.seeds,
                "summary": {k: {**v, "means": {str(a): b for a, b in v["means"].items()},
                                "seeds": {str(a): b for a, b in v["seeds"].items()}}
                            for k, v in summary.items()},
                "cpu_seconds": cpu,
                "seconds": seconds,
            },
            f,
            indent=1,
        )  # fmt: skip


if __name__ == "__main__":
    main()

"""The tasks' common shape, and the learning-rate sweep that makes ``danlu compare`` fair.

A task turns the command line into a list of runs (:class:`RunSpec`, each done in a worker
process or in this one), and the runs' results into a :class:`TaskResult`.

:class:`SweepTask` compares optimizers fairly: each optimizer gets a small lr grid (×½, ×1, ×2 of
a centre measured for the task, see ``docs/compare.md``), every run the task's full length with
the same seeds; the best grid point is the optimizer's result, and the whole grid is kept. The
blog's transfer rule from the AdamW baseline is run too (it is a grid point when it falls on the
grid) and shown as a marked point, so the user sees what the rule gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from danlu.cli.common import (
    Baseline,
    Context,
    GridPoint,
    OptimizerSweep,
    RunResult,
    RunSpec,
    TaskResult,
    compare_settings,
    transfer_hparams,
)

#: Multiples of the centre lr that every optimizer is run at; --quick runs two of them.
GRID_FACTORS = (0.5, 1.0, 2.0)
QUICK_GRID_FACTORS = (0.5, 1.0)

Report = Callable[[int], None]


class Task:
    """A ``danlu compare`` task: ``plan`` the runs, ``execute`` one (in any process), then
    ``summarize`` them; ``timing_specs`` are short runs done afterwards one at a time, alone on
    the machine, for the time per step and the peak memory."""

    name: str = ""
    description: str = ""
    metric: str = ""
    higher_is_better: bool = False

    def plan(self, ctx: Context) -> list[RunSpec]:
        raise NotImplementedError

    def execute(self, spec: RunSpec, report: Report) -> RunResult:
        raise NotImplementedError

    def summarize(
        self, ctx: Context, specs: Sequence[RunSpec], results: Sequence[RunResult]
    ) -> TaskResult:
        raise NotImplementedError

    def timing_specs(self, ctx: Context, result: TaskResult) -> list[RunSpec]:
        return []

    def timing_cost(self, ctx: Context) -> float:
        """Estimated seconds of the timing runs (before the sweep has chosen their settings)."""
        return 0.0

    def attach_timing(self, result: TaskResult, timings: Sequence[RunResult]) -> None:
        """Copy the unshared runs' time per step, peak memory and state size onto the result's
        runs with the same label."""
        by_label = {r.label: r for r in result.runs}
        for timing in timings:
            run = by_label.get(timing.label)
            if run is None:
                continue
            run.seconds_per_step = timing.seconds_per_step
            run.cpu_seconds_per_step = timing.cpu_seconds_per_step
            run.peak_memory_bytes = timing.peak_memory_bytes
            run.state_bytes_per_param = timing.state_bytes_per_param
            run.extra.update(timing.extra.get("timing", {}))


def _same_setting(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, float) and isinstance(other, float):
            if not math.isclose(value, other, rel_tol=1e-9):
                return False
        elif value != other:
            return False
    return True


def grid_points(
    centre: float, grid_hparams: dict[str, Any], rule: dict[str, Any], factors: Sequence[float]
) -> list[tuple[float | None, bool, dict[str, Any]]]:
    """The grid ``centre × factors`` (other hyper-parameters from ``grid_hparams``) as
    ``(factor, is_rule, hparams)`` in increasing lr; the rule's setting is marked where it is a
    grid point and added (factor None) where it is not."""
    points: list[tuple[float | None, bool, dict[str, Any]]] = []
    for factor in factors:
        hparams = {**grid_hparams, "lr": centre * factor}
        points.append((factor, _same_setting(hparams, rule), hparams))
    if not any(is_rule for _, is_rule, _ in points):
        points.append((None, True, dict(rule)))
    points.sort(key=lambda p: p[2]["lr"])
    return points


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    length = min(len(c) for c in curves)
    return [mean([c[i] for c in curves]) for i in range(length)]


def choose_best(points: Sequence[GridPoint], higher_is_better: bool) -> int:
    """Index of the best point: the best mean final metric; NaN (diverged) is worst; a tie goes
    to the smaller lr."""

    def key(i: int) -> tuple[bool, float]:
        value = points[i].final_metric
        if math.isnan(value):
            return (True, 0.0)
        return (False, -value if higher_is_better else value)

    return min(range(len(points)), key=key)


class SweepTask(Task):
    """An optimizer comparison with a per-optimizer lr grid. Subclasses give the baseline the
    rules start from, the run length and ``train``; each optimizer's centre and grid overrides
    for the task come from its registration (``CompareSettings.centres``, ``grid_overrides``,
    keyed by the task's name) unless the subclass sets its own tables."""

    #: the measured centre of each optimizer's grid (see docs/compare.md for how); None: the
    #: registry's
    centres: ClassVar[dict[str, float | None] | None] = None
    #: hyper-parameters of the grid that differ from the rule's (e.g. Tiger's β at this scale);
    #: None: the registry's
    grid_overrides: ClassVar[dict[str, dict[str, Any]] | None] = None
    timing_steps: int = 30
    #: how much worse than AdamW (in the metric's units) still counts as "reaches its quality"
    tolerance: float = math.nan

    def baseline(self, ctx: Context) -> Baseline:
        raise NotImplementedError

    def steps(self, ctx: Context) -> int:
        raise NotImplementedError

    def run_cost(self, ctx: Context, steps: int, timing: bool = False) -> float:
        """Estimated seconds of one run on one core (for the order of the runs and the ETA)."""
        return float(steps)

    def train(self, spec: RunSpec, report: Report) -> RunResult:
        raise NotImplementedError

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {}

    #: set to replace the grid (benchmarks/compare_centres.py runs a wider one)
    grid_factors: tuple[float, ...] | None = None

    def factors(self, ctx: Context) -> tuple[float, ...]:
        if self.grid_factors is not None:
            return self.grid_factors
        return QUICK_GRID_FACTORS if ctx.quick else GRID_FACTORS

    def rule(self, name: str, ctx: Context) -> dict[str, Any]:
        return transfer_hparams(name, self.baseline(ctx), None)

    def grid_hparams(self, name: str, ctx: Context) -> dict[str, Any]:
        """The grid's hyper-parameters other than the lr: the rule's (the weight decay
        included), with the task's ``grid_overrides``."""
        overrides: Mapping[str, Any]
        if self.grid_overrides is not None:
            overrides = self.grid_overrides.get(name, {})
        else:
            overrides = compare_settings(name).grid_overrides.get(self.name, {})
        return {**self.rule(name, ctx), **overrides}

    def centre(self, name: str, ctx: Context) -> float:
        """--lr NAME=VALUE, else the task's measured centre, else (None) the rule's lr."""
        if name in ctx.lr:
            return ctx.lr[name]
        if self.centres is not None:
            centre = self.centres.get(name)
        else:
            centre = compare_settings(name).centres.get(self.name)
        return self.rule(name, ctx)["lr"] if centre is None else centre

    def plan(self, ctx: Context) -> list[RunSpec]:
        steps = self.steps(ctx)
        specs = []
        for name in ctx.optimizers:
            points = grid_points(
                self.centre(name, ctx),
                self.grid_hparams(name, ctx),
                self.rule(name, ctx),
                self.factors(ctx),
            )
            for factor, is_rule, hparams in points:
                for i in range(ctx.seeds):
                    specs.append(
                        RunSpec(
                            task=self.name,
                            label=name,
                            optimizer=name,
                            hparams=hparams,
                            seed=ctx.seed + i,
                            steps=steps,
                            quick=ctx.quick,
                            device=str(ctx.device),
                            text=ctx.text,
                            factor=factor,
                            rule=is_rule,
                            cost=self.run_cost(ctx, steps),
                        )
                    )
        return specs

    def execute(self, spec: RunSpec, report: Report) -> RunResult:
        return self.train(spec, report)

    def summarize(
        self, ctx: Context, specs: Sequence[RunSpec], results: Sequence[RunResult]
    ) -> TaskResult:
        sweeps: dict[str, OptimizerSweep] = {}
        runs: list[RunResult] = []
        for name in ctx.optimizers:
            groups: dict[tuple[float, float | None, bool], list[RunResult]] = {}
            hparams_of: dict[tuple[float, float | None, bool], dict[str, Any]] = {}
            for spec, result in zip(specs, results, strict=True):
                if spec.optimizer != name:
                    continue
                key = (spec.hparams["lr"], spec.factor, spec.rule)
                groups.setdefault(key, []).append(result)
                hparams_of[key] = spec.hparams
            points = []
            for key in sorted(groups, key=lambda k: k[0]):
                group = groups[key]
                points.append(
                    GridPoint(
                        lr=key[0],
                        factor=key[1],
                        rule=key[2],
                        hparams=hparams_of[key],
                        final_metric=mean([r.final_metric for r in group]),
                        seed_metrics=[r.final_metric for r in group],
                        eval_steps=list(group[0].eval_steps),
                        metrics=mean_curve([r.metrics for r in group]),
                        losses=mean_curve([r.losses for r in group]),
                        cpu_seconds=[r.run_cpu_seconds for r in group],
                    )
                )
            best = choose_best(points, self.higher_is_better)
            sweep = OptimizerSweep(
                name=name,
                centre=self.centre(name, ctx),
                points=points,
                best=best,
                rule_hparams=self.rule(name, ctx),
                rule_note=compare_settings(name).rule_note,
            )
            rule = sweep.rule_point
            if rule is not None:
                sweep.rule_gap_to_best = rule.final_metric - sweep.chosen.final_metric
            sweeps[name] = sweep
            chosen = sweep.chosen
            first = next(
                r
                for (lr, factor, is_rule), group in groups.items()
                for r in group
                if lr == chosen.lr and factor == chosen.factor and is_rule == chosen.rule
            )
            runs.append(
                RunResult(
                    label=name,
                    hparams=chosen.hparams,
                    optimizer=name,
                    seed=ctx.seed,
                    factor=chosen.factor,
                    rule=chosen.rule,
                    steps=list(range(1, len(chosen.losses) + 1)),
                    losses=chosen.losses,
                    eval_steps=chosen.eval_steps,
                    metrics=chosen.metrics,
                    final_metric=chosen.final_metric,
                    state_bytes_per_param=first.state_bytes_per_param,
                    extra=dict(first.extra),
                )
            )
        if "adamw" in sweeps:
            reference = sweeps["adamw"].chosen.final_metric
            for sweep in sweeps.values():
                sweep.gap_to_adamw = sweep.chosen.final_metric - reference
        notes = [
            f"{name}: the best lr is at the edge of the grid ({sweep.chosen.lr:.3g}); the "
            "optimum may lie beyond it"
            for name, sweep in sweeps.items()
            if sweep.best_at_edge
        ]
        return TaskResult(
            name=self.name,
            description=self.description,
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            runs=runs,
            settings={
                **self.settings(ctx),
                "quality_tolerance": self.tolerance,
                "steps": self.steps(ctx),
                "seeds": [ctx.seed + i for i in range(ctx.seeds)],
                "grid_factors": list(self.factors(ctx)),
                "adamw_baseline": {
                    "lr": self.baseline(ctx).lr,
                    "weight_decay": self.baseline(ctx).weight_decay,
                },
            },
            notes=notes,
            sweeps=sweeps,
        )

    def _timing_steps(self, ctx: Context) -> int:
        return self.timing_steps if ctx.steps is None else min(self.timing_steps, ctx.steps)

    def timing_cost(self, ctx: Context) -> float:
        return len(ctx.optimizers) * self.run_cost(ctx, self._timing_steps(ctx), timing=True)

    def timing_specs(self, ctx: Context, result: TaskResult) -> list[RunSpec]:
        steps = self._timing_steps(ctx)
        return [
            RunSpec(
                task=self.name,
                label=run.label,
                optimizer=run.optimizer,
                hparams=run.hparams,
                seed=ctx.seed,
                steps=steps,
                quick=ctx.quick,
                device=str(ctx.device),
                text=ctx.text,
                purpose="timing",
                cost=self.run_cost(ctx, steps, timing=True),
            )
            for run in result.runs
        ]

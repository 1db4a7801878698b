"""What the ``danlu compare`` tasks share: settings, results, hyper-parameter transfer, timing and
memory measurement."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import danlu
from danlu.registry import Baseline, CompareSettings, compare_names, get_info


def optimizer_choices() -> tuple[str, ...]:
    """The optimizers ``--optimizers`` accepts, in display order: every registered optimizer
    with ``danlu compare`` settings (``danlu.registry.CompareSettings``)."""
    return compare_names()


def compare_settings(name: str) -> CompareSettings:
    """``name``'s ``danlu compare`` settings, from its registration."""
    settings = get_info(name).compare
    if settings is None:
        raise ValueError(f"optimizer {name!r} has no danlu compare settings")
    return settings


def transfer_hparams(name: str, base: Baseline, lr_override: float | None) -> dict[str, Any]:
    """Keyword arguments for optimizer ``name`` derived from the AdamW baseline by the blog's
    transfer rule, which each optimizer declares in its registration
    (``CompareSettings.rule``; its ``rule_note`` says what it is), e.g. Lion: lr ÷ 10, weight
    decay × 10 (blog 9473); Tiger: α = 2e-3, λ = 0.01, β = 0.965 for language and 0.945 for
    vision (blog 9512); Amos: ξ = 1/√N (blog 9344). ``lr_override`` replaces the lr."""
    kw = dict(compare_settings(name).rule(base))
    if lr_override is not None:
        kw["lr"] = lr_override
    return kw


def make_optimizer(name: str, model: nn.Module, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    """A registered optimizer on ``danlu.param_groups(model)`` (kinds, centres, no decay for
    biases and norms; Amos reads the per-group η)."""
    kw = dict(hparams)
    groups = danlu.param_groups(model, weight_decay=kw.pop("weight_decay", None))
    return danlu.create_optimizer(name, groups, **kw)


@dataclass(frozen=True)
class RunSpec:
    """One training run to do: picklable, so that a worker process can do it. ``factor`` is the
    grid point's multiple of the optimizer's centre lr (None for a point off the grid, such as
    the blog's transfer rule when it lies outside it); ``rule`` marks the run whose settings are
    the blog's; ``purpose`` is "sweep" (the run that gives the metric) or "timing" (a short run
    alone on the machine for the time per step and the peak memory)."""

    task: str
    label: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    steps: int
    quick: bool
    device: str
    text: str | None = None
    factor: float | None = None
    rule: bool = False
    purpose: str = "sweep"
    cost: float = 1.0  # estimated seconds on one core: for scheduling and the ETA
    index: int = 0


@dataclass
class RunResult:
    """One optimizer (or variant) on one task."""

    label: str
    hparams: dict[str, Any]
    optimizer: str = ""
    seed: int = 0
    factor: float | None = None
    rule: bool = False
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    final_metric: float = float("nan")
    seconds_per_step: float = float("nan")
    cpu_seconds_per_step: float = float("nan")
    state_bytes_per_param: float = float("nan")
    peak_memory_bytes: int | None = None
    #: the whole run (evaluation included): wall and CPU seconds of the process that did it
    run_seconds: float = float("nan")
    run_cpu_seconds: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GridPoint:
    """One learning rate of an optimizer's grid: the metric averaged over the seeds."""

    lr: float
    factor: float | None
    rule: bool
    hparams: dict[str, Any]
    final_metric: float
    seed_metrics: list[float]
    eval_steps: list[int]
    metrics: list[float]
    losses: list[float]
    cpu_seconds: list[float] = field(default_factory=list)  # per seed, the whole run

    def to_json(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "factor": self.factor,
            "rule": self.rule,
            "hparams": self.hparams,
            "final_metric": self.final_metric,
            "seed_metrics": self.seed_metrics,
            "curve": {"steps": self.eval_steps, "metric": self.metrics},
            "losses": self.losses,
            "cpu_seconds": self.cpu_seconds,
        }


@dataclass
class OptimizerSweep:
    """An optimizer's lr grid on one task, the point chosen (the best) and the blog's rule."""

    name: str
    centre: float
    points: list[GridPoint]
    best: int  # index into points
    rule_hparams: dict[str, Any]
    rule_note: str
    gap_to_adamw: float | None = None
    rule_gap_to_best: float | None = None

    @property
    def chosen(self) -> GridPoint:
        return self.points[self.best]

    @property
    def rule_point(self) -> GridPoint | None:
        return next((p for p in self.points if p.rule), None)

    @property
    def best_at_edge(self) -> bool:
        """The best grid point is the smallest or the largest lr of a grid of three or more:
        the optimum may lie outside it."""
        grid = [p.lr for p in self.points if p.factor is not None]
        if len(grid) < 3:  # --quick's two points are both edges: nothing to flag
            return False
        return self.chosen.factor is not None and self.chosen.lr in (min(grid), max(grid))

    def to_json(self) -> dict[str, Any]:
        return {
            "centre_lr": self.centre,
            "grid": [p.to_json() for p in self.points],
            "chosen_lr": self.chosen.lr,
            "chosen_hparams": self.chosen.hparams,
            "chosen_final_metric": self.chosen.final_metric,
            "best_at_grid_edge": self.best_at_edge,
            "gap_to_adamw": self.gap_to_adamw,
            "rule": {
                "hparams": self.rule_hparams,
                "note": self.rule_note,
                "final_metric": None if self.rule_point is None else self.rule_point.final_metric,
                "gap_to_best": self.rule_gap_to_best,
            },
        }


@dataclass
class TaskResult:
    name: str
    description: str
    metric: str  # e.g. "test accuracy"
    higher_is_better: bool
    runs: list[RunResult]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    sweeps: dict[str, OptimizerSweep] = field(default_factory=dict)
    #: extra table columns: (header, key in run.extra, format)
    columns: list[tuple[str, str, str]] = field(default_factory=list)

    def better(self, a: float, b: float) -> bool:
        """a is strictly better than b (NaN is worse than anything)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "settings": self.settings,
            "notes": self.notes,
            "runs": [r.to_json() for r in self.runs],
        }
        if self.sweeps:
            out["optimizers"] = {name: sweep.to_json() for name, sweep in self.sweeps.items()}
        return out


@dataclass
class Context:
    """What every task gets from the command line."""

    optimizers: Sequence[str]
    steps: int | None
    seed: int
    device: torch.device
    quick: bool
    lr: dict[str, float]
    text: str | None
    seeds: int = 1


def state_bytes_per_param(opt: torch.optim.Optimizer, model: nn.Module) -> float:
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total / max(numel, 1)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so that the next block's
    resident-set growth counts what it allocates rather than reusing an earlier run's pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA's allocator high-water mark, or on CPU the peak resident set
    size above the level at entry (after returning freed memory to the OS), sampled every 2 ms;
    None where /proc is not available. Allocations made before the block (the model) are not
    counted: the figure is optimizer state + gradients + activations + temporaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self._base: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self._base = _rss_bytes()
        self._max = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = _rss_bytes()
            if rss is not None and self._max is not None and rss > self._max:
                self._max = rss

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - (self._base or 0)
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(0, (self._max or 0) - self._base)


def warmup_steps(steps: int) -> int:
    """Steps left out of the time per step: the first ones pay for thread pools, allocator
    growth and lazy initialisation."""
    return min(5, steps // 5)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

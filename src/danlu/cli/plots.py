"""The figures of ``danlu compare`` (matplotlib, Agg backend). Every axis says which way is
better; legends sit outside the axes so that they cover no curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from danlu.cli.common import TaskResult
from danlu.registry import REGISTRY


def optimizer_colour(label: str) -> str | None:
    """An optimizer's colour, the same in every panel (``CompareSettings.colour``); None (the
    plot's next colour) for a label that is not an optimizer's name."""
    info = REGISTRY.get(label)
    return None if info is None or info.compare is None else info.compare.colour


SOURCES = {
    "embedding-drift": "blog: kexue.fm/archives/9736",
    "accumulation": "blog: kexue.fm/archives/8634",
    "lora": "blog: kexue.fm/archives/10226, 10266",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _direction(task: TaskResult) -> str:
    return "higher is better" if task.higher_is_better else "lower is better"


def _legend_right(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _legend_below(ax: Any, ncol: int = 2) -> None:
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def _plot_curves(ax: Any, task: TaskResult) -> None:
    for run in task.runs:
        colour = optimizer_colour(run.label)
        lr = run.hparams.get("lr")
        label = f"{run.label} (lr {lr:.2g})" if lr is not None else run.label
        ax.plot(run.eval_steps, run.metrics, marker=".", color=colour, label=label, lw=1.3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task.metric}\n({_direction(task)})")
    ax.set_title(f"{task.name}: each optimizer at its best lr", loc="left", fontsize=10)
    _legend_below(ax, ncol=3)


def _plot_grid(ax: Any, task: TaskResult) -> None:
    """Final metric against lr, one line per optimizer: ● the best point, ☆ the blog's rule.
    Points far worse than every optimizer's best are drawn at the edge (▲/▼) with their
    value, so that they do not squash the rest."""
    finals = [s.chosen.final_metric for s in task.sweeps.values()]
    finals = [f for f in finals if math.isfinite(f)]
    if not finals:
        return
    spread = max(finals) - min(finals)
    margin = max(3 * spread, 0.05 * abs(max(finals)), 1e-3)
    if task.higher_is_better:
        low, high = min(finals) - margin, max(finals) + 0.25 * margin
    else:
        low, high = min(finals) - 0.25 * margin, max(finals) + margin
    for name, sweep in task.sweeps.items():
        colour = optimizer_colour(name)
        lrs = [p.lr for p in sweep.points]
        worst = low if task.higher_is_better else high
        values = [
            min(max(p.final_metric, low), high) if math.isfinite(p.final_metric) else worst
            for p in sweep.points
        ]
        ax.plot(lrs, values, "-", color=colour, lw=1.0, alpha=0.8, label=name)
        for i, (point, value) in enumerate(zip(sweep.points, values, strict=True)):
            clipped = value != point.final_metric
            if clipped:
                marker = "^" if value == high else "v"
                ax.plot(point.lr, value, marker, color=colour, ms=6)
                shown = f"{point.final_metric:.3g}" if math.isfinite(point.final_metric) else "nan"
                ax.annotate(
                    shown,
                    (point.lr, value),
                    textcoords="offset points",
                    xytext=(0, -10 if value == high else 4),
                    ha="center",
                    fontsize=6,
                    color=colour,
                )
            if point.rule:
                ax.plot(point.lr, value, "*", ms=11, mfc="none", mec=colour, mew=1.2)
            if i == sweep.best:
                ax.plot(point.lr, value, "o", ms=5, color=colour)
    ax.plot([], [], "*", ms=9, mfc="none", mec="black", label="the blog's rule")
    ax.plot([], [], "o", ms=5, color="black", label="best of the grid")
    ax.set_xscale("log")
    ax.set_ylim(low, high)
    ax.set_xlabel("learning rate (Tiger, AdaFactor: relative; Amos: ξ)")
    ax.set_ylabel(f"final {task.metric}\n({_direction(task)})")
    ax.set_title(f"{task.name}: the lr grid (×½, ×1, ×2)", loc="left", fontsize=10)
    _legend_right(ax)


def _plot_accumulation(ax: Any, task: TaskResult) -> None:
    for run in task.runs:
        style = "--" if "4×16" in run.label else "-"
        ax.plot(run.steps, _smooth(run.losses, 5), style, label=run.label, lw=1.3)
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("training loss, mean of 5 updates\n(lower is better)")
    ax.set_title(
        f"accumulation: k = 4 × 16 vs 64 ({SOURCES['accumulation']})", loc="left", fontsize=10
    )
    _legend_below(ax)


def _plot_drift(ax: Any, task: TaskResult) -> None:
    for run in task.runs:
        ax.plot(run.eval_steps, run.metrics, label=run.extra.get("description", run.label))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("step")
    ax.set_ylabel("max |θ|·λ over the rare rows\n(1 = at ∓1/λ; lower is better)")
    ax.set_title(f"embedding drift ({SOURCES['embedding-drift']})", loc="left", fontsize=10)
    _legend_below(ax, ncol=1)


def _plot_other(ax: Any, task: TaskResult) -> None:
    for run in task.runs:
        ax.plot(run.eval_steps, run.metrics, marker=".", label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task.metric}\n({_direction(task)})")
    source = SOURCES.get(task.name)
    ax.set_title(f"{task.name}" + (f" ({source})" if source else ""), loc="left", fontsize=10)
    _legend_below(ax)


def plot_compare(results: Sequence[TaskResult], path: str) -> None:
    """A row per optimizer-sweep task (the best runs' curves, and the lr grid with the blog's
    rule marked), then the other tasks two to a row."""
    plt = _pyplot()
    sweeps = [t for t in results if t.sweeps]
    others = [t for t in results if not t.sweeps]
    rows = len(sweeps) + math.ceil(len(others) / 2)
    fig, axes = plt.subplots(
        rows, 2, figsize=(13.0, 4.6 * rows), squeeze=False, layout="constrained"
    )
    for row, task in enumerate(sweeps):
        _plot_curves(axes[row][0], task)
        _plot_grid(axes[row][1], task)
    cells = [ax for r in range(len(sweeps), rows) for ax in axes[r]]
    for ax, task in zip(cells, others, strict=False):
        if task.name == "accumulation":
            _plot_accumulation(ax, task)
        elif task.name == "embedding-drift":
            _plot_drift(ax, task)
        else:
            _plot_other(ax, task)
        ax.grid(alpha=0.3)
    for ax in cells[len(others) :]:
        ax.axis("off")
    for row in range(len(sweeps)):
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    fig.suptitle(
        "danlu compare: each optimizer over an lr grid (×½, ×1, ×2 of a measured centre, same "
        "seeds); ☆ the blog's transfer rule from AdamW",
        fontsize=11,
    )
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_drift(task: TaskResult, path: str) -> None:
    """Each rare row's |θ|·λ over time, one panel per variant: under Tiger every row seen once
    climbs to the limit 1 (θ = ∓1/λ)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1,
        len(task.runs),
        figsize=(3.6 * len(task.runs), 3.6),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, run in zip(axes.flat, task.runs, strict=True):
        rows = list(zip(*run.extra["rare_rows"], strict=True))
        for row in rows:
            ax.plot(run.eval_steps, row, lw=0.8, alpha=0.7)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_ylim(0, 1.08)
        ax.set_title(run.extra.get("description", run.label), fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("|θ|·λ of each rare row\n(1 = at ∓1/λ; lower is better)")
    fig.suptitle(
        "Embedding drift (blog: kexue.fm/archives/9736; docs: optimizers/tiger.md): rows of "
        f"tokens seen once, λ = {task.settings['lambda']:g}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

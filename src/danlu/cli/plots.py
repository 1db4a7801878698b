"""The figures of ``danlu compare`` (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from danlu.cli.common import TaskResult


def _pyplot():
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


def plot_compare(results: Sequence[TaskResult], path: str) -> None:
    """One panel per task: the evaluation metric over steps (for accumulation: the training
    loss per update, where the curves that must coincide do)."""
    plt = _pyplot()
    n = len(results)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, results, strict=False):
        if task.name == "accumulation":
            for run in task.runs:
                style = "--" if "4×16" in run.label else "-"
                ax.plot(run.steps, _smooth(run.losses, 5), style, label=run.label, lw=1.4)
            ax.set_yscale("log")
            ax.set_xlabel("update")
            ax.set_ylabel("training loss (5-update mean)")
        elif task.name == "embedding-drift":
            for run in task.runs:
                ax.plot(run.eval_steps, run.metrics, label=run.extra.get("description", run.label))
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.axhline(0.1, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 1.08)
            ax.set_xlabel("step")
            ax.set_ylabel("max |θ|·λ over rare rows (1 = ∓1/λ)")
        else:
            for run in task.runs:
                ax.plot(run.eval_steps, run.metrics, marker=".", label=run.label)
            ax.set_xlabel("step")
            ax.set_ylabel(task.metric)
        ax.set_title(f"{task.name}", loc="left", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("danlu compare", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_drift(task: TaskResult, path: str) -> None:
    """Each rare row's |θ|·λ over time, one panel per variant: under Tiger every row seen once
    climbs to the limit 1 (θ = ∓1/λ)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(task.runs), figsize=(3.6 * len(task.runs), 3.4), sharey=True, squeeze=False
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
    axes.flat[0].set_ylabel("|θ|·λ of each rare row")
    fig.suptitle(
        f"Embedding drift (SPEC §4): rows of tokens seen once, λ = {task.settings['lambda']:g}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

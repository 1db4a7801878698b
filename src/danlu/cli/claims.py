"""The blog's claims that a ``danlu compare`` run tests, with the numbers measured, the tolerance
used and a verdict: reproduced, partly or not reproduced. Only claims whose task ran appear."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from danlu.cli.common import TaskResult, compare_settings, optimizer_choices

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"

BLOG = "kexue.fm/archives/"
#: The sources of the claims that are not about one optimizer's settings (those cite the blog
#: article its registration names: :func:`source`).
SOURCES = {
    "accumulation": f"{BLOG}8634 · docs: optimizers/tiger.md",
    "drift": f"{BLOG}9736 · docs: optimizers/tiger.md, wrappers.md",
}


def source(name: str) -> str:
    """The blog article an optimizer's claims cite (``CompareSettings.blog``) and its page."""
    return f"{BLOG}{compare_settings(name).blog} · docs: optimizers/{name}.md"


#: AdaFactor factors a matrix whose two largest dimensions are both at least this (its default
#: ``min_dim_size_to_factor``, the blog's and the paper's).
FACTOR_THRESHOLD = 128
#: the accumulation claim: parameters equal up to float32 rounding over the run
EXACT_TOLERANCE = 1e-5
#: the drift claims: a row "at the limit" is within 10 % of 1/λ; "stopped" stays under a quarter
#: of it (the initialisation alone puts the largest rare-row entry near 0.06 of it)
DRIFT_AT_LIMIT, DRIFT_STOPPED = 0.9, 0.25


@dataclass
class Claim:
    id: str
    claim: str
    source: str
    measured: str
    tolerance: str
    verdict: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(passed: Sequence[bool]) -> str:
    if passed and all(passed):
        return REPRODUCED
    return PARTLY if any(passed) else NOT_REPRODUCED


def _worse_by(task: TaskResult, difference: float) -> float:
    """How much worse a metric difference (a − reference) is, in the metric's units."""
    return -difference if task.higher_is_better else difference


def _units(task: TaskResult) -> tuple[float, str]:
    if task.metric == "test accuracy":
        return 100.0, "points"
    return 1.0, task.metric.split()[-1]


def _relative(task: TaskResult, difference: float, reference: str) -> str:
    """A metric difference (a − reference) as "0.123 bits/char worse than AdamW"."""
    if math.isnan(difference):
        return f"diverged (vs {reference})"
    scale, unit = _units(task)
    worse = _worse_by(task, difference) * scale
    if abs(worse) < 5e-4:
        return f"equal to {reference}"
    return f"{abs(worse):.3g} {unit} {'worse' if worse > 0 else 'better'} than {reference}"


def _tolerance(task: TaskResult) -> float:
    return float(task.settings.get("quality_tolerance", math.nan))


def _tolerance_text(task: TaskResult) -> str:
    scale, unit = _units(task)
    return f"{task.name}: ≤ {_tolerance(task) * scale:g} {unit} worse"


def quality_claim(name: str, title: str, tasks: Sequence[TaskResult]) -> Claim | None:
    """``name`` at its best lr is as good as AdamW at its best lr, with half the state."""
    parts, passed, numbers, tolerances = [], [], {}, []
    for task in tasks:
        if name not in task.sweeps or "adamw" not in task.sweeps:
            continue
        sweep = task.sweeps[name]
        runs = {r.label: r for r in task.runs}
        worse = _worse_by(task, sweep.gap_to_adamw or 0.0)
        state = runs[name].state_bytes_per_param
        reference = runs["adamw"].state_bytes_per_param
        ratio = state / reference if reference else math.nan
        ok = worse <= _tolerance(task) and ratio <= 0.5 + 1e-9
        passed.append(ok)
        tolerances.append(_tolerance_text(task))
        numbers[task.name] = {
            "gap_to_adamw": sweep.gap_to_adamw,
            "lr": sweep.chosen.lr,
            "adamw_lr": task.sweeps["adamw"].chosen.lr,
            "state_bytes_per_param": state,
            "adamw_state_bytes_per_param": reference,
        }
        parts.append(
            f"{task.name}: {_relative(task, sweep.gap_to_adamw or 0.0, 'AdamW')} "
            f"(lr {sweep.chosen.lr:.3g} vs {task.sweeps['adamw'].chosen.lr:.3g}), "
            f"state {state:.2g} vs {reference:.2g} B/param"
        )
    if not parts:
        return None
    return Claim(
        id=f"{name}-matches-adamw",
        claim=title,
        source=source(name),
        measured="; ".join(parts),
        tolerance="; ".join(tolerances) + "; state ≤ ½ of AdamW's",
        verdict=_verdict(passed),
        numbers=numbers,
    )


def rule_claim(name: str, tasks: Sequence[TaskResult]) -> Claim | None:
    """The blog's setting for ``name`` is (within tolerance) as good as its best grid point."""
    parts, passed, numbers, tolerances = [], [], {}, []
    for task in tasks:
        sweep = task.sweeps.get(name)
        if sweep is None or sweep.rule_point is None or sweep.rule_gap_to_best is None:
            continue
        rule = sweep.rule_point
        worse = _worse_by(task, sweep.rule_gap_to_best)
        passed.append(worse <= _tolerance(task))
        tolerances.append(_tolerance_text(task))
        extra = {k: v for k, v in rule.hparams.items() if k in ("beta",)}
        best_extra = {k: v for k, v in sweep.chosen.hparams.items() if k in ("beta",)}
        describe = ", ".join(f"{k} {v:g}" for k, v in extra.items())
        describe_best = ", ".join(f"{k} {v:g}" for k, v in best_extra.items())
        numbers[task.name] = {
            "rule_hparams": rule.hparams,
            "rule_final_metric": rule.final_metric,
            "best_hparams": sweep.chosen.hparams,
            "best_final_metric": sweep.chosen.final_metric,
            "rule_gap_to_best": sweep.rule_gap_to_best,
        }
        if sweep.chosen is rule:
            parts.append(f"{task.name}: the rule (lr {rule.lr:.3g}) is the best point")
        else:
            parts.append(
                f"{task.name}: rule lr {rule.lr:.3g}{', ' + describe if describe else ''} → "
                f"{rule.final_metric:.4g}; best lr {sweep.chosen.lr:.3g}"
                f"{', ' + describe_best if describe_best else ''} → "
                f"{sweep.chosen.final_metric:.4g}: the rule is "
                f"{_relative(task, sweep.rule_gap_to_best, 'the best')}"
            )
    if not parts:
        return None
    return Claim(
        id=f"{name}-rule",
        claim=compare_settings(name).rule_claim or "",
        source=source(name),
        measured="; ".join(parts),
        tolerance="; ".join(tolerances) + " than the best grid point",
        verdict=_verdict(passed),
        numbers=numbers,
    )


def accumulation_claim(task: TaskResult) -> Claim:
    runs = {r.label: r for r in task.runs}
    big, small = runs["tiger batch 64"], runs["tiger 4×16 hidden"]
    param_gap = task.settings["tiger_max_param_difference"]
    loss_gap = task.settings["tiger_max_loss_difference"]
    same_state = big.state_bytes_per_param == small.state_bytes_per_param
    ok = param_gap <= EXACT_TOLERANCE and same_state
    return Claim(
        id="tiger-accumulation-exact",
        claim="Tiger's gradient accumulation (grad_accum_steps = k) equals training on k-times "
        "larger batches exactly, with no extra state",
        source=SOURCES["accumulation"],
        measured=f"k = 4 × 16 vs 64 over {task.settings['updates']} updates: max |Δθ| = "
        f"{param_gap:.1e}, max |Δloss| = {loss_gap:.1e}; state {small.state_bytes_per_param:.2g}"
        f" vs {big.state_bytes_per_param:.2g} B/param",
        tolerance=f"max |Δθ| ≤ {EXACT_TOLERANCE:g} (float32 rounding); equal state",
        verdict=REPRODUCED if ok else NOT_REPRODUCED,
        numbers={
            "max_param_difference": param_gap,
            "max_loss_difference": loss_gap,
            "state_bytes_per_param": small.state_bytes_per_param,
            "large_batch_state_bytes_per_param": big.state_bytes_per_param,
        },
    )


def adafactor_claim(tasks: Sequence[TaskResult]) -> Claim | None:
    for task in tasks:
        runs = {r.label: r for r in task.runs}
        if "adafactor" not in runs or "state" not in runs["adafactor"].extra:
            continue
        rows = runs["adafactor"].extra["state"]
        factored = [
            r for r in rows if sorted(r["shape"])[-2] >= FACTOR_THRESHOLD and len(r["shape"]) == 2
        ]
        if not factored:
            continue
        exact = [r for r in factored if r["state_entries"] == sum(r["shape"])]
        full = sum(math.prod(r["shape"]) for r in factored)
        state = sum(r["state_entries"] for r in factored)
        adamw = runs.get("adamw")
        bytes_text = f"; whole model {runs['adafactor'].state_bytes_per_param:.2g} B/param" + (
            f" vs AdamW's {adamw.state_bytes_per_param:.2g}" if adamw else ""
        )
        return Claim(
            id="adafactor-state",
            claim="AdaFactor keeps n + m numbers for an n × m matrix instead of n·m (no momentum)",
            source=source("adafactor"),
            measured=f"{task.name}: {len(exact)} of {len(factored)} matrices with both "
            f"dimensions ≥ {FACTOR_THRESHOLD} hold n + m entries ({state:,} for {full:,} "
            f"weights){bytes_text}",
            tolerance="exact entry count",
            verdict=_verdict([len(exact) == len(factored)]),
            numbers={
                "task": task.name,
                "matrices": factored,
                "state_bytes_per_param": runs["adafactor"].state_bytes_per_param,
                "adamw_state_bytes_per_param": adamw.state_bytes_per_param if adamw else None,
            },
        )
    return None


def drift_claims(task: TaskResult) -> list[Claim]:
    runs = {r.label: r.final_metric for r in task.runs}
    limit = task.settings["limit"]
    claims = [
        Claim(
            id="drift-tiger",
            claim="Under Tiger, embedding rows of tokens seen once drift to ∓1/λ",
            source=SOURCES["drift"],
            measured=f"max |θ|·λ over the rare rows after {task.settings['steps']} steps: "
            f"{runs['tiger']:.2f} (1 = at ∓1/λ = ∓{limit:g})",
            tolerance=f"≥ {DRIFT_AT_LIMIT:g}",
            verdict=REPRODUCED if runs["tiger"] >= DRIFT_AT_LIMIT else NOT_REPRODUCED,
            numbers={"tiger": runs["tiger"]},
        ),
        Claim(
            id="drift-lazy-adam",
            claim="Lazy updates and Adam for the embeddings stop the drift",
            source=SOURCES["drift"],
            measured=f"Tiger + Lazy {runs['tiger+lazy']:.2f}; Adam for the embeddings "
            f"{runs['adam-embeddings']:.2f}",
            tolerance=f"< {DRIFT_STOPPED:g}",
            verdict=_verdict(
                [runs["tiger+lazy"] < DRIFT_STOPPED, runs["adam-embeddings"] < DRIFT_STOPPED]
            ),
            numbers={k: runs[k] for k in ("tiger+lazy", "adam-embeddings")},
        ),
        Claim(
            id="drift-tying",
            claim="Tied input and output embeddings (with HalfSwap) stop the drift",
            source=SOURCES["drift"],
            measured=f"tied + HalfSwap {runs['tied+halfswap']:.2f} (our finding: a token never "
            "predicted still gets a push of one sign)",
            tolerance=f"< {DRIFT_STOPPED:g}",
            verdict=REPRODUCED if runs["tied+halfswap"] < DRIFT_STOPPED else NOT_REPRODUCED,
            numbers={"tied+halfswap": runs["tied+halfswap"]},
        ),
    ]
    return claims


def evaluate(results: Sequence[TaskResult]) -> list[Claim]:
    """Every claim the run's tasks test, in a fixed order."""
    sweeps = [t for t in results if t.sweeps]
    by_name = {t.name: t for t in results}
    # each optimizer's claims, as its registration states them (CompareSettings)
    names = optimizer_choices()
    settings = {name: compare_settings(name) for name in names}
    claims: list[Claim | None] = [
        quality_claim(name, title, sweeps)
        for name in names
        if (title := settings[name].matches_adamw_claim) is not None
    ]
    claims += [rule_claim(name, sweeps) for name in names if settings[name].rule_claim]
    if "accumulation" in by_name:
        claims.append(accumulation_claim(by_name["accumulation"]))
    claims.append(adafactor_claim(sweeps))
    if "embedding-drift" in by_name:
        claims += drift_claims(by_name["embedding-drift"])
    return [c for c in claims if c is not None]

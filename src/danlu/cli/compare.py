"""``danlu compare``: train small real models with several optimizers side by side and test the
blog's claims on the user's own machine: each optimizer at its best lr from a small grid (the
blog's transfer rule run as well, as a marked point), a claims table with verdicts,
``results.json`` and ``compare.png``/``drift.png``.

Every argument is checked before anything runs; a bad value ends with a one-line message and
exit code 2. The runs go to worker processes, one thread each. Files are written only into
``--out`` (libraries' caches and temporary files too, in a scratch directory removed at the
end), at the end, each one atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from danlu.cli import claims as claims_module
from danlu.cli.common import Context, RunResult, RunSpec, TaskResult, optimizer_choices
from danlu.cli.runner import Progress, available_cores, execute
from danlu.cli.tasks import DEFAULT_TASKS, TASKS

DEFAULT_OUT = "danlu-compare"
#: The ranges the command line accepts (a float32 lr beyond them overflows or underflows the
#: optimizers' arithmetic; seeds are 32-bit so that every derived seed fits torch's generator).
LR_RANGE = (1e-6, 1.0)
SEED_MAX = 2**32 - 1
STEPS_MAX = 1_000_000
SEEDS_MAX = 100
JOBS_MAX = 1024


class UsageError(Exception):
    """A bad command-line value: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="danlu compare",
        description=(
            "Train small real models with several optimizers side by side, offline, and test "
            "the blog's claims: each optimizer is run over a small lr grid (x1/2, x1, x2 of a "
            "measured centre, same seeds) and reported at its best lr, next to the setting the "
            "blog's transfer rule gives; a claims table says what was reproduced. Prints the "
            "tables and writes results.json, compare.png and drift.png into --out."
        ),
        epilog=(
            "tasks: "
            + "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())
            + ". Example: danlu compare --task digits charlm --optimizers adamw,tiger --quick"
        ),
    )
    parser.add_argument(
        "--task",
        nargs="+",
        action="extend",
        metavar="NAME",
        help=f"tasks to run (default: all of {', '.join(DEFAULT_TASKS)}); "
        f"choose from {', '.join(TASKS)}",
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(optimizer_choices()),
        metavar="LIST",
        help=f"comma-separated optimizers for the digits and charlm tasks (default: "
        f"{','.join(optimizer_choices())})",
    )
    parser.add_argument(
        "--steps",
        type=str,
        default=None,
        metavar="N",
        help="training steps per run (default: per task; fewer with --quick)",
    )
    parser.add_argument(
        "--seed",
        type=str,
        default="0",
        metavar="S",
        help="random seed for data order and initialisation (default: 0)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="auto (CUDA when available, else CPU), cpu or cuda (default: auto)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"directory for results.json and the figures (default: "
        f"./{DEFAULT_OUT}); nothing is written anywhere else",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: smaller models, fewer steps, two grid points per optimizer; under "
        "a minute on 2 CPU cores",
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="centre of one optimizer's lr grid, e.g. --lr tiger=3e-3 (repeatable; the grid is "
        "x1/2, x1, x2 of it)",
    )
    parser.add_argument(
        "--seeds",
        type=str,
        default="1",
        metavar="N",
        help="seeds per grid point, the same for every optimizer; the metric is their mean "
        "(default: 1)",
    )
    parser.add_argument(
        "--jobs",
        type=str,
        default=None,
        metavar="N",
        help="runs at a time, each in its own process with one thread (default: the number of "
        "available cores on CPU, 1 on CUDA)",
    )
    parser.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="your own text file for the charlm task (default: the Python "
        "standard library's source files)",
    )
    return parser


def _parse_int(name: str, value: str | None, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"argument {name}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise UsageError(f"argument {name}: must be >= {minimum}, got {number}")
    if number > maximum:
        raise UsageError(f"argument {name}: must be <= {maximum}, got {number}")
    return number


def _check_text(path: str) -> None:
    """A readable regular file of at least 2000 bytes (a FIFO or a device would block or never
    end: refused before opening)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"argument --text: cannot read {path!r} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise UsageError(f"argument --text: {path!r} is {kind} (give a text file)")
    try:
        with open(path, "rb") as f:
            sample = f.read(1 << 16)
    except OSError as exc:
        raise UsageError(f"argument --text: cannot read {path!r} ({exc.strerror or exc})") from None
    if len(sample) < 2_000:
        raise UsageError(f"argument --text: {path!r} is too short (at least 2000 bytes are needed)")


def _check_out(value: str) -> Path:
    """--out names a directory that exists or can be created: every existing part of the path is
    a directory and the deepest existing one is writable (creation itself is tried in
    ``prepare_out``, still before any training)."""
    if not value.strip():
        raise UsageError("argument --out: must not be empty (give a directory)")
    out = Path(value)
    probe = out
    while True:
        if probe.exists():
            if not probe.is_dir():
                raise UsageError(
                    f"argument --out: {str(probe)!r} exists and is not a directory"
                    + ("" if probe == out else f" (in {str(out)!r})")
                )
            if not os.access(probe, os.W_OK | os.X_OK):
                raise UsageError(f"argument --out: {str(probe)!r} is not writable")
            return out
        if probe.parent == probe:
            return out
        probe = probe.parent


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Turn parsed arguments into settings; raise UsageError for anything wrong."""
    tasks = args.task or list(DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(
            f"argument --task: unknown task {unknown[0]!r} (choose from {', '.join(TASKS)})"
        )
    tasks = list(dict.fromkeys(tasks))

    optimizers = [o.strip().lower() for o in args.optimizers.split(",") if o.strip()]
    if not optimizers:
        raise UsageError("argument --optimizers: give at least one optimizer")
    choices = optimizer_choices()
    for name in optimizers:
        if name not in choices:
            raise UsageError(
                f"argument --optimizers: unknown optimizer {name!r} "
                f"(choose from {', '.join(choices)})"
            )
    optimizers = list(dict.fromkeys(optimizers))

    lrs: dict[str, float] = {}
    for item in args.lr:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep:
            raise UsageError(f"argument --lr: expected NAME=VALUE, got {item!r}")
        if name not in choices:
            raise UsageError(
                f"argument --lr: unknown optimizer {name!r} (choose from {', '.join(choices)})"
            )
        try:
            lr = float(value)
        except ValueError:
            raise UsageError(
                f"argument --lr: {name}'s value must be a number, got {value!r}"
            ) from None
        if not math.isfinite(lr) or lr <= 0:
            raise UsageError(
                f"argument --lr: {name}'s value must be a finite number > 0, got {value!r}"
            )
        low, high = LR_RANGE
        if not low <= lr <= high:
            raise UsageError(
                f"argument --lr: {name}'s value must be in [{low:g}, {high:g}], got {value!r}"
            )
        lrs[name] = lr

    steps = _parse_int("--steps", args.steps, 1, STEPS_MAX)
    seed = _parse_int("--seed", args.seed, 0, SEED_MAX)
    seeds = _parse_int("--seeds", args.seeds, 1, SEEDS_MAX)
    jobs = _parse_int("--jobs", args.jobs, 1, JOBS_MAX)
    assert seed is not None and seeds is not None
    if seed + seeds - 1 > SEED_MAX:
        raise UsageError(f"argument --seeds: --seed + --seeds - 1 must be <= {SEED_MAX}")

    device_name = args.device.lower()
    if device_name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"argument --device: expected auto, cpu or cuda, got {args.device!r}")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for but no CUDA device is available")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if jobs is None:
        jobs = available_cores() if device_name == "cpu" else 1

    if args.text is not None:
        _check_text(args.text)

    out = _check_out(args.out)

    return {
        "tasks": tasks,
        "optimizers": optimizers,
        "lr": lrs,
        "steps": steps,
        "seed": seed,
        "seeds": seeds,
        "jobs": jobs,
        "device": torch.device(device_name),
        "out": out,
        "quick": args.quick,
        "text": args.text,
    }


# ---------------------------------------------------------------------------------------------
# The terminal tables (rich)


def _fmt_hparams(hparams: dict[str, Any]) -> str:
    parts = []
    for key, name in (("lr", "lr"), ("weight_decay", "wd"), ("beta", "β"), ("betas", "β")):
        if key in hparams:
            value = hparams[key]
            if isinstance(value, list | tuple):
                text = "(" + ",".join(f"{v:g}" for v in value) + ")"
            else:
                text = f"{value:.3g}"
            parts.append(f"{name} {text}")
    return ", ".join(parts)


def _direction(task: TaskResult) -> str:
    return "higher is better" if task.higher_is_better else "lower is better"


def _fmt_metric(task: TaskResult, value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "diverged"


def _short(lr: float) -> str:
    """1e-3, 2.5e-4, 0.21: short and exact enough for a grid of factors of two."""
    if 1e-2 <= lr < 10:
        return f"{lr:.2g}"
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _short_metric(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def _timing_cells(run: RunResult) -> list[str]:
    peak = "—" if run.peak_memory_bytes is None else f"{run.peak_memory_bytes / 2**20:.1f}"
    ms = "—" if math.isnan(run.seconds_per_step) else f"{run.seconds_per_step * 1e3:.2f}"
    return [ms, f"{run.state_bytes_per_param:.3g}", peak]


def _sweep_table(task: TaskResult) -> Any:
    from rich.table import Table

    table = Table(title=f"{task.name}: {task.description}", title_justify="left", show_lines=False)
    table.add_column("optimizer", no_wrap=True)
    table.add_column("best lr", justify="right", min_width=8)
    table.add_column(f"{task.metric} ({_direction(task)})", justify="right", min_width=11)
    table.add_column("Δ vs AdamW", justify="right", min_width=8)
    table.add_column("grid lr:metric (*the blog's rule)", ratio=1)
    table.add_column("ms/step", justify="right", min_width=7)
    table.add_column("state B/param", justify="right", min_width=7)
    table.add_column("peak MiB", justify="right", min_width=6)
    runs = {r.label: r for r in task.runs}
    finals = [s.chosen.final_metric for s in task.sweeps.values()]
    best = None
    for value in finals:
        if best is None or task.better(value, best):
            best = value
    for name, sweep in task.sweeps.items():
        chosen = sweep.chosen
        metric = _fmt_metric(task, chosen.final_metric)
        if best is not None and chosen.final_metric == best:
            metric = f"[bold]{metric}[/bold]"
        grid = " ".join(
            ("[bold]" if i == sweep.best else "")
            + f"{'*' if p.rule else ''}{_short(p.lr)}:{_short_metric(p.final_metric)}"
            + ("[/bold]" if i == sweep.best else "")
            for i, p in enumerate(sweep.points)
        )
        gap = "" if sweep.gap_to_adamw is None or name == "adamw" else f"{sweep.gap_to_adamw:+.4f}"
        edge = " (edge)" if sweep.best_at_edge else ""
        extra = ""
        if "beta" in chosen.hparams:
            extra = f" β={chosen.hparams['beta']:g}"
        table.add_row(
            name,
            f"{_short(chosen.lr)}{edge}{extra}",
            metric,
            gap,
            grid,
            *_timing_cells(runs[name]),
        )
    return table


def _runs_table(task: TaskResult) -> Any:
    from rich.table import Table

    table = Table(title=f"{task.name}: {task.description}", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column(f"{task.metric} ({_direction(task)})", justify="right")
    for header, _, _ in task.columns:
        table.add_column(header, justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("state B/param", justify="right")
    table.add_column("peak MiB", justify="right")
    table.add_column("hyper-parameters", no_wrap=True)
    for run in task.runs:
        cells = []
        for _, key, fmt in task.columns:
            value = run.extra.get(key)
            cells.append("" if value is None else format(value, fmt))
        table.add_row(
            run.label,
            _fmt_metric(task, run.final_metric),
            *cells,
            *_timing_cells(run),
            _fmt_hparams(run.hparams),
        )
    return table


def print_tables(console: Any, results: Sequence[TaskResult]) -> None:
    for task in results:
        console.print(_sweep_table(task) if task.sweeps else _runs_table(task))
        for note in task.notes:
            console.print(f"  [dim]{note}[/dim]")


VERDICT_STYLE = {"reproduced": "green", "partly": "yellow", "not reproduced": "red"}


def print_claims(console: Any, claims: Sequence[claims_module.Claim]) -> None:
    from rich.table import Table

    table = Table(
        title="The blog's claims, as this run tested them", title_justify="left", show_lines=True
    )
    table.add_column("claim", ratio=3)
    table.add_column("measured", ratio=5)
    table.add_column("tolerance", ratio=2)
    table.add_column("verdict")
    table.add_column("source", ratio=2)
    for claim in claims:
        style = VERDICT_STYLE.get(claim.verdict, "")
        table.add_row(
            claim.claim,
            claim.measured,
            claim.tolerance,
            f"[{style}]{claim.verdict}[/{style}]",
            claim.source,
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------
# Files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any, mode: int = 0o666) -> None:
    """Write through a temporary file in the same directory and rename it into place, so a
    reader never sees half a file; the file gets ``mode`` less the umask, as ``open`` would give
    it (``mkstemp`` alone creates it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class OutDir:
    """``--out``, created (with any missing parents) and probed for writing before any training;
    what was created is removed again if the run ends without writing its results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: list[Path] = []

    def prepare(self) -> None:
        missing = []
        probe = self.path
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self.created.append(directory)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".danlu-probe-")
            os.close(fd)
            os.remove(tmp)
        except OSError as exc:
            self.discard()
            reason = exc.strerror or str(exc)
            where = (
                f" ({exc.filename!s})" if exc.filename and exc.filename != str(self.path) else ""
            )
            raise UsageError(
                f"argument --out: cannot write into {str(self.path)!r}: {reason}{where}"
            ) from None

    def discard(self) -> None:
        """Remove the directories this run created, if they are still empty."""
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self.created = []


#: Where libraries write caches by default (the home directory, the system's temporary
#: directory): pointed into a scratch directory inside --out for the run.
SCRATCH_VARIABLES = {
    "MPLCONFIGDIR": "matplotlib",  # matplotlib's config and font cache (~/.config/matplotlib)
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # created when torch._dynamo is imported
    "TRITON_CACHE_DIR": "triton",
    "TMPDIR": "tmp",
}


@contextlib.contextmanager
def scratch_in(out: Path) -> Iterator[Path]:
    """A temporary directory inside --out for everything libraries would write elsewhere
    (matplotlib's config and cache, torch's compile cache, temporary files), removed at the
    end, so that the run writes into --out and nowhere else. matplotlib and torch read these
    variables once, when first imported, so this is entered before anything imports them;
    worker processes inherit them."""
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".danlu-scratch-")).resolve()
    previous = {name: os.environ.get(name) for name in SCRATCH_VARIABLES}
    previous_tempdir = tempfile.tempdir
    for name, sub in SCRATCH_VARIABLES.items():
        (scratch / sub).mkdir()
        os.environ[name] = str(scratch / sub)
    tempfile.tempdir = str(scratch / "tmp")
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous_tempdir
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(scratch, ignore_errors=True)


def results_json(
    settings: dict[str, Any],
    results: Sequence[TaskResult],
    claims: Sequence[claims_module.Claim],
    seconds: float,
) -> dict[str, Any]:
    import danlu

    return {
        "danlu_version": danlu.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(settings["device"]),
        "jobs": settings["jobs"],
        "threads_per_run": 1,
        "settings": {
            k: (str(v) if isinstance(v, Path | torch.device) else v) for k, v in settings.items()
        },
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds(),
        "claims": [c.to_json() for c in claims],
        "tasks": {task.name: task.to_json() for task in results},
    }


def _cpu_seconds() -> dict[str, float]:
    """CPU time so far of this process and of its finished worker processes (user + system)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "main_process": own.ru_utime + own.ru_stime,
        "workers": children.ru_utime + children.ru_stime,
    }


def write_outputs(
    out: Path,
    settings: dict[str, Any],
    results: Sequence[TaskResult],
    claims: Sequence[claims_module.Claim],
    seconds: float,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    payload = results_json(settings, results, claims, seconds)
    path = out / "results.json"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))
    written.append(path)
    from danlu.cli.plots import plot_compare, plot_drift

    path = out / "compare.png"
    _atomic_write(path, lambda tmp: plot_compare(results, tmp))
    written.append(path)
    drift = [t for t in results if t.name == "embedding-drift"]
    if drift:
        path = out / "drift.png"
        _atomic_write(path, lambda tmp: plot_drift(drift[0], tmp))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"danlu compare: error: {message}", file=sys.stderr)
    return 2


def run(argv: Sequence[str] | None = None) -> int:
    """``danlu compare``: 0 on success, 2 for bad input (one line on stderr, nothing written),
    130 when interrupted (one line, nothing written)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = validate(args)
    except UsageError as exc:
        return _error(f"{exc} (see danlu compare --help)")
    for module in ("rich", "matplotlib", "sklearn"):
        if importlib.util.find_spec(module) is None:
            return _error(f"{module} is missing (pip install 'danlu[compare]')")
    out = OutDir(settings["out"])
    try:
        out.prepare()
    except UsageError as exc:
        return _error(f"{exc} (see danlu compare --help)")
    finished = False
    try:
        with scratch_in(out.path):
            _run(settings)
        finished = True
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while cleaning up
        print("danlu compare: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if not finished:
            out.discard()
    return 0


def _run(settings: dict[str, Any]) -> None:
    from rich.console import Console

    # a wide table even when the output is not a terminal (CI logs, files)
    console = Console(width=None if sys.stdout.isatty() else 140)
    ctx = Context(
        optimizers=settings["optimizers"],
        steps=settings["steps"],
        seed=settings["seed"],
        device=settings["device"],
        quick=settings["quick"],
        lr=settings["lr"],
        text=settings["text"],
        seeds=settings["seeds"],
    )
    tasks = [TASKS[name] for name in settings["tasks"]]
    plans = [task.plan(ctx) for task in tasks]
    specs = _numbered([spec for plan in plans for spec in plan])
    jobs = min(settings["jobs"], len(specs))
    timing_reserve = sum(task.timing_cost(ctx) for task in tasks)
    console.print(
        f"danlu compare: {len(specs)} runs ({', '.join(settings['tasks'])}) on "
        f"{settings['device']}, {jobs} at a time, one thread each; writing into "
        f"{settings['out']}",
        highlight=False,
    )
    start = time.perf_counter()

    def log(spec: RunSpec, result: RunResult) -> None:
        if spec.purpose != "sweep":
            return
        where = f"lr {spec.hparams['lr']:.3g}" if "lr" in spec.hparams else ""
        if spec.rule:
            where += " (blog's rule)"
        value = f"{result.final_metric:.4f}" if math.isfinite(result.final_metric) else "—"
        task = TASKS[spec.task]
        progress.log(
            f"  {spec.task} · {spec.label} {where} seed {spec.seed}: {value} {task.metric}"
        )

    with Progress(console, specs, extra_cost=timing_reserve) as progress:
        raw = execute(specs, jobs=jobs, progress=progress, on_done=log)
        results: list[TaskResult] = []
        offset = 0
        for task, plan in zip(tasks, plans, strict=True):
            results.append(task.summarize(ctx, plan, raw[offset : offset + len(plan)]))
            offset += len(plan)
        # time per step and peak memory: short runs one at a time, nothing else running
        timing_plans = [
            task.timing_specs(ctx, result) for task, result in zip(tasks, results, strict=True)
        ]
        timing_specs = _numbered([s for plan in timing_plans for s in plan], start=len(specs))
        progress.add(timing_specs, reserved=timing_reserve)
        timings = execute(timing_specs, jobs=1, progress=progress)
        offset = 0
        for task, result, plan in zip(tasks, results, timing_plans, strict=True):
            task.attach_timing(result, timings[offset : offset + len(plan)])
            offset += len(plan)
    claims = claims_module.evaluate(results)
    seconds = time.perf_counter() - start
    print_tables(console, results)
    if claims:
        print_claims(console, claims)
    written = write_outputs(settings["out"], settings, results, claims, seconds)
    cpu = sum(_cpu_seconds().values())
    console.print(
        f"{seconds:.0f} s on {settings['device']} ({jobs} runs at a time, one thread each; "
        f"{cpu:.0f} CPU-seconds in all); wrote " + ", ".join(str(p) for p in written),
        highlight=False,
    )


def _numbered(specs: Sequence[RunSpec], start: int = 0) -> list[RunSpec]:
    return [dataclasses.replace(spec, index=start + i) for i, spec in enumerate(specs)]

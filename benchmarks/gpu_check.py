"""The CUDA checks in one command, ``make gpu-check`` (about 8 minutes on one H200):

1. **tests**: the tests marked ``gpu`` and tests/test_kernels_triton.py, natively (no
   Triton interpreter), with pytest-xdist;
2. **kernels**: every Triton kernel (Lion, Tiger, AdaX, AdaFactor) in each variant it
   supports against the single-tensor path, at the distinct parameter shapes of a 1B LLaMA
   (benchmarks/gpu_kernels.py says how outputs are compared);
3. **bench**: step time and achieved bandwidth against the bandwidth floor, danlu's CUDA
   paths against torch's fused AdamW and the other installed peers, at the 0.95B parameters
   of a LLaMA-1B shape set (benchmarks/gpu_bench.py);
4. the report, benchmarks/RESULTS-cuda.md, with the device, the torch and Triton versions and
   the date, rewritten after each part, so that a run that crashes or runs out of time still
   leaves one.

    python benchmarks/gpu_check.py                  # everything → benchmarks/RESULTS-cuda.md
    python benchmarks/gpu_check.py --parts kernels  # some parts only

Each part runs in a process of its own under a time limit (its share of ``--budget``, plus
whatever earlier parts left unused); a part that crashes or runs out of time is reported as
such with what it had done. Exit status: 0 when every part ran to the end and passed; 1 when a
test failed, a kernel output is out of tolerance, a danlu row of the benchmark failed, or a
part did not finish; 2 without a CUDA device (a one-line message, nothing runs).

This module imports only the standard library at the top: pytest loads it as a plugin
(``-p gpu_check``) to select the CUDA tests and to record their results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
DEFAULT_OUT = HERE / "RESULTS-cuda.md"

PARTS = ("tests", "kernels", "bench")
#: Seconds each part may use when the earlier ones used all of theirs (450 s in all; the
#: rest of the 8 minutes is for starting Python, the CUDA checks and the report).
BUDGET = {"tests": 150.0, "kernels": 180.0, "bench": 100.0}
TOTAL_BUDGET = 450.0

#: Test files run as a whole on CUDA (besides every test marked ``gpu``).
NATIVE_FILES = ("test_kernels_triton.py",)
SELECT_ENV = "GPU_CHECK_SELECT"
RECORDS_ENV = "GPU_CHECK_RECORDS"


# ---------------------------------------------------------------------------------------------
# Part 1: the CUDA tests (this module is also the pytest plugin that selects and records them)


_GPU_MARK = re.compile(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\s*=.*\bpytest\.mark\.gpu\b", re.M)


def cuda_test_files(tests: Path = TESTS) -> list[Path]:
    """The test files with CUDA tests: those that mark a test ``gpu``, and NATIVE_FILES."""
    files = []
    for path in sorted(tests.glob("test_*.py")):
        if path.name in NATIVE_FILES or _GPU_MARK.search(path.read_text(encoding="utf-8")):
            files.append(path)
    return files


def selected(item: Any) -> bool:
    """Whether a collected pytest item is a CUDA test (marked ``gpu``, or in NATIVE_FILES)."""
    return "gpu" in item.keywords or Path(str(item.fspath)).name in NATIVE_FILES


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """pytest hook (with ``-p gpu_check`` and GPU_CHECK_SELECT=1): keep the CUDA tests."""
    if not os.environ.get(SELECT_ENV):
        return
    keep = [item for item in items if selected(item)]
    dropped = [item for item in items if not selected(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_runtest_logreport(report: Any) -> None:
    """pytest hook: append each test's outcome to the file GPU_CHECK_RECORDS names (by the
    controller only under pytest-xdist, which forwards the workers' reports to it)."""
    path = os.environ.get(RECORDS_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when != "call" and report.outcome != "passed"):
        outcome = report.outcome
        if report.when != "call" and outcome == "failed":
            outcome = "error"
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if outcome == "skipped" else "xpassed"
        message = ""
        if outcome in ("failed", "error"):
            message = str(report.longrepr)[-1500:]
        elif outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        record = {
            "kind": "test",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": outcome,
            "seconds": report.duration,
            "message": message,
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def tests_command(files: Sequence[Path], workers: int) -> list[str]:
    command = [sys.executable, "-m", "pytest", *map(str, files), "-p", "gpu_check"]
    command += ["-p", "no:cacheprovider", "-q", "-rfEs"]
    if workers > 1 and _has_module("xdist"):
        command += ["-n", str(workers)]
    return command


def summarize_tests(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Outcome counts (one per test: an error in setup or teardown counts as the test's) and
    the failures."""
    final: dict[str, Mapping[str, Any]] = {}
    rank = {"error": 3, "failed": 2, "xpassed": 1}
    for record in records:
        if record.get("kind") != "test":
            continue
        previous = final.get(record["nodeid"])
        if previous is None or rank.get(record["outcome"], 0) >= rank.get(previous["outcome"], 0):
            final[record["nodeid"]] = record
    counts: dict[str, int] = {}
    for record in final.values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    failures = [r for r in final.values() if r["outcome"] in ("failed", "error")]
    skips = [r for r in final.values() if r["outcome"] == "skipped"]
    return {"counts": counts, "failures": failures, "skips": skips, "total": len(final)}


# ---------------------------------------------------------------------------------------------
# Running the parts


@dataclass
class PartResult:
    name: str
    # passed, failed, timeout, crashed, incomplete, interrupted; "not run" while it waits;
    # "skipped" when the check ended before it
    status: str = "not run"
    seconds: float = 0.0
    limit: float = 0.0
    returncode: int | None = None
    command: str = ""
    note: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to ``process``'s group, then (10 s later at most) SIGKILL to what is left of it
    (pytest-xdist workers, a compiler subprocess)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10.0)
        time.sleep(0.2)  # the others of the group after their leader
    if process.poll() is None:
        process.wait()


def run_process(
    command: Sequence[str], *, timeout: float, env: Mapping[str, str], cwd: Path = ROOT
) -> tuple[int | None, bool, float]:
    """Run ``command`` in a new process group; after ``timeout`` seconds, or when this process
    is interrupted, stop the whole group. Returns (exit status or None, timed out, seconds)."""
    start = time.monotonic()
    process = subprocess.Popen(list(command), env=dict(env), cwd=cwd, start_new_session=True)
    try:
        return process.wait(timeout=max(timeout, 1.0)), False, time.monotonic() - start
    except subprocess.TimeoutExpired:
        stop_group(process)
        return None, True, time.monotonic() - start
    except BaseException:  # interrupted (SIGINT, SIGTERM): leave nothing running
        stop_group(process)
        raise


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a part wrote (a line cut short by a crash is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def part_limits(budget: float, parts: Sequence[str]) -> dict[str, float]:
    """Each part's share of ``budget``, in proportion to BUDGET."""
    total = sum(BUDGET[p] for p in parts)
    return {p: budget * BUDGET[p] / total for p in parts}


def time_for(part: str, parts: Sequence[str], limits: Mapping[str, float], left: float) -> float:
    """What ``part`` may use: the time left less the shares of the parts after it."""
    later = parts[parts.index(part) + 1 :]
    return left - sum(limits[p] for p in later)


def child_env(records: Path) -> dict[str, str]:
    """The environment of a part: danlu from where this process imports it, this folder
    importable (the plugin, step_bench), Triton compiling (not interpreting), unbuffered."""
    env = {
        k: v
        for k, v in os.environ.items()
        # not interpreted, and not taken for a pytest-xdist worker when started from one
        if k != "TRITON_INTERPRET" and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))
    }
    paths = [str(HERE)]
    try:
        import danlu

        paths.insert(0, str(Path(danlu.__file__).resolve().parents[1]))
    except ImportError:
        paths.insert(0, str(ROOT / "src"))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env[RECORDS_ENV] = str(records)
    return env


def finish_part(result: PartResult, records: list[dict[str, Any]]) -> PartResult:
    """Set ``result.status`` and ``note`` from what the part wrote and how it ended."""
    result.records = records
    if result.name == "tests":
        summary = summarize_tests(records)
        counts = summary["counts"]
        bad = counts.get("failed", 0) + counts.get("error", 0)
        if bad:
            result.status = "failed"
        elif result.returncode == 0 and counts.get("passed", 0):
            result.status = "passed"
        elif result.returncode == 0:
            result.status, result.note = "failed", "no test ran"
        else:
            result.status = "crashed"
            result.note = f"pytest exited with status {result.returncode}"
    else:
        results = [r for r in records if r.get("kind") in ("variant", "row")]
        skipped = [r for r in records if r.get("kind") == "skipped"]
        started = {r.get("variant") for r in records if r.get("kind") == "start"}
        finished = {r.get("variant") for r in records if r.get("kind") == "variant"}
        if result.name == "kernels":
            failed = [r for r in results if not r.get("passed")]
        else:
            failed = [r for r in results if r.get("danlu") and r.get("error")]
        unfinished = sorted(v for v in started - finished if v)
        notes = []
        if unfinished:
            notes.append(f"died in {', '.join(unfinished)}")
        if skipped:
            notes.append(f"{len(skipped)} not run (out of time)")
        if failed:
            result.status = "failed"
        elif unfinished:
            result.status = "crashed"
        elif skipped:
            result.status = "incomplete"
        elif result.returncode == 0 and results:
            result.status = "passed"
        elif result.returncode == 0:
            result.status = "failed"
            notes.append("no results")
        else:
            result.status = "crashed"
        if result.returncode not in (0, 1, None):
            notes.append(f"exit status {result.returncode}")
        elif result.returncode == 1 and result.status == "crashed":
            notes.append("exited with an error (see its output)")
        result.note = "; ".join(notes)
    return result


def run_part(name: str, limit: float, workdir: Path, options: argparse.Namespace) -> PartResult:
    records_path = workdir / f"{name}.jsonl"
    records_path.unlink(missing_ok=True)
    env = child_env(records_path)
    if name == "tests":
        files = cuda_test_files()
        command = tests_command(files, options.workers)
        env[SELECT_ENV] = "1"
    else:
        # the part stops starting new cases 10 s before its limit, so it ends by itself
        script = HERE / ("gpu_kernels.py" if name == "kernels" else "gpu_bench.py")
        command = [sys.executable, str(script), "--records", str(records_path)]
        command += ["--seconds", f"{max(limit - 10.0, 1.0):.0f}"]
        if options.shapes:
            command += ["--shapes", options.shapes]
    shown = " ".join(Path(c).name if c == sys.executable else c for c in command)
    print(f"[gpu-check] {name}: up to {limit:.0f} s: {shown}", file=sys.stderr, flush=True)
    returncode, timed_out, seconds = run_process(command, timeout=limit, env=env)
    result = PartResult(name, seconds=seconds, limit=limit, returncode=returncode)
    result.command = shown.replace(str(ROOT) + os.sep, "")
    finish_part(result, read_records(records_path))
    if timed_out:
        result.status = "timeout"
        result.note = "; ".join(x for x in (f"stopped after {seconds:.0f} s", result.note) if x)
    print(f"[gpu-check] {name}: {result.status} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# The report


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value != value:
        return "—"
    return format(value, spec)


def render_tests(part: PartResult) -> list[str]:
    summary = summarize_tests(part.records)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(summary["counts"].items())) or "no results"
    lines = [(f"`{part.command}`: " if part.command else "") + f"{counts}.", ""]
    if summary["failures"]:
        lines += ["| failed test | when | message (end) |", "|---|---|---|"]
        for r in summary["failures"]:
            message = " ".join(r["message"].split())[-300:].replace("|", "\\|")
            lines.append(f"| `{r['nodeid']}` | {r['when']} | {message} |")
        lines.append("")
    if summary["skips"]:
        lines.append(
            "Skipped: "
            + "; ".join(f"`{r['nodeid']}` ({r['message']})" for r in summary["skips"][:20])
            + "."
        )
        lines.append("")
    return lines


def render_kernels(part: PartResult) -> list[str]:
    meta = next((r for r in part.records if r.get("kind") == "meta"), None)
    lines = []
    if meta:
        lines += [
            f"Shapes: `{meta['shapes']}`, {meta['tensors']} tensors, "
            f"{meta['numel'] / 1e6:.1f}M elements (distinct shapes: "
            f"{', '.join(meta['distinct'])}). Each variant: one warm-up step (compiles the "
            "kernels), then compared steps, each from the kernel side's state; the reference "
            "is the single-tensor path (`fused=False, foreach=False`) on fp32 copies (bf16 "
            "copies where the momentum follows the parameter's dtype).",
            "",
        ]
    lines += [
        "| kernel | variant | ref | output | dtype | compared | max abs err | max rel err "
        "| tolerance | beyond | ties left out | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.records:
        if r.get("kind") == "skipped":
            lines.append(f"| | {r['variant']} | | | | | | | | | | not run ({r['reason']}) |")
        if r.get("kind") != "variant":
            continue
        head = f"| {r['algorithm']} | {r['label']} | {r.get('reference', '—')} "
        if r.get("error"):
            message = r["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(head + f"| | | | | | | | | **ERROR** {message} |")
            continue
        if r.get("kernel_seen") is False:
            lines.append(head + "| | | | | | | | | **FAIL**: no Triton kernel ran |")
        for o in r["outputs"]:
            extra = ""
            if o["mode"] == "stochastic":
                extra = f" (z = {_fmt(o.get('sr_z'), '.2f')}, Σerr²/E = "
                extra += f"{_fmt(o.get('sr_spread'), '.3f')})"
            elif o["mode"] in ("nearest", "adjacent"):
                extra = f" ({o['differ'] / max(o['numel'], 1):.3%} differ)"
            result = "ok" if o["passed"] else f"**FAIL**: {o['problem']}"
            lines.append(
                head + f"| {o['output']} | {o['dtype']} | {o['numel']} | {_fmt(o['max_abs'])} "
                f"| {_fmt(o['max_rel'])} | {o['tolerance']} | {o['beyond']} "
                f"| {o['excluded']} | {result}{extra} |"
            )
    timing = [
        f"{r['variant']} {r['warmup_seconds']:.1f}+{r['seconds'] - r['warmup_seconds']:.1f} s"
        + (f" ({r['peak_gib']:.1f} GiB)" if r.get("peak_gib") is not None else "")
        for r in part.records
        if r.get("kind") == "variant" and not r.get("error")
    ]
    if timing:
        lines += [
            "",
            "Warm-up (compilation) + compared steps, peak GPU memory: " + "; ".join(timing) + ".",
        ]
    return [*lines, ""]


def render_bench(part: PartResult) -> list[str]:
    bw = next((r for r in part.records if r.get("kind") == "bandwidth"), None)
    lines = []
    if bw:
        lines += [
            f"{bw['numel'] / 1e9:.2f}B parameters (LLaMA-1B shapes). Bandwidth measured in "
            f"this run: in-place add {bw['add'] / 1e9:.0f} GB/s, copy {bw['copy'] / 1e9:.0f} "
            "GB/s. Floor = bytes a step must move (θ read and written, g read, the state read "
            "and written) × parameters / the add's bandwidth. Median of 10 steps timed with "
            "CUDA events after 3 warm-up steps.",
            "",
        ]
    lines += [
        "| params | implementation | step ms | floor ms | × floor | achieved GB/s "
        "| state B/param | peak GiB | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.records:
        if r.get("kind") == "skipped":
            lines.append(f"| {r['dtype']} | {r['label']} | not run ({r['reason']}) | | | | | | |")
        if r.get("kind") != "row":
            continue
        if r.get("error"):
            message = r["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['dtype']} | {r['label']} | error: {message} | | | | | | |")
            continue
        lines.append(
            f"| {r['dtype']} | {r['label']} | {r['seconds'] * 1e3:.2f} "
            f"| {r['floor_seconds'] * 1e3:.2f} | {r['ratio']:.2f} | {r['achieved'] / 1e9:.0f} "
            f"| {r['state_bytes']:.3g} | {_fmt(r['peak_gib'], '.2f')} "
            f"| {r['warmup_seconds']:.1f} |"
        )
    return [*lines, ""]


def render_report(meta: Mapping[str, Any], parts: Mapping[str, PartResult]) -> str:
    """RESULTS-cuda.md from the run's description and the parts' results so far."""
    overall = overall_status(parts)
    lines = [
        "# CUDA check",
        "",
        "Generated by `make gpu-check` (`python benchmarks/gpu_check.py`): the CUDA tests, "
        "every Triton kernel against the single-tensor path at LLM sizes, and the step "
        "benchmark against torch's fused AdamW.",
        "",
        f"Device: {meta.get('device', '—')}. Software: {meta.get('software', '—')}.",
        f"Date: {meta.get('date', '—')}. Wall time: {meta.get('elapsed', 0.0):.0f} s "
        f"(budget {meta.get('budget', 0.0):.0f} s).",
        "",
        f"**Result: {overall}**",
        "",
        "| part | status | seconds (limit) | note |",
        "|---|---|---|---|",
    ]
    for name, part in parts.items():
        lines.append(
            f"| {name} | {part.status} | {part.seconds:.0f} ({part.limit:.0f}) | {part.note} |"
        )
    lines.append("")
    sections = (
        ("tests", "1. CUDA tests", render_tests),
        ("kernels", "2. Triton kernels against the single-tensor path", render_kernels),
        ("bench", "3. Step time against the bandwidth floor", render_bench),
    )
    for name, title, render in sections:
        if name not in parts or parts[name].status in ("not run", "skipped"):
            continue
        part = parts[name]
        lines += [f"## {title}", ""]
        if part.status in ("timeout", "crashed", "incomplete", "interrupted"):
            lines += [f"*{part.status}: {part.note}. What it had done:*", ""]
        lines += render(part)
    return "\n".join(lines).rstrip() + "\n"


def overall_status(parts: Mapping[str, PartResult]) -> str:
    if parts and all(p.status == "passed" for p in parts.values()):
        return "PASS"
    if any(p.status == "not run" for p in parts.values()):
        return "IN PROGRESS" if not any(p.status == "failed" for p in parts.values()) else "FAIL"
    return "FAIL"


def write_report(path: Path, meta: Mapping[str, Any], parts: Mapping[str, PartResult]) -> None:
    """Write the report atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(meta, parts), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The machine


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def describe_machine() -> dict[str, str]:
    """The device and the software versions (CUDA initialised in this process only to read
    the device's properties)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    device = (
        f"{props.name} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor})"
    )
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        if driver:
            device += f", driver {driver.splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    software = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    software.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        software.append(f"Triton {triton.__version__}")
    except ImportError:
        software.append("Triton not installed")
    try:
        import danlu

        software.append(f"danlu {danlu.__version__}")
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            software.append(f"commit {commit}")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"device": device, "software": ", ".join(software)}


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = torch.version.cuda
        what = f"torch {torch.__version__} " + (
            "is a CPU build" if build is None else f"(CUDA {build}) sees no CUDA device"
        )
        return f"no CUDA device: {what}; run it on a machine with an NVIDIA GPU"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the report")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds for the parts")
    parser.add_argument("--workers", type=int, default=6, help="pytest-xdist workers")
    parser.add_argument(
        "--records", type=Path, default=None, help="keep the parts' JSON lines in this folder"
    )
    parser.add_argument("--shapes", default="", help=argparse.SUPPRESS)  # e.g. tiny (a dry run)
    options = parser.parse_args(argv)
    parts = [p.strip() for p in options.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: choose from {', '.join(PARTS)}, got {options.parts!r}")
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: {reason}.", file=sys.stderr)
        return 2

    start = time.monotonic()
    meta: dict[str, Any] = {
        **describe_machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget": options.budget,
    }
    print(f"[gpu-check] {meta['device']}; {meta['software']}", file=sys.stderr, flush=True)
    results = {p: PartResult(p) for p in parts}
    limits = part_limits(options.budget, parts)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = options.records or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in parts:
            meta["elapsed"] = time.monotonic() - start
            write_report(options.out, meta, results)
            limit = time_for(name, parts, limits, options.budget - meta["elapsed"])
            if limit < 20:
                results[name].status, results[name].note = "timeout", "no time left"
                continue
            began = time.monotonic()
            try:
                results[name] = run_part(name, limit, workdir, options)
            except KeyboardInterrupt:
                part = PartResult(name, seconds=time.monotonic() - began, limit=limit)
                finish_part(part, read_records(workdir / f"{name}.jsonl"))
                part.status, part.note = "interrupted", "the check was interrupted"
                results[name] = part
                break
    for part in results.values():
        if part.status == "not run":
            part.status, part.note = "skipped", "the check ended before it"
    meta["elapsed"] = time.monotonic() - start
    write_report(options.out, meta, results)
    overall = overall_status(results)
    summary = ", ".join(f"{p.name} {p.status}" for p in results.values())
    print(
        f"[gpu-check] {overall} ({summary}) in {meta['elapsed']:.0f} s: {options.out}",
        file=sys.stderr,
    )
    return 0 if overall == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

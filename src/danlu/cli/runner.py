"""Doing the runs of ``danlu compare``: in parallel worker processes (one thread each), or in this
process, with one overall progress bar and its ETA."""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import torch

from danlu.cli.common import RunResult, RunSpec

#: How often a run reports its progress, in seconds.
REPORT_EVERY = 0.25

_QUEUE: Any = None  # in a worker process: where progress goes


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which container limits set)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


class _Reporter:
    """Counts steps and passes them on at most every REPORT_EVERY seconds."""

    def __init__(self, send: Callable[[int], None]) -> None:
        self.send = send
        self.pending = 0
        self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.pending:
            self.send(self.pending)
            self.pending = 0


def _worker_init(progress_queue: Any) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it (it
    # stops the workers), so the workers print no tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    global _QUEUE
    _QUEUE = progress_queue


def _execute(spec: RunSpec, report: Callable[[int], None]) -> RunResult:
    from danlu.cli.tasks import TASKS

    reporter = _Reporter(report)
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        result = TASKS[spec.task].execute(spec, reporter)
    finally:
        reporter.flush()
    result.run_seconds = time.perf_counter() - wall
    result.run_cpu_seconds = time.thread_time() - cpu
    return result


def _execute_in_worker(spec: RunSpec) -> RunResult:
    return _execute(spec, lambda n: _QUEUE.put((spec.index, n)))


class Progress:
    """One overall bar (rich) in estimated seconds of work, with the elapsed time and the ETA;
    ``advance(spec, steps)`` as a run reports, ``finish(spec)`` when it is done."""

    def __init__(self, console: Any, specs: Sequence[RunSpec], extra_cost: float = 0.0) -> None:
        from rich.progress import (
            BarColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self.done: dict[int, float] = {}
        self.progress = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("· left about"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[runs]}"),
            console=console,
            transient=False,
        )
        self.total_runs = len(specs)
        self.finished = 0
        self.task_id = self.progress.add_task(
            "danlu compare",
            total=sum(s.cost for s in specs) + extra_cost,
            runs=f"· 0/{self.total_runs} runs",
        )

    def __enter__(self) -> Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def add(self, specs: Sequence[RunSpec], reserved: float = 0.0) -> None:
        """Runs planned later (the timing runs), replacing ``reserved`` estimated seconds."""
        task = self.progress.tasks[0]
        self.total_runs += len(specs)
        self.progress.update(
            self.task_id,
            total=(task.total or 0.0) - reserved + sum(s.cost for s in specs),
            runs=f"· {self.finished}/{self.total_runs} runs",
        )

    def advance(self, spec: RunSpec, steps: int) -> None:
        amount = spec.cost * steps / max(spec.steps, 1)
        amount = min(amount, spec.cost - self.done.get(spec.index, 0.0))
        self.done[spec.index] = self.done.get(spec.index, 0.0) + amount
        self.progress.advance(self.task_id, amount)

    def finish(self, spec: RunSpec) -> None:
        self.progress.advance(self.task_id, spec.cost - self.done.get(spec.index, 0.0))
        self.done[spec.index] = spec.cost
        self.finished += 1
        self.progress.update(self.task_id, runs=f"· {self.finished}/{self.total_runs} runs")

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (they ignore Ctrl-C)."""
    terminate = getattr(executor, "terminate_workers", None)  # Python >= 3.14
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    if terminate is not None:
        terminate()
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


def execute(
    specs: Sequence[RunSpec],
    *,
    jobs: int,
    progress: Progress,
    on_done: Callable[[RunSpec, RunResult], None] | None = None,
) -> list[RunResult]:
    """Do ``specs`` (``spec.index`` must be unique), ``jobs`` at a time in worker processes
    (spawned, one thread each), or here one after another (also one thread) when ``jobs`` is
    1. The longest runs start first. Results come back in the order of ``specs``."""
    results: dict[int, RunResult] = {}
    by_index = {spec.index: spec for spec in specs}
    order = sorted(specs, key=lambda s: -s.cost)

    def done(spec: RunSpec, result: RunResult) -> None:
        results[spec.index] = result
        progress.finish(spec)
        if on_done is not None:
            on_done(spec, result)

    if jobs <= 1 or len(specs) <= 1:
        with _one_thread():
            for spec in order:
                result = _execute(spec, functools.partial(progress.advance, spec))
                done(spec, result)
        return [results[spec.index] for spec in specs]

    context = multiprocessing.get_context("spawn")
    # The worker processes (and multiprocessing's resource tracker) start with Ctrl-C ignored:
    # a disposition set to "ignore" survives exec, so a Ctrl-C while they import torch prints
    # no traceback either. This process handles it and stops them.
    with _sigint_ignored():
        progress_queue = context.Queue()
        executor = ProcessPoolExecutor(
            max_workers=min(jobs, len(specs)),
            mp_context=context,
            initializer=_worker_init,
            initargs=(progress_queue,),
        )
        pending: dict[Future[RunResult], RunSpec] = {
            executor.submit(_execute_in_worker, spec): spec for spec in order
        }
    try:
        while pending:
            finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress_queue, by_index, progress)
            for future in finished:
                spec = pending.pop(future)
                done(spec, future.result())
        executor.shutdown(wait=True)
    except BaseException:
        _stop(executor)
        raise
    finally:
        progress_queue.close()
        progress_queue.join_thread()
    return [results[spec.index] for spec in specs]


def _drain(progress_queue: Any, by_index: dict[int, RunSpec], progress: Progress) -> None:
    while True:
        try:
            index, steps = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        progress.advance(by_index[index], steps)

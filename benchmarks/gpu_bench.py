"""Step time against the memory-bandwidth floor at 1B-parameter LLaMA shapes (part 3 of
gpu_check.py): the implementations of benchmarks/step_bench.py (danlu's optimizers on their
default path, which on CUDA is the Triton kernel where there is one, and the peers that are
installed: torch's AdamW, lion-pytorch's Triton Lion, ...) on the 0.95B parameters of a
LLaMA-1B shape set, in fp32 and (danlu and torch's fused AdamW) in bf16.

Each step is timed with CUDA events after warm-up steps (the first step creates the state and
compiles the kernels); the floor is (bytes that must move per parameter: read and write θ and
the state, read g, measured from the optimizer's state) × parameters / (bandwidth of an
in-place add measured in the same run). Achieved bandwidth = floor bytes / step time.

    python benchmarks/gpu_bench.py --records out.jsonl      # what gpu_check.py runs
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_kernels
import step_bench

#: The implementations also timed with bf16 parameters.
BF16_LABELS = ("torch AdamW (fused)", "danlu.Lion", "danlu.Tiger", "danlu.AdaX", "danlu.AdaFactor")


def implementations(device: torch.device) -> list[tuple[str, str, Callable[..., Any]]]:
    """step_bench's implementations, minus danlu's ``fused=True`` rows (on CUDA the default
    path already is the Triton kernel; Amos's would compile with torch.compile for a minute),
    torch's fused AdamW first (the baseline), then danlu's, then the other peers."""
    danlu_rows = [row for row in step_bench._danlu_impls() if "(fused=True)" not in row[1]]
    peers = step_bench._peer_impls(device)
    first = [row for row in peers if row[1] == "torch AdamW (fused)"]
    return first + danlu_rows + [row for row in peers if row not in first]


def bench_params(
    shape_set: gpu_kernels.ShapeSet, dtype: torch.dtype, device: torch.device
) -> step_bench.ParamSet:
    """The shape set's parameters and gradients (random, drawn on the device)."""
    params = gpu_kernels.make_params(shape_set, dtype, device, seed=0)
    for p, g in zip(params, gpu_kernels.make_grads(params, seed=1), strict=True):
        p.grad = g
    return step_bench.ParamSet(params, [kind for _, _, kind in shape_set.shapes])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls: CUDA events on a GPU (the device's own clock, host
    gaps included), the wall clock otherwise."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        _sync(device)
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        _sync(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure_bandwidth(numel: int, device: torch.device, reps: int = 10) -> dict[str, float]:
    """Bytes per second of ``a.add_(b)`` (read 2, write 1) and ``a.copy_(b)`` (read 1, write 1)
    over ``numel`` fp32 elements: the medians of ``reps`` timed calls after 3 untimed ones."""
    a = torch.ones(numel, device=device)
    b = torch.ones(numel, device=device)
    out = {}
    for name, fn, nbytes in (
        ("add", lambda: a.add_(b), 12 * numel),
        ("copy", lambda: a.copy_(b), 8 * numel),
    ):
        for _ in range(3):
            fn()
        out[name] = nbytes / statistics.median(time_calls(fn, device, reps))
    return out


def floor_bytes(opt: Any, ps: step_bench.ParamSet) -> tuple[float, float]:
    """(state bytes per parameter, bytes a step must move per parameter: θ read and written,
    g read, the state read and written)."""
    numel = ps.numel
    state = step_bench.state_bytes(opt, numel)
    param_bytes = sum(p.numel() * p.element_size() for p in ps.params) / numel
    grads = [p.grad for p in ps.params if p.grad is not None]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads) / numel
    return state, 2 * param_bytes + grad_bytes + 2 * state


def bench_one(
    factory: Callable[..., Any],
    ps: step_bench.ParamSet,
    device: torch.device,
    bandwidth: float,
    *,
    warmup: int,
    reps: int,
) -> dict[str, Any]:
    """Build one optimizer, step it ``warmup`` + ``reps`` times, and measure."""
    base = 0
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    opt = factory(ps)
    for _ in range(warmup):
        opt.step()
    _sync(device)
    warm = time.perf_counter() - t
    times = time_calls(opt.step, device, reps)
    seconds = statistics.median(times)
    state, nbytes = floor_bytes(opt, ps)
    floor = nbytes * ps.numel / bandwidth
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    del opt
    return {
        "seconds": seconds,
        "min_seconds": min(times),
        "floor_seconds": floor,
        "ratio": seconds / floor,
        "achieved": nbytes * ps.numel / seconds,
        "floor_bytes": nbytes,
        "state_bytes": state,
        "peak_gib": peak,
        "warmup_seconds": warm,
    }


def run(
    shape_set: gpu_kernels.ShapeSet,
    device: torch.device,
    *,
    seconds: float,
    emit: Callable[[dict[str, Any]], None],
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    warmup: int = 3,
    reps: int = 10,
    min_seconds_left: float = 10.0,
) -> bool:
    """Time every implementation in each dtype, emitting a "bandwidth" record, then one "row"
    record per implementation, or a "skipped" one when less time is left of ``seconds`` than
    ``min_seconds_left`` or 1.5 times the longest row so far. Returns whether every danlu row
    ran."""
    deadline = time.monotonic() + seconds
    longest = 0.0
    bandwidth = measure_bandwidth(shape_set.numel, device)
    emit({"kind": "bandwidth", "numel": shape_set.numel, **bandwidth, "device": str(device)})
    ok = True
    for dtype in dtypes:
        ps = bench_params(shape_set, dtype, device)
        for algorithm, label, factory in implementations(device):
            if dtype != torch.float32 and label not in BF16_LABELS:
                continue
            row: dict[str, Any] = {
                "kind": "row",
                "algorithm": algorithm,
                "label": label,
                "dtype": str(dtype).replace("torch.", ""),
                "danlu": label.startswith("danlu."),
            }
            if time.monotonic() > deadline - max(min_seconds_left, 1.5 * longest):
                emit({**row, "kind": "skipped", "reason": "out of time"})
                ok = ok and not row["danlu"]
                continue
            began = time.monotonic()
            try:
                row.update(
                    bench_one(factory, ps, device, bandwidth["add"], warmup=warmup, reps=reps)
                )
                row["error"] = None
            except Exception as exc:  # a peer that fails is reported; a danlu row fails the run
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                ok = ok and not row["danlu"]
            emit(row)
            longest = max(longest, time.monotonic() - began)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            shown = row["error"] or f"{row['seconds'] * 1e3:8.2f} ms  {row['ratio']:5.2f}× floor"
            print(f"  {row['dtype']:<8} {label:<38} {shown}", file=sys.stderr, flush=True)
        del ps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", required=True, help="JSON lines are appended here")
    parser.add_argument("--seconds", type=float, default=100.0, help="time box")
    parser.add_argument("--shapes", default="llama1b", choices=sorted(gpu_kernels.SHAPE_SETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)

    def emit(record: dict[str, Any]) -> None:
        with open(args.records, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    shape_set = gpu_kernels.SHAPE_SETS[args.shapes]
    ok = run(shape_set, torch.device(args.device), seconds=args.seconds, emit=emit, reps=args.reps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

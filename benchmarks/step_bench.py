"""Optimizer step time against peers and the memory-bandwidth floor (DESIGN.md "Performance").

An optimizer step reads and writes every parameter, gradient and state tensor, so it is bound
by memory bandwidth. For each algorithm the floor is

    (bytes that must move per parameter) × (number of parameters) / (measured bandwidth)

with the bandwidth of an in-place add (read 2, write 1) measured in the same run. For every
danlu optimizer and every peer implementation of the same algorithm this reports the median
step time, its ratio to the floor, the optimizer-state bytes per parameter and the memory the
step allocates (CPU, from the profiler) — on a parameter set shaped like a ~50M-parameter
transformer in fp32.

    python benchmarks/step_bench.py            # full run → benchmarks/RESULTS.md
    python benchmarks/step_bench.py --quick    # small model, one run, printed only

The parent process runs workers under glibc's default allocator and under one that reuses freed
memory (first-touch page faults cost ~0.45 ms/MiB on the reference machine), two runs each,
since single timings vary by ±15 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REUSE_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def floor_bytes(algorithm: str) -> int:
    """Bytes per fp32 parameter that one step must read or write (the floor): read p, g and
    the state, write p and the state, with the state's bytes per parameter from the registry
    (``OptimizerInfo.state_bytes``, its default setting: "≈0" for AdaFactor's factored
    statistics and Amos's reduced slots, whose few numbers per row are left out). Lion and
    Tiger: 12 + 2·4 = 20; AdamW and AdaX: 12 + 2·8 = 28; AdaFactor (β1 = 0) and Amos: 12."""
    import danlu

    info = danlu.REGISTRY.get(algorithm)
    match = re.match(r"\s*≈?\s*(\d+(?:\.\d+)?)", info.state_bytes) if info else None
    state = float(match.group(1)) if match else 4.0
    return int(12 + 2 * state)


# Implementations that move fewer bytes than their algorithm's row above.
FLOOR_BYTES_BY_LABEL = {
    "danlu.Lion(state_dtype=bf16)": 16,  # the momentum is read and written as 2 bytes
    "danlu.Tiger(state_dtype=bf16)": 16,
}

# Hyper-parameters shared by every implementation of one algorithm (a registered optimizer
# missing here runs at its constructor's defaults).
SETTINGS: dict[str, dict[str, Any]] = {
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1},
    "tiger": {"lr": 1e-3, "beta": 0.965, "weight_decay": 0.01},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01},
    "adafactor": {"lr": 1e-3},
    "adax": {"lr": 1e-3},
    "amos": {"lr": 0.01},
}


@dataclass
class ParamSet:
    params: list[torch.Tensor]
    kinds: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def groups(self) -> list[dict[str, Any]]:
        """danlu-style groups tagged with their kind."""
        by_kind: dict[str, list[torch.Tensor]] = {}
        for p, kind in zip(self.params, self.kinds, strict=True):
            by_kind.setdefault(kind, []).append(p)
        return [{"params": ps, "kind": kind} for kind, ps in by_kind.items()]


def transformer_params(device: torch.device, quick: bool) -> ParamSet:
    """Shapes of a GPT-style model: vocab 32000, d 512, 12 layers (≈54M parameters)."""
    vocab, dim, layers = (8000, 256, 2) if quick else (32000, 512, 12)
    shapes: list[tuple[tuple[int, ...], str]] = [((vocab, dim), "embedding")]
    for _ in range(layers):
        shapes += [((dim,), "elementwise"), ((dim,), "elementwise")]  # norm gain, bias
        shapes += [((3 * dim, dim), "matrix"), ((3 * dim,), "elementwise")]
        shapes += [((dim, dim), "matrix"), ((dim,), "elementwise")]
        shapes += [((dim,), "elementwise"), ((dim,), "elementwise")]
        shapes += [((4 * dim, dim), "matrix"), ((4 * dim,), "elementwise")]
        shapes += [((dim, 4 * dim), "matrix"), ((dim,), "elementwise")]
    shapes += [((dim,), "elementwise"), ((dim,), "elementwise")]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params, kinds = [], []
    for shape, kind in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
        kinds.append(kind)
    return ParamSet(params, kinds)


# ---------------------------------------------------------------------------------------------
# Implementations: (algorithm, label, factory(ParamSet) -> optimizer)


def _danlu_impls() -> list[tuple[str, str, Callable[[ParamSet], torch.optim.Optimizer]]]:
    import inspect

    import danlu

    impls = []
    for name, info in sorted(danlu.REGISTRY.items()):
        settings = SETTINGS.get(name, {})
        accepts = inspect.signature(info.cls.__init__).parameters

        def make(ps: ParamSet, cls=info.cls, settings=settings, **extra: Any):
            return cls(ps.groups(), **settings, **extra)

        impls.append((name, f"danlu.{info.cls.__name__}", make))
        if "fused" in accepts:
            impls.append(
                (
                    name,
                    f"danlu.{info.cls.__name__}(fused=True)",
                    lambda ps, make=make: make(ps, fused=True),
                )
            )
        if "state_dtype" in accepts:
            impls.append(
                (
                    name,
                    f"danlu.{info.cls.__name__}(state_dtype=bf16)",
                    lambda ps, make=make: make(ps, state_dtype=torch.bfloat16),
                )
            )
    return impls


def _peer_impls(device: torch.device) -> list[tuple[str, str, Callable[[ParamSet], Any]]]:
    impls: list[tuple[str, str, Callable[[ParamSet], Any]]] = []
    adamw = SETTINGS["adamw"]
    impls.append(
        (
            "adamw",
            "torch AdamW (for-loop)",
            lambda ps: torch.optim.AdamW(ps.params, foreach=False, **adamw),
        )
    )
    impls.append(
        (
            "adamw",
            "torch AdamW (foreach)",
            lambda ps: torch.optim.AdamW(ps.params, foreach=True, **adamw),
        )
    )
    impls.append(
        (
            "adamw",
            "torch AdamW (fused)",
            lambda ps: torch.optim.AdamW(ps.params, fused=True, **adamw),
        )
    )
    if hasattr(torch.optim, "Adafactor"):
        impls.append(
            ("adafactor", "torch Adafactor", lambda ps: torch.optim.Adafactor(ps.params, lr=1e-3))
        )
    try:
        import lion_pytorch

        impls.append(
            ("lion", "lion-pytorch", lambda ps: lion_pytorch.Lion(ps.params, **SETTINGS["lion"]))
        )
        if device.type == "cuda":
            impls.append(
                (
                    "lion",
                    "lion-pytorch (triton)",
                    lambda ps: lion_pytorch.Lion(ps.params, use_triton=True, **SETTINGS["lion"]),
                )
            )
    except ImportError:
        pass
    try:
        import pytorch_optimizer as po

        impls.append(
            ("lion", "pytorch-optimizer Lion", lambda ps: po.Lion(ps.params, **SETTINGS["lion"]))
        )
        impls.append(
            (
                "tiger",
                "pytorch-optimizer Tiger",
                lambda ps: po.Tiger(ps.params, **SETTINGS["tiger"]),
            )
        )
        impls.append(
            (
                "adafactor",
                "pytorch-optimizer AdaFactor",
                lambda ps: po.AdaFactor(
                    ps.params, lr=1e-3, betas=(None, 0.999), relative_step=False
                ),
            )
        )
        impls.append(
            ("amos", "pytorch-optimizer Amos", lambda ps: po.Amos(ps.params, **SETTINGS["amos"]))
        )
    except ImportError:
        pass
    try:
        from transformers.optimization import Adafactor as HFAdafactor

        impls.append(
            (
                "adafactor",
                "transformers Adafactor",
                lambda ps: HFAdafactor(ps.params, lr=1e-3, relative_step=False, warmup_init=False),
            )
        )
    except ImportError:
        pass
    try:  # optional: timm's wheel pulls a torchvision that may not import beside CPU torch
        import timm.optim as timm_optim

        impls.append(
            ("lion", "timm Lion", lambda ps: timm_optim.Lion(ps.params, **SETTINGS["lion"]))
        )
        impls.append(
            ("adafactor", "timm Adafactor", lambda ps: timm_optim.Adafactor(ps.params, lr=1e-3))
        )
        impls.append(
            (
                "adafactor",
                "timm AdafactorBigVision",
                lambda ps: timm_optim.AdafactorBigVision(ps.params, lr=1e-3),
            )
        )
    except Exception:  # any import failure means "not available"
        pass
    return impls


# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(n: int, device: torch.device, reps: int = 9) -> float:
    """Bytes per second of ``a.add_(b)`` over n fp32 elements (read 2, write 1)."""
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        a.add_(b)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 12 * n / statistics.median(times[2:])


def state_bytes(opt: Any, numel: int) -> float:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total / numel


def allocated_per_step(opt: Any) -> float | None:
    """MiB allocated by the profiler-visible ops of one CPU step (temporaries included)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        return allocated / 2**20
    except Exception:  # the profiler is best-effort
        return None


def time_steps(opt: Any, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    ps = transformer_params(device, args.quick)
    bandwidth = measure_bandwidth(ps.numel, device)
    rows = []
    impls = _danlu_impls() + _peer_impls(device)
    for algorithm, label, factory in impls:
        if args.only and args.only.lower() not in label.lower():
            continue
        try:
            opt = factory(ps)
            seconds = time_steps(opt, device, warmup=args.warmup, reps=args.reps)
            mib = allocated_per_step(opt) if device.type == "cpu" and args.profile else None
            sbytes = state_bytes(opt, ps.numel)
            error = None
        except Exception as exc:  # a peer that fails is reported, not fatal
            seconds, mib, sbytes, error = float("nan"), None, float("nan"), repr(exc)[:120]
        floor = FLOOR_BYTES_BY_LABEL.get(label, floor_bytes(algorithm)) * ps.numel / bandwidth
        rows.append(
            {
                "algorithm": algorithm,
                "label": label,
                "seconds": seconds,
                "ratio": seconds / floor,
                "state_bytes": sbytes,
                "alloc_mib": mib,
                "error": error,
            }
        )
        print(
            f"  {label:<40} {seconds * 1e3:8.1f} ms  {seconds / floor:5.2f}× floor",
            file=sys.stderr,
            flush=True,
        )
        opt = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(device), "numel": ps.numel, "bandwidth": bandwidth, "rows": rows}


# ---------------------------------------------------------------------------------------------


def machine_description(device: str) -> str:
    import danlu

    parts = [
        platform.platform(),
        platform.processor() or platform.machine(),
        f"{os.cpu_count()} CPUs",
        f"torch {torch.__version__}",
        f"danlu {danlu.__version__}",
        f"torch threads {torch.get_num_threads()}",
    ]
    if device.startswith("cuda"):
        parts.append(torch.cuda.get_device_name())
    for mod in ("lion_pytorch", "pytorch_optimizer", "transformers", "timm"):
        try:
            from importlib.metadata import version

            parts.append(f"{mod} {version(mod.replace('_', '-'))}")
        except Exception:
            pass
    return ", ".join(parts)


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table: one row per implementation, one column pair per (allocator, run)."""
    runs = [(alloc, i, r) for alloc, rs in results.items() for i, r in enumerate(rs)]
    first = runs[0][2]
    header = ["algorithm", "implementation", "state B/param", "alloc MiB/step"]
    header += [f"{alloc} #{i + 1} ms (×floor)" for alloc, i, _ in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, row in enumerate(first["rows"]):
        alloc = "—" if row["alloc_mib"] is None else f"{row['alloc_mib']:.0f}"
        cells = [row["algorithm"], row["label"], f"{row['state_bytes']:.3g}", alloc]
        for _, _, r in runs:
            rr = r["rows"][k]
            cells.append(
                "error" if rr["error"] else f"{rr['seconds'] * 1e3:.1f} ({rr['ratio']:.2f}×)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    bw = ", ".join(f"{alloc} #{i + 1}: {r['bandwidth'] / 1e9:.1f} GB/s" for alloc, i, r in runs)
    errors = [f"- {row['label']}: {row['error']}" for row in first["rows"] if row["error"]]
    text = [
        f"Parameters: {first['numel'] / 1e6:.1f}M fp32 on {first['device']}. "
        f"Bandwidth (in-place add): {bw}.",
        "",
        "Floor = bytes that must move per parameter (Lion/Tiger 20, 16 with bf16 state, "
        "AdamW/AdaX 28, AdaFactor β1=0 and Amos 12) × parameters / bandwidth. Median of the "
        "timed steps after warm-up (compilation of `fused=True` happens in the warm-up).",
        "",
        *lines,
    ]
    if errors:
        text += ["", "Errors:", *errors]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small model, one run")
    parser.add_argument("--runs", type=int, default=2, help="runs per allocator")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", default="", help="only implementations whose label has this")
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the per-step allocation measurement",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    allocators = {"default": None} if args.quick else {"default": None, "reuse": REUSE_ALLOCATOR}
    runs = 1 if args.quick else args.runs
    results: dict[str, list[dict[str, Any]]] = {}
    passthrough = [
        f"--device={args.device}",
        f"--warmup={args.warmup}",
        f"--reps={args.reps}",
        f"--only={args.only}",
    ]
    passthrough += ["--quick"] if args.quick else []
    passthrough += [] if args.profile else ["--no-profile"]
    for name, tunables in allocators.items():
        for i in range(runs):
            print(f"[{name} allocator, run {i + 1}/{runs}]", file=sys.stderr, flush=True)
            env = dict(os.environ)
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            out = subprocess.run(
                [sys.executable, __file__, "--worker", *passthrough],
                env=env,
                check=True,
                capture_output=False,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
            results.setdefault(name, []).append(json.loads(out.strip().splitlines()[-1]))
    device = results["default"][0]["device"]
    report = "\n".join(
        [
            "# Optimizer step benchmark",
            "",
            f"Machine: {machine_description(device)}.",
            "",
            "Generated by `make bench` (`python benchmarks/step_bench.py`).",
            "",
            render(results),
            "",
        ]
    )
    print(report)
    if not args.quick:
        args.out.write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

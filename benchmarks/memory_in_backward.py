"""Peak memory of one training step of a ~50M-parameter transformer: AdamW, Tiger, and Tiger
stepping inside backward (``danlu.step_in_backward``), DESIGN.md "Performance", issue 5 item 3.

    python benchmarks/memory_in_backward.py            # CPU, and CUDA when available
    python benchmarks/memory_in_backward.py --quick    # a ~5M-parameter model

Method.

* **CPU**: each configuration runs in a fresh Python process so that allocator state does not
  carry over. The process sets ``MALLOC_MMAP_THRESHOLD_`` (glibc) to 128 KiB, which turns off
  glibc's adaptive threshold: every tensor above 128 KiB gets its own mapping and is returned
  to the OS when freed, so the resident set size (RSS) follows live tensor memory. The worker
  builds the model and the optimizer, runs one warm-up training step (which creates the
  optimizer state), then records its RSS *between* steps (parameters + optimizer state +
  whatever a step leaves behind) and the peak RSS *during* the second step, sampled by a
  background thread every 0.2 ms and cross-checked with the kernel's high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step where the kernel allows
  it). Before the baseline RSS is read, a throwaway copy of the model runs forward, backward
  and both optimizers once, so that library code and caches mapped on first use are in the
  baseline. The table shows, above that baseline: the step's peak, the memory between steps
  (parameters + optimizer state), and their difference (what the step itself adds: gradients,
  activations, temporaries).
* **CUDA**: ``torch.cuda.max_memory_allocated`` over the second step (after
  ``reset_peak_memory_stats``), and ``memory_allocated`` between steps.

A training step here is ``zero_grad(); loss.backward(); step()`` on a batch of 4 × 64 tokens
(small on purpose: the activations are then a small part of the peak and the differences
between optimizers show). Expected, per fp32 parameter: AdamW keeps the gradients (4 B) and
two moments (8 B); Tiger the gradients and one momentum (8 B in all); Tiger inside backward one
momentum (4 B) and only the gradients in flight.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

CONFIGS = ("adamw", "tiger", "tiger-in-backward")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Polls RSS in a thread: the peak between start() and stop()."""

    def __init__(self, interval: float = 2e-4) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _Sampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def build_model(quick: bool):
    import torch
    from torch import nn

    vocab, dim, layers = (8000, 256, 2) if quick else (32000, 512, 6)

    class SmallLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(64, dim)
            layer = nn.TransformerEncoderLayer(
                dim, nhead=8, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                norm_first=True,
            )  # fmt: skip
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            n = tokens.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(n)
            h = self.embed(tokens) + self.pos(torch.arange(n))
            return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))

    return SmallLM(), vocab


def worker(config: str, quick: bool, device: str) -> dict[str, float]:
    import torch
    from torch import nn

    import danlu

    # Load every code path once on a throwaway model (libraries map their code and caches on
    # first use), so that the baseline holds the runtime and none of the measured tensors.
    torch.manual_seed(0)
    scratch, _ = build_model(quick=True)
    scratch_opt = torch.optim.AdamW(scratch.parameters(), foreach=False)
    scratch_tokens = torch.randint(0, 100, (1, 9))
    scratch(scratch_tokens).float().sum().backward()
    scratch_opt.step()
    danlu.Tiger(scratch.parameters()).step()
    del scratch, scratch_opt, scratch_tokens
    gc.collect()
    baseline = _rss_bytes()
    torch.manual_seed(0)
    model, vocab = build_model(quick)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    groups = danlu.param_groups(model, weight_decay=0.01)
    if config == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-4)
    else:
        opt = danlu.Tiger(groups, lr=1e-3)
        if config == "tiger-in-backward":
            opt = danlu.step_in_backward(opt)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (4, 65), generator=gen).to(device)

    def training_step() -> None:
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    cuda = device == "cuda"
    params_only = torch.cuda.memory_allocated() if cuda else _rss_bytes() - baseline
    training_step()  # creates the optimizer state
    opt.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        between = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        training_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        hwm = None
    else:
        between = _rss_bytes() - baseline
        hwm_ok = _reset_hwm()
        with _Sampler() as sampler:
            start = time.perf_counter()
            training_step()
            seconds = time.perf_counter() - start
        peak = sampler.peak - baseline
        hwm = (_hwm_bytes() or 0) - baseline if hwm_ok else None
        if hwm is not None:
            peak = max(peak, hwm)
    grads_left = sum(p.grad is not None for p in model.parameters())
    return {
        "params": n_params,
        "params_mb": params_only / 2**20,
        "between_mb": between / 2**20,
        "peak_mb": peak / 2**20,
        "hwm_checked": hwm is not None,
        "seconds": seconds,
        "grads_left": grads_left,
    }


def run(config: str, quick: bool, device: str) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    args = [sys.executable, __file__, "--worker", config, "--device", device]
    if quick:
        args.append("--quick")
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~5M-parameter model")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.device or "cpu")))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        results = {c: run(c, args.quick, device) for c in CONFIGS}
        n = results["adamw"]["params"]
        params_mb = n * 4 / 2**20
        method = (
            "torch.cuda.max_memory_allocated"
            if device == "cuda"
            else "peak RSS growth (fresh process each, sampled + VmHWM)"
        )
        print(f"\n{device}: {n / 1e6:.1f}M parameters ({params_mb:.0f} MiB fp32); {method}")
        print(
            f"{'configuration':<20} {'peak MiB':>9} {'between steps':>14} {'step adds':>10} "
            f"{'grads kept':>11} {'step s':>7}"
        )
        for config, r in results.items():
            print(
                f"{config:<20} {r['peak_mb']:>9.0f} {r['between_mb']:>14.0f} "
                f"{r['peak_mb'] - r['between_mb']:>10.0f} {r['grads_left']:>11d} "
                f"{r['seconds']:>7.2f}"
            )
        print(
            f"expected between steps (params + state): AdamW {3 * params_mb:.0f}, Tiger and Tiger "
            f"inside backward {2 * params_mb:.0f} MiB; the step adds all gradients "
            f"({params_mb:.0f} MiB) except inside backward, plus activations and temporaries"
        )


if __name__ == "__main__":
    main()

"""Optimizer step time under FSDP2 (DTensor parameters) and DDP, 2 processes, gloo on CPU.

For each danlu optimizer, and torch.optim.AdamW as the peer in the same run, the median time
of ``opt.step()`` (the gradients are computed once and kept) on a transformer-shaped parameter
set, under DDP (each rank steps every parameter, plain tensors: danlu's fast paths) and under
FSDP2 (each rank steps half of every tensor: danlu's DTensor path, with collectives for the
whole-tensor statistics). Ratios are against torch.optim.AdamW in the same layout.

    python benchmarks/distributed_step.py            # ~9M parameters
    python benchmarks/distributed_step.py --quick    # ~1M parameters
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import danlu

# Hyper-parameters per registered optimizer (one missing here runs at its defaults).
SETTINGS = {
    "lion": {"lr": 1e-4, "weight_decay": 0.1},
    "tiger": {"lr": 1e-3, "weight_decay": 0.01},
    "adamw": {"lr": 1e-3, "weight_decay": 0.01},
    "adafactor": {"lr": 1e-3},
    "adax": {"lr": 1e-3},
    "amos": {"lr": 0.01},
}


class Block(nn.Module):
    """The parameter shapes of a transformer block (attention replaced by a slice of qkv)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(q * k.sigmoid() + v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def make_model(dim: int, layers: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(vocab, dim), *[Block(dim) for _ in range(layers)], nn.Linear(dim, vocab)
    )


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "torch.AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return danlu.create_optimizer(name, model, **SETTINGS.get(name, {}))


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for layout in ("ddp", "fsdp2"):
        others = [n for n in sorted(danlu.REGISTRY) if n not in SETTINGS]
        for name in ["torch.AdamW", *SETTINGS, *others]:
            model = make_model(args.dim, args.layers, args.vocab)
            if layout == "fsdp2":
                for module in model:
                    if any(True for _ in module.parameters()):
                        fully_shard(module, mesh=mesh)
                fully_shard(model, mesh=mesh)
            else:
                model = nn.parallel.DistributedDataParallel(model)
            opt = build(name, model)
            tokens = torch.randint(0, args.vocab, (4, 16))
            model(tokens).square().mean().backward()
            times = []
            for _ in range(args.repeats + 1):
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                dist.barrier()
                times.append(time.perf_counter() - start)
            rows.append((layout, name, statistics.median(times[1:])))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.dim, args.layers, args.vocab = (128, 2, 2000) if args.quick else (256, 8, 8000)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(
            worker,
            args=(2, os.path.join(tmp, "init"), args, out),
            nprocs=2,
            start_method="spawn",
        )
        rows = torch.load(out)
    count = sum(p.numel() for p in make_model(args.dim, args.layers, args.vocab).parameters())
    peer = {layout: t for layout, name, t in rows if name == "torch.AdamW"}
    print(f"{count / 1e6:.1f}M parameters, 2 ranks (gloo, CPU, 1 thread each), ", end="")
    print(f"median of {args.repeats} steps")
    header = ("optimizer", "DDP ms", "/AdamW", "FSDP2 ms", "/AdamW", "FSDP2/DDP")
    print(f"{header[0]:<12} {header[1]:>8} {header[2]:>7} {header[3]:>9} {header[4]:>7}", end="")
    print(f" {header[5]:>10}")
    by_name: dict[str, dict[str, float]] = {}
    for layout, name, t in rows:
        by_name.setdefault(name, {})[layout] = t
    for name, t in by_name.items():
        print(
            f"{name:<12} {1e3 * t['ddp']:8.2f} {t['ddp'] / peer['ddp']:7.2f} "
            f"{1e3 * t['fsdp2']:9.2f} {t['fsdp2'] / peer['fsdp2']:7.2f} "
            f"{t['fsdp2'] / t['ddp']:10.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())

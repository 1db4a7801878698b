"""``charlm``: a small causal transformer on text already on the disk (by default the Python
standard library's own source files), validation bits per character."""

from __future__ import annotations

import glob
import math
import os
import sysconfig
from collections.abc import Iterator

import torch
from torch import nn

from danlu.cli.common import Baseline, Context, TaskResult
from danlu.cli.tasks._loop import compare_optimizers

NAME = "charlm"
DESCRIPTION = "byte-level causal transformer on Python's stdlib source; validation bits/char"
MAX_BYTES = 2_000_000


def stdlib_text(max_bytes: int = MAX_BYTES) -> bytes:
    """The standard library's top-level ``*.py`` files in sorted order, up to ``max_bytes``."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"".join(chunks)[:max_bytes]
    if len(text) < 10_000:
        raise RuntimeError("could not find enough standard-library source text on this machine")
    return text


def read_text(path: str, max_bytes: int = MAX_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(max_bytes)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    """A pre-norm GPT: byte embeddings + learned positions, causal self-attention blocks."""

    mask: torch.Tensor

    def __init__(self, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x, self.mask[:t, :t])
        return self.head(self.norm(x))


def windows(
    data: torch.Tensor, context: int, batch: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def run(ctx: Context) -> TaskResult:
    text = read_text(ctx.text) if ctx.text else stdlib_text()
    data = torch.tensor(list(text), dtype=torch.long)
    cut = int(0.9 * len(data))
    train_data, val_data = data[:cut], data[cut:]
    dim, layers, heads, context, batch = (64, 2, 4, 64, 16) if ctx.quick else (96, 2, 4, 64, 16)
    steps = ctx.steps or (60 if ctx.quick else 400)
    base = Baseline(
        lr=3e-3, weight_decay=0.1, batches_per_epoch=max(len(train_data) // (context * batch), 1)
    )
    val_gen = torch.Generator().manual_seed(ctx.seed + 1)
    val_batches = [
        next(windows(val_data, context, 32, val_gen)) for _ in range(4 if ctx.quick else 8)
    ]
    val_batches = [(x.to(ctx.device), y.to(ctx.device)) for x, y in val_batches]

    def bits_per_char(model: nn.Module) -> float:
        losses = [lm_loss(model, x, y).item() for x, y in val_batches]
        return sum(losses) / len(losses) / math.log(2)

    def device_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in windows(train_data, context, batch, torch.Generator().manual_seed(seed)):
            yield x.to(ctx.device), y.to(ctx.device)

    runs = compare_optimizers(
        ctx,
        task=NAME,
        base=base,
        make_model=lambda: CharLM(dim, layers, heads, context).to(ctx.device),
        batches=lambda: device_batches(ctx.seed),
        loss_fn=lm_loss,
        evaluate=bits_per_char,
        steps=steps,
    )
    return TaskResult(
        name=NAME,
        description=DESCRIPTION,
        metric="validation bits/char",
        higher_is_better=False,
        runs=runs,
        settings={
            "steps": steps,
            "batch": batch,
            "context": context,
            "dim": dim,
            "layers": layers,
            "text_bytes": len(text),
            "text": ctx.text or "Python standard library (*.py)",
            "adamw_baseline": {"lr": base.lr, "weight_decay": base.weight_decay},
        },
    )

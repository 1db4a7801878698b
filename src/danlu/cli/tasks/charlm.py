"""``charlm``: a small causal transformer on text already on the disk (by default the Python
standard library's own source files), validation bits per character.

The model is large enough for AdaFactor to factor its matrices as the blog describes (every
matrix but the position table has both dimensions ≥ 128, AdaFactor's default threshold), so its
optimizer-state column shows the n + m saving."""

from __future__ import annotations

import functools
import glob
import math
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from danlu.cli.common import Baseline, Context, RunResult, RunSpec, make_optimizer
from danlu.cli.sweep import Report, SweepTask
from danlu.cli.tasks._loop import factored_state, train

NAME = "charlm"
DESCRIPTION = (
    "byte-level causal transformer (width 128, 2 layers; --quick: 64) on Python's stdlib "
    "source; validation bits/char"
)
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
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    """A pre-norm GPT: byte embeddings + learned positions, causal self-attention blocks."""

    mask: torch.Tensor

    def __init__(self, dim: int, layers: int, heads: int, context: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(layers))
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


#: (dim, layers, heads, context, batch, mlp ratio, steps, eval every, validation batches of 32)
CONFIG = {"dim": 128, "layers": 2, "heads": 4, "context": 64, "batch": 16, "mlp_ratio": 2}
QUICK_CONFIG = {"dim": 64, "layers": 2, "heads": 4, "context": 64, "batch": 16, "mlp_ratio": 2}
STEPS, QUICK_STEPS = 400, 60
EVAL_EVERY, QUICK_EVAL_EVERY = 50, 20
VAL_BATCHES, QUICK_VAL_BATCHES = 8, 4
#: seconds per training step and per evaluation on one core (measured; for the ETA)
STEP_SECONDS, QUICK_STEP_SECONDS, EVAL_SECONDS = 0.048, 0.012, 0.25


@functools.lru_cache(maxsize=2)
def load_data(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) bytes as int64 tensors: the first 90 % and the last 10 %."""
    text = read_text(path) if path else stdlib_text()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


class CharLMTask(SweepTask):
    name = NAME
    description = DESCRIPTION
    metric = "validation bits/char"
    higher_is_better = False
    # The centres of the lr grids and Tiger's β of 0.9 here: each optimizer's registration
    # (CompareSettings.centres, grid_overrides), from a wider sweep (×¼ … ×4,
    # benchmarks/compare_centres.py; docs/compare.md has its table).
    timing_steps = 35
    tolerance = 0.1  # bits/char

    def config(self, quick: bool) -> dict[str, int]:
        return QUICK_CONFIG if quick else CONFIG

    def baseline(self, ctx: Context) -> Baseline:
        train_data, _ = load_data(ctx.text)
        cfg = self.config(ctx.quick)
        return Baseline(
            lr=3e-3,
            weight_decay=0.1,
            batches_per_epoch=max(len(train_data) // (cfg["context"] * cfg["batch"]), 1),
        )

    def steps(self, ctx: Context) -> int:
        return ctx.steps or (QUICK_STEPS if ctx.quick else STEPS)

    def run_cost(self, ctx: Context, steps: int, timing: bool = False) -> float:
        per_step = QUICK_STEP_SECONDS if ctx.quick else STEP_SECONDS
        every = QUICK_EVAL_EVERY if ctx.quick else EVAL_EVERY
        evals = 0 if timing else steps // every + 1
        return steps * per_step + evals * EVAL_SECONDS * (0.5 if ctx.quick else 1.0)

    def settings(self, ctx: Context) -> dict[str, Any]:
        train_data, val_data = load_data(ctx.text)
        return {
            **self.config(ctx.quick),
            "eval_every": QUICK_EVAL_EVERY if ctx.quick else EVAL_EVERY,
            "validation_chars": (QUICK_VAL_BATCHES if ctx.quick else VAL_BATCHES) * 32 * 64,
            "text_bytes": len(train_data) + len(val_data),
            "text": ctx.text or "Python standard library (*.py)",
        }

    def train(self, spec: RunSpec, report: Report) -> RunResult:
        device = torch.device(spec.device)
        train_data, val_data = load_data(spec.text)
        cfg = self.config(spec.quick)
        context, batch = cfg["context"], cfg["batch"]
        val_gen = torch.Generator().manual_seed(spec.seed + 1)
        val_batches = [
            next(windows(val_data, context, 32, val_gen))
            for _ in range(QUICK_VAL_BATCHES if spec.quick else VAL_BATCHES)
        ]
        val_batches = [(x.to(device), y.to(device)) for x, y in val_batches]

        def bits_per_char() -> float:
            losses = [lm_loss(model, x, y).item() for x, y in val_batches]
            return sum(losses) / len(losses) / math.log(2)

        def device_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            gen = torch.Generator().manual_seed(spec.seed)
            for x, y in windows(train_data, context, batch, gen):
                yield x.to(device), y.to(device)

        torch.manual_seed(spec.seed)
        model = CharLM(cfg["dim"], cfg["layers"], cfg["heads"], context, cfg["mlp_ratio"]).to(
            device
        )
        opt = make_optimizer(spec.optimizer, model, spec.hparams)
        result = train(
            spec,
            model=model,
            opt=opt,
            batches=device_batches(),
            loss_fn=lm_loss,
            evaluate=bits_per_char,
            eval_every=QUICK_EVAL_EVERY if spec.quick else EVAL_EVERY,
            report=report,
            device=device,
        )
        result.extra["state"] = factored_state(opt, model)
        result.extra["params"] = sum(p.numel() for p in model.parameters())
        return result


TASK = CharLMTask()

"""Fine-tuning a small char-level causal transformer: full, LoRA, LoRA-GA, LoRA-GA + LoRA-Pro.

Blog: kexue.fm/archives/10226 (LoRA-GA) and 10266 (LoRA-Pro); docs: lora.md. A model is
pretrained on the first part of a text, then fine-tuned on the second part with each method
for the same number of steps, on the same batches; the table gives the validation bits per
character on held-out text of the second part and the number of trainable parameters.

The default text is a slice of the Python standard library read from disk: Python code
(``json``, ``collections``, ``argparse``, ...) for pretraining and the prose of
``pydoc_data/topics.py`` (the language reference's topic help) for fine-tuning, so the
fine-tuning task is a real shift of distribution.

``run(text, steps, seed, device)`` returns a dict; ``danlu compare --task lora`` shows it next
to the other tasks and ``python benchmarks/lora_finetune.py`` prints the table.
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import danlu

PRETRAIN_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
    "argparse.py",
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "functools.py",
    "dataclasses.py",
)
FINETUNE_FILE = "pydoc_data/topics.py"

CONTEXT = 64
BATCH = 32
WIDTH = 64
LAYERS = 2
HEADS = 4
RANK = 4
ALPHA = 8.0
LORA_TARGETS = r"blocks\.\d+\.(q|k|v|o|fc1|fc2)"


def default_text(chars_per_part: int = 150_000) -> str:
    """Python code, then the language reference's topic help, ``chars_per_part`` each."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join((stdlib / name).read_text(encoding="utf-8") for name in PRETRAIN_FILES)
    prose = (stdlib / FINETUNE_FILE).read_text(encoding="utf-8")
    if len(code) < chars_per_part or len(prose) < chars_per_part:
        raise RuntimeError("the standard library files are shorter than expected")
    return code[:chars_per_part] + prose[:chars_per_part]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h = self.norm1(x)
        q, k, v = (
            f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def encode(text: str) -> tuple[Tensor, int]:
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), len(chars)


def sample_batch(data: Tensor, gen: torch.Generator, device: str) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=gen)
    window = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()]).to(device)
    return window[:, :-1], window[:, 1:]


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def bits_per_char(model: nn.Module, data: Tensor, device: str, max_windows: int = 256) -> float:
    """Mean next-character cross-entropy in bits over consecutive windows of ``data``."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // CONTEXT)
    windows = data[: n * CONTEXT + 1]
    x = windows[:-1].view(n, CONTEXT).to(device)
    y = windows[1:].view(n, CONTEXT).to(device)
    total = sum(
        F.cross_entropy(
            model(x[i : i + 64]).flatten(0, 1), y[i : i + 64].flatten(), reduction="sum"
        )
        for i in range(0, n, 64)
    )
    model.train()
    return float(total) / (n * CONTEXT) / math.log(2)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    steps: int,
    seed: int,
    device: str,
    evaluate: dict[int, Any] | None = None,
) -> dict[int, float]:
    """``steps`` AdamW-style steps on random windows of ``data``; ``evaluate`` maps step
    numbers to a callable(model) -> float run after that step. Returns {step: value}."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    curve = {}
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, sample_batch(data, gen, device)).backward()
        optimizer.step()
        if evaluate and step in evaluate:
            curve[step] = evaluate[step](model)
    return curve


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(
    text: str | None = None,
    steps: int = 200,
    seed: int = 0,
    device: str = "cpu",
    *,
    pretrain_steps: int | None = None,
    lr_full: float = 1e-3,
    lr_lora: float = 1e-2,
    ga_batches: int = 8,
) -> dict[str, Any]:
    """Pretrain on the first half of ``text``, fine-tune on the second half with each method
    for ``steps`` steps (same batches), and evaluate on the last tenth of the second half
    after 5%, 25%, 50% and 100% of the steps (LoRA-GA's claim is faster early progress).

    Returns ``{"task": "lora", "baseline_val_bpc": ..., "rows": [{"method", "trainable_params",
    "val_bpc", "curve": {step: bpc}, "seconds"}, ...], "config": {...}}``. ``pretrain_steps``
    defaults to 2·steps. The learning rates (AdamW; LoRAPro's inner AdamW) were picked on
    seed 0 from {2e-3, 1e-2, 3e-2} for the LoRA methods, the same for all three.
    """
    text = default_text() if text is None else text
    data, vocab = encode(text)
    half = len(data) // 2
    pretrain_data, finetune = data[:half], data[half:]
    split = int(len(finetune) * 0.9)
    ft_train, ft_val = finetune[:split], finetune[split:]
    pretrain_steps = 2 * steps if pretrain_steps is None else pretrain_steps

    torch.manual_seed(seed)
    base = CharLM(vocab).to(device)
    started = time.perf_counter()
    train(
        base,
        torch.optim.AdamW(base.parameters(), lr=3e-3),
        pretrain_data,
        pretrain_steps,
        seed,
        device,
    )
    pretrain_seconds = time.perf_counter() - started
    baseline = bits_per_char(base, ft_val, device)

    def lora_model(seed_offset: int) -> nn.Module:
        torch.manual_seed(seed + seed_offset)
        model = _copy(base)
        danlu.lora.inject(model, target=LORA_TARGETS, rank=RANK, alpha=ALPHA)
        return model

    def ga_batch_list() -> list[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed + 1000)
        return [sample_batch(ft_train, gen, device) for _ in range(ga_batches)]

    rows = []
    methods = ["full fine-tuning", "LoRA", "LoRA-GA", "LoRA-GA + LoRA-Pro"]
    for method in methods:
        started = time.perf_counter()
        if method == "full fine-tuning":
            model = _copy(base)
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr_full)
        else:
            model = lora_model(1)
            if method != "LoRA":
                danlu.lora.lora_ga_init_(model, ga_batch_list(), lm_loss, seed=seed)
            params = [p for p in model.parameters() if p.requires_grad]
            if method == "LoRA-GA + LoRA-Pro":
                optimizer = danlu.lora.LoRAPro(model, lr=lr_lora)
            else:
                optimizer = torch.optim.AdamW(params, lr=lr_lora)
        count = trainable(model)
        checkpoints = sorted({max(1, k) for k in (steps // 20, steps // 4, steps // 2, steps)})
        curve = train(
            model,
            optimizer,
            ft_train,
            steps,
            seed + 1,
            device,
            evaluate={k: lambda m: bits_per_char(m, ft_val, device) for k in checkpoints},
        )
        rows.append(
            {
                "method": method,
                "trainable_params": count,
                "val_bpc": curve[steps],
                "curve": curve,
                "seconds": time.perf_counter() - started,
            }
        )
    return {
        "task": "lora",
        "baseline_val_bpc": baseline,
        "rows": rows,
        "config": {
            "steps": steps,
            "pretrain_steps": pretrain_steps,
            "pretrain_seconds": pretrain_seconds,
            "seed": seed,
            "device": device,
            "chars": len(text),
            "vocab": vocab,
            "context": CONTEXT,
            "batch": BATCH,
            "width": WIDTH,
            "layers": LAYERS,
            "rank": RANK,
            "alpha": ALPHA,
            "lr_full": lr_full,
            "lr_lora": lr_lora,
            "ga_batches": ga_batches,
            "total_params": sum(p.numel() for p in base.parameters()),
        },
    }


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"LoRA fine-tuning, {cfg['steps']} steps each (pretrained {cfg['pretrain_steps']} steps; "
        f"{cfg['total_params']:,} parameters; rank {cfg['rank']}, alpha {cfg['alpha']:g}; "
        f"seed {cfg['seed']}, {cfg['device']})",
        f"validation bits/char before fine-tuning: {result['baseline_val_bpc']:.4f}",
        "",
    ]
    steps = sorted(result["rows"][0]["curve"])
    header = f"{'method':<22}{'trainable params':>18}"
    header += "".join(f"{'bpc @' + str(k):>13}" for k in steps) + f"{'seconds':>10}"
    lines.append(header)
    for row in result["rows"]:
        line = f"{row['method']:<22}{row['trainable_params']:>18,}"
        line += "".join(f"{row['curve'][k]:>13.4f}" for k in steps)
        lines.append(line + f"{row['seconds']:>10.1f}")
    lines.append("")
    lines.append("bpc @N: validation bits per character after N fine-tuning steps.")
    return "\n".join(lines)

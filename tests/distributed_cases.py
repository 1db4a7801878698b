"""Models, data and optimizer settings shared by the 2-process tests (tests/test_distributed.py)
and their worker (tests/distributed_worker.py), so that both build exactly the same runs.

Kept free of pytest so that spawned processes import only torch and danlu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import danlu

VOCAB, DIM, HEADS, FF, SEQ = 33, 16, 2, 24, 6
BATCH = 8  # sequences per step, split evenly over the ranks
WORLD = 2

#: Per optimizer: keyword arguments of ``danlu.create_optimizer`` for the small transformer.
#: AdaFactor factors every matrix (min_dim_size_to_factor=4) and keeps a momentum; Amos keeps a
#: momentum and per-output slots; Tiger's groups tag the embedding (row-wise RMS).
OPTIMIZERS: dict[str, dict] = {
    "lion": {"lr": 3e-3, "weight_decay": 0.1},
    "tiger": {"lr": 2e-2, "weight_decay": 0.01},
    "adamw": {"lr": 1e-2, "weight_decay": 0.01},
    "adafactor": {"lr": 2e-2, "beta1": 0.9, "min_dim_size_to_factor": 4, "weight_decay": 0.01},
    "adax": {"lr": 1e-2, "weight_decay": 0.01},
    "amos": {"lr": 0.05, "momentum": 0.5},
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)  # a key bias has a zero gradient
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, FF)
        self.fc2 = nn.Linear(FF, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, DIM))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A 2-block causal transformer whose parameters cover every sharding case on 2 ranks: an
    odd-sized vocabulary (uneven shards), a (1, DIM) parameter (one rank holds no row), norm
    gains, biases and matrices of both orientations."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, DIM))
        self.start = nn.Parameter(0.1 * torch.randn(1, DIM))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = torch.cat([self.start.expand(x.shape[0], 1, DIM), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    """``steps`` batches of BATCH token sequences (the full batch of each step)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen) for _ in range(steps)]


def shard(batch: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_optimizer(name: str, model: nn.Module, **overrides) -> torch.optim.Optimizer:
    return danlu.create_optimizer(name, model, **{**OPTIMIZERS[name], **overrides})


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> None:
    for tokens in data:
        opt.zero_grad()
        loss_fn(model, tokens).backward()
        opt.step()


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameter values by name (DTensors gathered; DDP's ``module.`` prefix removed)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("module.", "")] = value.detach().clone()
    return out


def single_process_run(name: str, steps: int, **overrides) -> dict[str, torch.Tensor]:
    """The reference: one process, the full batch of every step."""
    model = make_model()
    opt = make_optimizer(name, model, **overrides)
    train(model, opt, batches(steps))
    return parameters(model)

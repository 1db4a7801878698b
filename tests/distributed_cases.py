"""Models, data and optimizer settings shared by the 2-process tests (tests/test_distributed.py)
and their worker (tests/distributed_worker.py), so that both build exactly the same runs.

Kept free of pytest so that spawned processes import only torch and danlu.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from optimizer_cases import CASES
from torch import nn

import danlu

VOCAB, DIM, HEADS, FF, SEQ = 33, 16, 2, 24, 6
BATCH = 8  # sequences per step, split evenly over the ranks
WORLD = 2

#: Settings tuned for the small transformer, per optimizer: keyword arguments of
#: ``danlu.create_optimizer``.
#: AdaFactor factors every matrix (min_dim_size_to_factor=4) and keeps a momentum; Amos keeps a
#: momentum and per-output slots; Tiger's groups tag the embedding (row-wise RMS).
_TUNED: dict[str, dict] = {
    "lion": {"lr": 3e-3, "weight_decay": 0.1},
    "tiger": {"lr": 2e-2, "weight_decay": 0.01},
    "adamw": {"lr": 1e-2, "weight_decay": 0.01},
    "adafactor": {"lr": 2e-2, "beta1": 0.9, "min_dim_size_to_factor": 4, "weight_decay": 0.01},
    "adax": {"lr": 1e-2, "weight_decay": 0.01},
    "amos": {"lr": 0.05, "momentum": 0.5},
}

#: Every registered optimizer; one without tuned settings runs with its conformance settings
#: (tests/optimizer_cases.py), so a new optimizer is covered without an entry here.
OPTIMIZERS: dict[str, dict] = {
    name: _TUNED.get(name, CASES[name]["kwargs"]) for name in sorted(danlu.REGISTRY)
}


def takes_state_dtype(name: str) -> bool:
    """Whether the optimizer keeps its state in a dtype of the user's choice (``state_dtype``)."""
    return "state_dtype" in inspect.signature(danlu.REGISTRY[name].cls).parameters


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


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[torch.Tensor],
    *,
    micro: int = 1,
    after_backward=None,
    loss_factor=None,
) -> None:
    """One ``opt.step()`` per micro-batch: each batch of ``data`` is split into ``micro`` equal
    micro-batches. ``after_backward(step, model)`` runs between backward and step (to inject a
    non-finite gradient); ``loss_factor(step)`` multiplies the loss."""
    step = 0
    for tokens in data:
        for piece in tokens.chunk(micro):
            opt.zero_grad()
            loss = loss_fn(model, piece)
            if loss_factor is not None:
                loss = loss * loss_factor(step)
            loss.backward()
            if after_backward is not None:
                after_backward(step, model)
            opt.step()
            step += 1


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


def reference_run(
    name: str,
    steps: int,
    *,
    wrap=None,
    micro: int = 1,
    after_backward=None,
    loss_factor=None,
    model=None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """A single-process run on the full batch with optional wrapper ``wrap(opt)``."""
    model = make_model() if model is None else model
    opt = make_optimizer(name, model, **overrides)
    if wrap is not None:
        opt = wrap(opt)
    train(
        model,
        opt,
        batches(steps),
        micro=micro,
        after_backward=after_backward,
        loss_factor=loss_factor,
    )
    return parameters(model)


def make_lora_model(seed: int = 0) -> nn.Module:
    """The transformer with rank-3 LoRA adapters on every block Linear, both factors random
    and of full rank (LoRA-Pro needs that; LoRA-GA would give it), and a trainable head."""
    model = make_model(seed)
    danlu.lora.inject(model, target=["qkv", "proj", "fc1", "fc2"], rank=3, alpha=6.0)
    model.head.weight.requires_grad_(True)  # a plain trainable tensor beside the adapters
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for adapter in danlu.lora.find_lora_adapters(model):
            lora_B = adapter.lora_B
            lora_B.copy_(0.1 * torch.randn(lora_B.shape, generator=gen))
    return model


def nonfinite_at(name: str, index: tuple[int, ...], step: int):
    """``after_backward`` that writes NaN into ``grad[index]`` of parameter ``name`` at
    micro-step ``step`` (index into the local slice for a DTensor)."""

    def inject(current: int, model: nn.Module) -> None:
        if current != step:
            return
        for pname, p in model.named_parameters():
            if pname.replace("module.", "") == name:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                grad[index] = float("nan")

    return inject

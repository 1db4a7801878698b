"""A small two-adapter LoRALinear model and its batches, shared by the LoRA-Pro tests."""

import torch
from torch import nn

from danlu.lora import LoRALinear


def two_adapter_model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Two LoRALinear layers (ranks 2 and 3) with non-zero B, the same weights on every call."""
    torch.manual_seed(1)
    model = nn.Sequential(
        LoRALinear(nn.Linear(6, 8, dtype=dtype), 2, alpha=4),
        nn.Tanh(),
        LoRALinear(nn.Linear(8, 5, dtype=dtype), 3, alpha=3),
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.5)
    return model


def batch(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (10×6) and targets (10×5) for :func:`two_adapter_model`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=gen, dtype=dtype)
    return x, torch.randn(10, 5, generator=gen, dtype=dtype)

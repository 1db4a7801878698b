"""Modules and initialisers for tied input/output embeddings
(docs/reference/algorithms.md#embedding-drift-fixes item 2 and #initialisation; kexue 9698)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["HalfSwap", "init_tied_embedding_", "tied_embedding_std"]


class HalfSwap(nn.Module):
    """Swap the two halves of the last (channel) dimension: S[w] = w[h:] ‖ w[:h], h = d // 2.

    Put it after the final norm and before the product with the tied embedding table,
    ``logits = HalfSwap()(h) @ embedding.weight.T``: the blog's fix for the high initial loss of
    tied embeddings (the hidden state of token i no longer lines up with its own output row), which
    in its experiments also removed the Lion/Tiger embedding drift
    (docs/reference/algorithms.md#embedding-drift-fixes item 2). It has no parameters; for even d it
    is its own inverse.
    """

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[-1] // 2
        return torch.cat((x[..., h:], x[..., :h]), dim=-1)


def tied_embedding_std(num_embeddings: int, embedding_dim: int) -> float:
    """σ = ln(n)/d, the init std for tied embeddings of docs/reference/algorithms.md#initialisation:
    the initial loss, ≈ log(e^{dσ} + n − 1), becomes ≈ log(2n − 1) instead of being dominated by dσ.

    ``tied_embedding_std(50000, 768) == 0.0140883...``
    """
    for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return math.log(num_embeddings) / embedding_dim


@torch.no_grad()
def init_tied_embedding_(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill a tied embedding table (n × d) in place from N(0, σ²) with σ = ln(n)/d
    (docs/reference/algorithms.md#initialisation); returns ``weight``. The blog notes this fix
    converged slowest of the three it tried; the alternatives are :class:`HalfSwap` or an orthogonal
    projection after the final norm."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (num_embeddings × embedding_dim)")
    std = tied_embedding_std(weight.shape[0], weight.shape[1])
    return weight.normal_(0.0, std, generator=generator)

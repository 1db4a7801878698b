"""Diagnostics for training runs: the embedding drift of sign optimizers
(docs/reference/algorithms.md#embedding-drift)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from danlu.core.shell import check_in_range, check_positive

__all__ = ["EmbeddingDrift", "embedding_drift"]


@dataclass(frozen=True)
class EmbeddingDrift:
    """How close the rows of an embedding table are to the drift limit ±1/λ.

    ``row_ratios[i]`` is max_j |θ_ij|·λ: 1 means row i has a component at the fixed point
    −sign(m)/λ of a sign update with decoupled decay
    (docs/reference/algorithms.md#embedding-drift-mechanism).
    """

    limit: float
    """1/λ."""
    max_ratio: float
    """The largest |θ|·λ in the table."""
    num_rows: int
    num_drifting: int
    """Rows whose largest |θ|·λ is at least ``threshold``."""
    threshold: float
    worst_rows: list[int]
    """Up to ``top`` row indices, largest |θ|·λ first."""
    row_ratios: Tensor

    @property
    def fraction_drifting(self) -> float:
        return self.num_drifting / self.num_rows if self.num_rows else 0.0

    def __str__(self) -> str:
        return (
            f"embedding drift: {self.num_drifting}/{self.num_rows} rows with max|θ|·λ ≥ "
            f"{self.threshold:g} (limit 1/λ = {self.limit:g}); largest |θ|·λ = "
            f"{self.max_ratio:.4f}; worst rows {self.worst_rows}"
        )


@torch.no_grad()
def embedding_drift(
    weight: Tensor, weight_decay: float, *, threshold: float = 0.5, top: int = 10
) -> EmbeddingDrift:
    """Report the rows of ``weight`` (num_embeddings × dim) that approach ±1/λ.

    Under Lion or Tiger with decoupled decay λ, a row whose token stops appearing keeps moving by
    ±η per step toward −sign(m)/λ (docs/reference/algorithms.md#embedding-drift-mechanism,
    #embedding-drift-claims); with λ = 0.01 that is ±100. A healthy table has ``max_ratio`` well
    below 1; rare-token rows near 1 show the drift (use ``danlu.Lazy``, Adam for the embeddings via
    ``danlu.MultiOptimizer.adam_for_embeddings``, or tied embeddings with ``danlu.nn.HalfSwap``).

    Args:
        weight: the table (at least one dimension; rows along the first).
        weight_decay: λ (> 0) of the optimizer that trains it.
        threshold: a row counts as drifting when its largest |θ|·λ reaches this, in (0, 1].
        top: how many of the worst rows to list.
    """
    check_positive("weight_decay", weight_decay)
    check_in_range("threshold", threshold, 0.0, 1.0, low_open=True, high_open=False)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an integer >= 0, got {top!r}")
    if not isinstance(weight, Tensor) or weight.dim() == 0:
        raise ValueError("weight must be a tensor with at least one dimension")
    lam = float(weight_decay)
    table = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight[:, None]
    if table.numel() == 0:
        ratios = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)
    else:
        ratios = table.abs().amax(dim=1).to(torch.promote_types(table.dtype, torch.float32)) * lam
    count = int(ratios.numel())
    order = torch.argsort(ratios, descending=True)[: min(top, count)]
    return EmbeddingDrift(
        limit=1.0 / lam,
        max_ratio=float(ratios.max()) if count else 0.0,
        num_rows=count,
        num_drifting=int((ratios >= threshold).sum()),
        threshold=float(threshold),
        worst_rows=[int(i) for i in order],
        row_ratios=ratios.cpu(),
    )

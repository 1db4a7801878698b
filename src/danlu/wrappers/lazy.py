"""Lazy (row-masked) updates of embedding tables, SPEC.md §4(a') and §4(b)1."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.distributed import any_over_shards, is_dtensor, local
from danlu.optim._base import check_bool
from danlu.wrappers._base import OptimizerWrapper, iter_params

__all__ = ["Lazy"]


class Lazy(OptimizerWrapper):
    """Move a row of an embedding table only if its gradient row is non-zero (kexue 6869, 9736).

    The row mask is r_i = 1[∃j: g_ij ≠ 0] over the last axis (for a sparse gradient, the rows
    it lists: the token ids of the batch). The inner optimizer steps as usual, then:

    * ``lazy_moments=False`` (the blog's variant, bojone/keras_lazyoptimizer): the rows with
      r_i = 0 get their old parameter values back, so θ_i ← θ_i + r_i·Δθ_i; the moments of every
      row are updated as the inner optimizer does (absent rows decay).
    * ``lazy_moments=True`` (the standard one, TF LazyAdam, torch SparseAdam): the absent rows of
      the parameter *and* of every state tensor shaped like it (Adam's ``exp_avg`` and
      ``exp_avg_sq``, Tiger's ``exp_avg``) get their old values back; scalar state such as
      ``step`` keeps counting, so bias correction uses the global step. On a table's first
      step its state does not exist yet: the absent rows of the new moments hold what a zero
      gradient gives them (0 for Adam's and Tiger's).

    Absent rows are restored by copying the saved values back, never by multiplying the update
    by the mask: a row that never had a gradient may compute 0/0 = NaN inside the inner step (Adam
    with ε = 0), and NaN·0 is NaN (SPEC §4(e)3).

    ``params`` are the tables to treat lazily (they must belong to the inner optimizer); by
    default every parameter of a group tagged ``kind="embedding"`` (``danlu.param_groups`` tags
    ``nn.Embedding`` weights). Other parameters step normally. Sparse gradients
    (``nn.Embedding(sparse=True)``) are accepted: they are densified for the inner step and put
    back afterwards.

    Cost per step and lazy table: one boolean per row, and a transient copy of the absent rows
    (absent rows × row size, close to one copy of the table for a large vocabulary; with
    ``lazy_moments=True`` the same again per moment tensor), freed after the step. With tied
    embeddings every row has a gradient and nothing is copied (and nothing is lazy).

    Under DDP every rank sees the same averaged gradient, hence the same rows. Under FSDP2
    (DTensor tables) each rank restores rows of its own slice, and when the table is sharded
    along its last axis a row counts as present if any rank's part of it has a non-zero
    gradient, so all ranks treat it alike.

    Deviation: a present row whose gradient is exactly zero is treated as absent (SPEC §4(c)),
    unless the gradient is sparse.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Iterable[Tensor] | None = None,
        lazy_moments: bool = False,
    ) -> None:
        super().__init__(optimizer)
        check_bool("lazy_moments", lazy_moments)
        owned = {id(p) for _, p in iter_params(self)}
        if params is None:
            chosen = [p for group, p in iter_params(self) if group.get("kind") == "embedding"]
            if not chosen:
                raise ValueError(
                    "params: none given and no param group of the optimizer has "
                    "kind='embedding'; pass params=[embedding.weight]"
                )
        else:
            chosen = list(params)
            if not chosen:
                raise ValueError("params must list at least one tensor")
        for i, p in enumerate(chosen):
            if not isinstance(p, Tensor):
                raise ValueError(f"params[{i}] must be a tensor, got {type(p).__name__}")
            if id(p) not in owned:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not optimised by the wrapped "
                    "optimizer"
                )
            if p.dim() == 0:
                raise ValueError(f"params[{i}] must have at least one dimension (rows)")
        self.lazy_params = chosen
        self.lazy_moments = lazy_moments

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        sparse_grads: list[tuple[Tensor, Tensor]] = []
        restores: list[tuple[Tensor, tuple[Tensor, ...], Tensor]] = []
        stepped = {id(p) for _, p in iter_params(self)}  # step_in_backward passes one at a time
        try:
            for p in self.lazy_params:
                grad = p.grad
                if grad is None or id(p) not in stepped:
                    continue
                if is_dtensor(p):
                    # FSDP2: each rank restores the absent rows of its own slice; a row split
                    # over ranks is present when any part of it has a non-zero gradient.
                    piece = local(p)
                    present = any_over_shards((local(grad) != 0).any(dim=-1), p, -1)
                    absent = torch.logical_not(present).nonzero(as_tuple=True)
                    if absent[0].numel() == 0:
                        continue
                    restores.append((piece, absent, piece[absent]))
                    if self.lazy_moments:
                        for value in self.state.get(p, {}).values():
                            if isinstance(value, Tensor) and value.shape == p.shape:
                                moment = local(value)
                                restores.append((moment, absent, moment[absent]))
                    continue
                if grad.is_sparse:
                    if grad.sparse_dim() != 1:
                        raise ValueError(
                            f"danlu.Lazy: sparse gradients must be sparse over rows only "
                            f"(sparse_dim 1), got sparse_dim {grad.sparse_dim()}"
                        )
                    sparse_grads.append((p, grad))
                    grad = grad.coalesce()
                    present = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                    present[grad.indices()[0]] = True
                    p.grad = grad.to_dense()
                else:
                    present = (grad != 0).any(dim=-1)
                absent = torch.logical_not(present).nonzero(as_tuple=True)
                if absent[0].numel() == 0:
                    continue
                restores.append((p, absent, p.detach()[absent]))
                if self.lazy_moments:
                    for value in self.state.get(p, {}).values():
                        if isinstance(value, Tensor) and value.shape == p.shape:
                            restores.append((value, absent, value[absent]))
            self.optimizer.step()
            for target, rows, saved in restores:
                target.detach().index_put_(rows, saved)
        finally:
            for p, sparse in sparse_grads:
                p.grad = sparse
        return loss

    def _wrapper_state(self) -> dict[str, Any]:
        return {"lazy_moments": self.lazy_moments}

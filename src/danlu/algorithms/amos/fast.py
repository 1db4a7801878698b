"""Amos's compiled CPU/GPU path: the reference rule's for-loop (``functional._single_tensor_amos``)
compiled by ``torch.compile`` (``*_compiled``). There is no chunked path: a slot's mean square
needs the whole tensor.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from danlu.algorithms.amos.rule import AmosHyper
from danlu.core.compiled import compiled_once, lr_tensor, recompile_limit


def amos_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    etas: list[float],
    hyper: AmosHyper,
) -> None:
    """Amos (docs/reference/algorithms.md#amos-optimizer): ``rule.amos_update_`` compiled into one
    fused loop per tensor. The per-step bias correction 1 − β^t is a 0-d tensor like the lr, so
    the step count does not recompile; the per-tensor η are constants of the compiled code."""
    from danlu.algorithms.amos.functional import _single_tensor_amos

    # 0-d tensors (params, and the scalar slots of vectors) as 1-element views with the
    # param's number of dims, so the slot still broadcasts and reduces over the same entries
    ndims = [max(p.dim(), 1) for p in params]

    def lift(tensors: list[Tensor | None]) -> list[Tensor | None]:
        return [
            t.view((1,) * nd) if t is not None and t.dim() == 0 else t
            for t, nd in zip(tensors, ndims, strict=True)
        ]

    like = exp_avg_sqs[0]
    correction = hyper.bias_correction
    if isinstance(correction, Tensor):  # from a step tensor, inside a compiled optimizer step
        correction = correction.to(dtype=like.dtype, device=like.device)
    else:
        correction = torch.full((), correction, dtype=like.dtype, device=like.device)
    tensor_hyper = dataclasses.replace(
        hyper, bias_correction=correction, lr=lr_tensor(hyper.lr, like)
    )
    with recompile_limit():
        compiled_once(_single_tensor_amos)(
            lift(params),  # type: ignore[arg-type]
            lift(grads),  # type: ignore[arg-type]
            lift(exp_avg_sqs),  # type: ignore[arg-type]
            lift(bs),  # type: ignore[arg-type]
            lift(exp_avgs),
            etas=etas,
            hyper=tensor_hyper,
        )

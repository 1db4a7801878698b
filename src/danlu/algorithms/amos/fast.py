"""Amos's CPU fast paths: the single-tensor rule on cache-sized slices
(``*_chunked``) and the foreach rule compiled by ``torch.compile`` (``*_compiled``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from danlu.core.compiled import compiled_once, lr_tensor, recompile_limit


def amos_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    etas: list[float],
    bias_correction: float,
    lr: float | Tensor,
    beta: float,
    zeta: float,
    finetune_rate: float,
    center: float,
    momentum: float,
    clip_value: float | None,
    eps: float,
    maximize: bool,
) -> None:
    """Amos (docs/reference/algorithms.md#amos-optimizer): ``functional.amos._single_tensor_amos``
    compiled into one fused loop per tensor. The per-step bias correction 1 − β^t is a 0-d tensor
    like the lr, so the step count does not recompile; the per-tensor η are constants of the
    compiled code."""
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
    with recompile_limit():
        compiled_once(_single_tensor_amos)(
            lift(params),  # type: ignore[arg-type]
            lift(grads),  # type: ignore[arg-type]
            lift(exp_avg_sqs),  # type: ignore[arg-type]
            lift(bs),  # type: ignore[arg-type]
            lift(exp_avgs),
            etas=etas,
            bias_correction=torch.full((), bias_correction, dtype=like.dtype, device=like.device),
            lr=lr_tensor(lr, like),
            beta=beta,
            zeta=zeta,
            finetune_rate=finetune_rate,
            center=center,
            momentum=momentum,
            clip_value=clip_value,
            eps=eps,
            maximize=maximize,
        )

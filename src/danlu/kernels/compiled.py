"""The fused path without Triton: the foreach math of ``danlu.functional`` compiled by
``torch.compile`` into one loop nest per param group (C++/OpenMP on CPU).

Shapes are static, so each distinct list of shapes compiles once (the first step of a
parameter set takes seconds; Inductor caches the result on disk for later processes). The lr
is passed as a 0-d tensor so that an LR scheduler does not trigger recompilation
(pytorch#133898). Compiled functions are built once per algorithm, never per step (ao#2500).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["adax_compiled", "amos_compiled", "lion_compiled", "tiger_compiled"]

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}

#: Each param group (a distinct list of shapes) is one cache entry of the compiled function.
_RECOMPILE_LIMIT = 256


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        _compiled[fn] = compiled
    return compiled


@contextlib.contextmanager
def _recompile_limit() -> Iterator[None]:
    config = torch._dynamo.config
    with config.patch(cache_size_limit=max(config.cache_size_limit, _RECOMPILE_LIMIT)):
        yield


def _lr_tensor(lr: float | Tensor, like: Tensor) -> Tensor:
    """lr as a 0-d tensor in the parameter's precision (at least fp32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    if isinstance(lr, Tensor):
        return lr.to(device=like.device, dtype=dtype)
    return torch.full((), lr, dtype=dtype, device=like.device)  # a fill: no host-device copy


def _no_zero_dim(tensors: list[Tensor]) -> list[Tensor]:
    """0-d tensors as 1-element views: Inductor (torch 2.13, CPU) loses in-place updates of
    0-d float64 inputs in the single-tensor code."""
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


def lion_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Lion (docs/reference/algorithms.md#lion-rule): ``functional.lion._multi_tensor_lion``
    compiled."""
    from danlu.functional.lion import _multi_tensor_lion

    with _recompile_limit():
        _compile(_multi_tensor_lion)(
            params,
            grads,
            exp_avgs,
            lr=_lr_tensor(lr, params[0]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
        )


def tiger_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta: float,
    weight_decay: float,
    kind: str,
    rms_floor: float,
    grad_accum_steps: int,
    first_micro_step: bool,
    last_micro_step: bool,
    maximize: bool,
) -> None:
    """Tiger (docs/reference/algorithms.md#tiger-rule): ``functional.tiger._multi_tensor_tiger``
    compiled (RMS reductions and the update fused into as few passes as Inductor can manage)."""
    from danlu.functional.tiger import _multi_tensor_tiger

    with _recompile_limit():
        _compile(_multi_tensor_tiger)(
            params,
            grads,
            exp_avgs,
            lr=_lr_tensor(lr, params[0]),
            beta=beta,
            weight_decay=weight_decay,
            kind=kind,
            rms_floor=rms_floor,
            grad_accum_steps=grad_accum_steps,
            first_micro_step=first_micro_step,
            last_micro_step=last_micro_step,
            maximize=maximize,
        )


def adax_compiled(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    new_sample_weight: float,
    lr: float | Tensor,
    beta1: float,
    eps: float,
    eps_inside_sqrt: bool,
    weight_decay: float,
    maximize: bool,
) -> None:
    """AdaX (docs/reference/algorithms.md#adax): ``functional.adax._single_tensor_adax`` compiled
    into one fused loop per tensor. The per-step weight 1 − β̂_t is passed as a 0-d tensor like the
    lr, so the step count does not recompile."""
    from danlu.functional.adax import _single_tensor_adax

    like = exp_avg_sqs[0]
    with _recompile_limit():
        _compile(_single_tensor_adax)(
            *(_no_zero_dim(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs)),
            new_sample_weight=torch.full(
                (), new_sample_weight, dtype=like.dtype, device=like.device
            ),
            lr=_lr_tensor(lr, params[0]),
            beta1=beta1,
            eps=eps,
            eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay,
            maximize=maximize,
        )


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
    from danlu.functional.amos import _single_tensor_amos

    # 0-d tensors (params, and the scalar slots of vectors) as 1-element views with the
    # param's number of dims, so the slot still broadcasts and reduces over the same entries
    ndims = [max(p.dim(), 1) for p in params]

    def lift(tensors: list[Tensor | None]) -> list[Tensor | None]:
        return [
            t.view((1,) * nd) if t is not None and t.dim() == 0 else t
            for t, nd in zip(tensors, ndims, strict=True)
        ]

    like = exp_avg_sqs[0]
    with _recompile_limit():
        _compile(_single_tensor_amos)(
            lift(params),  # type: ignore[arg-type]
            lift(grads),  # type: ignore[arg-type]
            lift(exp_avg_sqs),  # type: ignore[arg-type]
            lift(bs),  # type: ignore[arg-type]
            lift(exp_avgs),
            etas=etas,
            bias_correction=torch.full((), bias_correction, dtype=like.dtype, device=like.device),
            lr=_lr_tensor(lr, like),
            beta=beta,
            zeta=zeta,
            finetune_rate=finetune_rate,
            center=center,
            momentum=momentum,
            clip_value=clip_value,
            eps=eps,
            maximize=maximize,
        )

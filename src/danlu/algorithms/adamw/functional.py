"""AdamW with gradient accumulation hidden in its moments,
docs/reference/algorithms.md#hidden-accumulation-rule: the functional entry and its paths,
tensors in, tensors updated in place.

The rule itself, one tensor and one micro-step, is
:func:`danlu.algorithms.adamw.rule.adamw_update_`: the for-loop path runs it tensor by tensor,
DTensors (FSDP2) run it on their local slices (the update is elementwise), and the foreach
path restates it over lists of tensors (each step names the line it mirrors).

The moments may be wider than the parameter (``danlu.AdamW`` keeps v in float32 for bf16 and
fp16 parameters, and m too for fp16): the gradient is then read in v's dtype (and rounded to
m's for m), and the parameter's update, decay included, is computed in v's dtype and rounded
once when written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from danlu.algorithms.adamw.rule import (
    AdamWHyper,
    adamw_bias_corrections,
    adamw_gradient_bound,
    adamw_update_,
)
from danlu.core.dtensor import any_dtensor, local
from danlu.core.overflow import saturate_all
from danlu.core.precision import stochastically_rounded_params
from danlu.core.tensors import group_by_device_and_dtype, resolve_foreach

__all__ = ["adamw"]


def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    eps_inside_sqrt: bool = False,
    grad_accum_steps: int = 1,
    first_micro_step: bool = True,
    last_micro_step: bool = True,
    maximize: bool = False,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
) -> None:
    """One AdamW micro-step. ``steps`` holds each parameter's update count (0-d tensors); it
    is incremented on the last micro-step of a window, before the bias correction. DTensor
    (FSDP2) tensors are updated through their local slices: the update is elementwise.
    ``stochastic_rounding`` (``None``/``True``: bf16 and fp16 parameters; ``False``: none) runs
    the parameter's part of the update on an fp32 copy and writes it back with stochastic
    rounding (``danlu.core.precision``); the state is kept and rounded as without it.

    Inside ``torch.compile`` the bias corrections are computed from the step tensors on the
    device (as torch.optim's capturable path) instead of being read to the host, so neither
    the step count nor a tensor lr recompiles the graph."""
    if not params:
        return
    if any_dtensor(params):
        params, grads, exp_avgs, exp_avg_sqs = (
            [local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
    hyper = AdamWHyper.of(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        eps_inside_sqrt=eps_inside_sqrt,
        grad_accum_steps=grad_accum_steps,
        first_micro_step=first_micro_step,
        last_micro_step=last_micro_step,
        maximize=maximize,
    )
    fn = _multi_tensor_adamw if resolve_foreach(foreach, params) else _single_tensor_adamw

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [steps[i] for i in indices],
            hyper,
        )

    stochastically_rounded_params(run, params, stochastic_rounding)


def _single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper: AdamWHyper,
) -> None:
    """The reference rule, tensor by tensor."""
    for param, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        adamw_update_(param, grad, exp_avg, exp_avg_sq, step, hyper)


def _multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper: AdamWHyper,
) -> None:
    """:func:`adamw_update_` over lists of tensors (foreach ops, one group per device and dtype)."""
    h = hyper
    k = h.grad_accum_steps
    for (
        device_params,
        device_grads,
        device_exp_avgs,
        device_exp_avg_sqs,
        device_steps,
    ), _ in group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps]):
        # adamw_gradient: negated for maximize, in v's dtype, saturated
        if h.maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        v_dtype = device_exp_avg_sqs[0].dtype
        owned = h.maximize or any(g.dtype != v_dtype for g in device_grads)
        device_grads = [g.to(v_dtype) for g in device_grads]
        device_grads = saturate_all(device_grads, adamw_gradient_bound(h, v_dtype), owned=owned)
        grads_m = [g.to(m.dtype) for g, m in zip(device_grads, device_exp_avgs, strict=True)]
        # the moments: m ← β1'·m + (1−β1)/k · g, v ← β2'·v + (1−β2)/k · g²
        if k == 1:
            torch._foreach_lerp_(device_exp_avgs, grads_m, 1 - h.beta1)
            torch._foreach_mul_(device_exp_avg_sqs, h.beta2)
            torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - h.beta2)
        else:
            if h.first_micro_step:
                torch._foreach_mul_(device_exp_avgs, h.beta1)
                torch._foreach_mul_(device_exp_avg_sqs, h.beta2)
            torch._foreach_add_(device_exp_avgs, grads_m, alpha=(1 - h.beta1) / k)
            torch._foreach_addcmul_(
                device_exp_avg_sqs, device_grads, device_grads, (1 - h.beta2) / k
            )
        if not h.last_micro_step:
            continue
        torch._foreach_add_(device_steps, 1.0)
        # the update in v's dtype for bf16/fp16 parameters with a float32 v, one rounding on write
        wides = [
            torch.promote_types(p.dtype, v.dtype)
            for p, v in zip(device_params, device_exp_avg_sqs, strict=True)
        ]
        wider = [p.dtype != w for p, w in zip(device_params, wides, strict=True)]
        work = [p.to(w) for p, w in zip(device_params, wides, strict=True)]
        if h.weight_decay != 0:
            torch._foreach_mul_(work, 1 - h.lr * h.weight_decay)
        if torch.compiler.is_compiling():
            _compiled_multi_tensor_update(
                work, device_exp_avgs, device_exp_avg_sqs, device_steps, h
            )
            _write_back(device_params, work, wider)
            continue
        # floats here (the lr and the counts are read to the host outside torch.compile)
        corrections = [adamw_bias_corrections(h, float(s.item())) for s in device_steps]
        step_sizes: list[Any] = [-size for size, _ in corrections]
        bias_corrections2: list[Any] = [bc for _, bc in corrections]
        # adamw_denominator: √v̂ + ε (or √(v̂ + ε)), at least the smallest normal
        if h.eps_inside_sqrt:
            denoms = torch._foreach_div(device_exp_avg_sqs, bias_corrections2)
            torch._foreach_add_(denoms, h.eps)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_div_(denoms, [bc**0.5 for bc in bias_corrections2])
            torch._foreach_add_(denoms, h.eps)
        if h.eps < torch.finfo(denoms[0].dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
            torch._foreach_clamp_min_(denoms, torch.finfo(denoms[0].dtype).tiny)
        torch._foreach_addcdiv_(work, device_exp_avgs, denoms, step_sizes)
        _write_back(device_params, work, wider)


def _write_back(params: list[Tensor], work: list[Tensor], wider: list[bool]) -> None:
    """Copy the float32 work copies of bf16/fp16 parameters back (one rounding each)."""
    written = [i for i, w in enumerate(wider) if w]
    if written:
        torch._foreach_copy_([params[i] for i in written], [work[i] for i in written])


def _compiled_multi_tensor_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    h: AdamWHyper,
) -> None:
    """The bias-corrected step of :func:`_multi_tensor_adamw` inside ``torch.compile``: the
    step counts stay tensors (float64 on the parameters' device), nothing is read to the
    host."""
    device = params[0].device
    counts = [s.to(device=device, dtype=torch.float64) for s in steps]
    corrections = [adamw_bias_corrections(h, n) for n in counts]
    if h.eps_inside_sqrt:
        denoms = [v / bc for v, (_, bc) in zip(exp_avg_sqs, corrections, strict=True)]
        torch._foreach_add_(denoms, h.eps)
        torch._foreach_sqrt_(denoms)
    else:
        denoms = list(torch._foreach_sqrt(exp_avg_sqs))
        denoms = [
            d / cast(Tensor, bc).sqrt() for d, (_, bc) in zip(denoms, corrections, strict=True)
        ]
        torch._foreach_add_(denoms, h.eps)
    if h.eps < torch.finfo(denoms[0].dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
        torch._foreach_clamp_min_(denoms, torch.finfo(denoms[0].dtype).tiny)
    updates = list(torch._foreach_div(exp_avgs, denoms))
    for update, (size, _) in zip(updates, corrections, strict=True):
        update.mul_(size)
    torch._foreach_sub_(params, updates)

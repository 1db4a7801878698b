"""AdamW with gradient accumulation hidden in its moments,
docs/reference/algorithms.md#hidden-accumulation-rule: the math only.

One call is one micro-step. With ``grad_accum_steps = k = 1`` it is torch.optim.AdamW::

    m ← m + (1-β1)·(g - m)        v ← β2·v + (1-β2)·g²
    θ ← θ·(1 - η·λ) - η·m̂ / (√v̂ + ε)      m̂ = m / (1-β1^n),  v̂ = v / (1-β2^n)

With k > 1 (the blog's variant, kexue 8634) the moments decay on the first micro-step of a
window, every micro-step adds its share, and the parameter moves on the last one::

    m ← β1'·m + (1-β1)/k · g       v ← β2'·v + (1-β2)/k · g²      β' = β on a window's first
                                                                  micro-step, else 1

so m is exactly the EMA of the mean gradient while v uses the mean of the squares in place of
the square of the mean. Bias correction counts updates n (``steps``), and the decoupled decay
acts only on updates. ``eps_inside_sqrt`` puts ε under the root, √(v̂ + ε), as in the post.

Gradients are read saturated at the largest magnitude whose (1−β2)·g² stays finite in v's
dtype (``functional.overflow``): about 1.3e19 in float32, 5.7e3 in float16 at β2 = 0.999.

The moments may be wider than the parameter (``danlu.AdamW`` keeps v in float32 for bf16 and
fp16 parameters, and m too for fp16): the gradient is then read in v's dtype (and rounded to
m's for m), and the parameter's update, decay included, is computed in v's dtype and rounded
once when written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, local
from danlu.core.overflow import saturate, saturate_all, square_bound
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
    rounding (``functional.precision``); the state is kept and rounded as without it.

    Inside ``torch.compile`` the bias corrections are computed from the step tensors on the
    device (as torch.optim's capturable path) instead of being read to the host, so neither
    the step count nor a tensor lr recompiles the graph."""
    if not params:
        return
    if any_dtensor(params):
        params, grads, exp_avgs, exp_avg_sqs = (
            [local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
        )
    if isinstance(lr, Tensor) and not torch.compiler.is_compiling():
        lr = float(lr.item())  # inside torch.compile it stays a tensor: no host read
    fn = _multi_tensor_adamw if resolve_foreach(foreach, params) else _single_tensor_adamw

    def run(indices: list[int], work: list[Tensor]) -> None:
        fn(
            work,
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [steps[i] for i in indices],
            **settings,
        )

    settings: dict[str, Any] = dict(
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
    stochastically_rounded_params(run, params, stochastic_rounding)


def _single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    eps_inside_sqrt: bool,
    grad_accum_steps: int,
    first_micro_step: bool,
    last_micro_step: bool,
    maximize: bool,
) -> None:
    k = grad_accum_steps
    for param, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        if maximize:
            grad = -grad
        owned = maximize or grad.dtype != exp_avg_sq.dtype
        grad = grad.to(exp_avg_sq.dtype)
        grad = saturate(grad, square_bound(exp_avg_sq.dtype, weight=1 - beta2), owned=owned)
        grad_m = grad.to(exp_avg.dtype)
        if k == 1:
            exp_avg.lerp_(grad_m, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:
            if first_micro_step:
                exp_avg.mul_(beta1)
                exp_avg_sq.mul_(beta2)
            exp_avg.add_(grad_m, alpha=(1 - beta1) / k)
            exp_avg_sq.addcmul_(grad, grad, value=(1 - beta2) / k)
        if not last_micro_step:
            continue
        step += 1
        if torch.compiler.is_compiling():
            n: float | Tensor = step.to(device=param.device, dtype=torch.float64)
        else:
            n = float(step.item())
        # bf16/fp16 parameters with a float32 v: the update in float32, one rounding on write
        wide = torch.promote_types(param.dtype, exp_avg_sq.dtype)
        work = param if param.dtype == wide else param.to(wide)
        if weight_decay != 0:
            work.mul_(1 - lr * weight_decay)
        step_size = lr / (1 - beta1**n)
        bias_correction2 = 1 - beta2**n
        if eps_inside_sqrt:
            denom = (exp_avg_sq / bias_correction2).add_(eps).sqrt_()
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        if eps < torch.finfo(denom.dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
            # v̂ = 0 only where every gradient was 0 (so m = 0): a 0 step, not 0/0
            denom.clamp_min_(torch.finfo(denom.dtype).tiny)
        if isinstance(step_size, Tensor):
            work.sub_(exp_avg.div(denom).mul_(step_size))
        else:
            work.addcdiv_(exp_avg, denom, value=-step_size)
        if work is not param:
            param.copy_(work)


def _multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    eps_inside_sqrt: bool,
    grad_accum_steps: int,
    first_micro_step: bool,
    last_micro_step: bool,
    maximize: bool,
) -> None:
    k = grad_accum_steps
    for (
        device_params,
        device_grads,
        device_exp_avgs,
        device_exp_avg_sqs,
        device_steps,
    ), _ in group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps]):
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        v_dtype = device_exp_avg_sqs[0].dtype
        owned = maximize or any(g.dtype != v_dtype for g in device_grads)
        device_grads = [g.to(v_dtype) for g in device_grads]
        device_grads = saturate_all(
            device_grads, square_bound(v_dtype, weight=1 - beta2), owned=owned
        )
        grads_m = [g.to(m.dtype) for g, m in zip(device_grads, device_exp_avgs, strict=True)]
        if k == 1:
            torch._foreach_lerp_(device_exp_avgs, grads_m, 1 - beta1)
            torch._foreach_mul_(device_exp_avg_sqs, beta2)
            torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        else:
            if first_micro_step:
                torch._foreach_mul_(device_exp_avgs, beta1)
                torch._foreach_mul_(device_exp_avg_sqs, beta2)
            torch._foreach_add_(device_exp_avgs, grads_m, alpha=(1 - beta1) / k)
            torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, (1 - beta2) / k)
        if not last_micro_step:
            continue
        torch._foreach_add_(device_steps, 1.0)
        # bf16/fp16 parameters with a float32 v: the update in float32, one rounding on write
        wides = [
            torch.promote_types(p.dtype, v.dtype)
            for p, v in zip(device_params, device_exp_avg_sqs, strict=True)
        ]
        wider = [p.dtype != w for p, w in zip(device_params, wides, strict=True)]
        work = [p.to(w) for p, w in zip(device_params, wides, strict=True)]
        if weight_decay != 0:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        if torch.compiler.is_compiling():
            _compiled_multi_tensor_update(
                work,
                device_exp_avgs,
                device_exp_avg_sqs,
                device_steps,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                eps_inside_sqrt=eps_inside_sqrt,
            )
            _write_back(device_params, work, wider)
            continue
        counts = [float(s.item()) for s in device_steps]
        step_sizes = [-(lr / (1 - beta1**n)) for n in counts]
        bias_corrections2 = [1 - beta2**n for n in counts]
        if eps_inside_sqrt:
            denoms = torch._foreach_div(device_exp_avg_sqs, bias_corrections2)
            torch._foreach_add_(denoms, eps)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_div_(denoms, [bc**0.5 for bc in bias_corrections2])
            torch._foreach_add_(denoms, eps)
        if eps < torch.finfo(denoms[0].dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
            # v̂ = 0 only where every gradient was 0 (so m = 0): a 0 step, not 0/0
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
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    eps_inside_sqrt: bool,
) -> None:
    """The bias-corrected step of :func:`_multi_tensor_adamw` inside ``torch.compile``: the
    step counts stay tensors (float64 on the parameters' device), nothing is read to the
    host."""
    device = params[0].device
    counts = [s.to(device=device, dtype=torch.float64) for s in steps]
    step_sizes = [lr / (1 - beta1**n) for n in counts]
    bias_corrections2 = [1 - beta2**n for n in counts]
    if eps_inside_sqrt:
        denoms = [v / bc for v, bc in zip(exp_avg_sqs, bias_corrections2, strict=True)]
        torch._foreach_add_(denoms, eps)
        torch._foreach_sqrt_(denoms)
    else:
        denoms = list(torch._foreach_sqrt(exp_avg_sqs))
        denoms = [d / bc.sqrt() for d, bc in zip(denoms, bias_corrections2, strict=True)]
        torch._foreach_add_(denoms, eps)
    if eps < torch.finfo(denoms[0].dtype).tiny:  # ε = 0, or lost in fp16 (1e-8 + 0 = 0)
        torch._foreach_clamp_min_(denoms, torch.finfo(denoms[0].dtype).tiny)
    updates = list(torch._foreach_div(exp_avgs, denoms))
    for update, size in zip(updates, step_sizes, strict=True):
        update.mul_(size)
    torch._foreach_sub_(params, updates)

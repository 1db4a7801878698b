"""Tiger, docs/reference/algorithms.md#tiger-rule: the math only, tensors in, tensors updated in
place.

One call is one micro-step of the reference code (bojone/tiger tiger.py). With
``grad_accum_steps = k`` the momentum decays by β on the first micro-step of a window, adds
(1-β)·g/k on every micro-step, and the parameters move only on the last one::

    m ← β'·m + (1-β)/k · g                   β' = β on a window's first micro-step, else 1
    θ ← θ - η·(sign(m) + λ·θ)                only on a window's last micro-step

with the per-kind step size (the reference code's name rules, as explicit kinds):

* ``"elementwise"`` (biases, norm gains): η = 0.5·α and λ = 0;
* ``"matrix"``: η = α·max(RMS(θ), rms_floor), RMS over the whole tensor;
* ``"embedding"``: η = α·max(RMS(θ_row), rms_floor), one RMS per row (last axis).

The decay is multiplied by the same η, RMS factor included, as in the reference code.

The gradient is read saturated at half the largest value of the momentum's dtype
(``functional.overflow.average_bound``), so the momentum stays finite for every finite
gradient (+max then −max used to make it ±inf, then NaN); gradients within the bound are read
unchanged, bit for bit. Non-finite gradients go to the non-finite policy as before.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from danlu.core.dtensor import any_dtensor, is_dtensor, local, sharded_sums
from danlu.core.nonfinite import shrink_
from danlu.core.overflow import average_bound, average_bounds, saturate, saturate_all
from danlu.core.precision import needs_upcast, needs_upcast_copies, upcast_step
from danlu.core.row_norm import row_norm
from danlu.core.shell import KINDS
from danlu.core.tensors import group_by_device_and_dtype, select_path

__all__ = ["KINDS", "tiger", "tiger_step_size"]


def tiger_step_size(
    param: Tensor, *, lr: float | Tensor, kind: str, rms_floor: float
) -> float | Tensor:
    """η for one tensor: 0.5·α, α·max(RMS(θ), floor), or a column of per-row values.

    For a DTensor (FSDP2) parameter the RMS is over the whole tensor (or whole rows), summed
    over the ranks that shard it; the result is laid out like the local slice."""
    if kind == "elementwise":
        return 0.5 * lr
    dtype = torch.promote_types(param.dtype, torch.float32)
    if is_dtensor(param):
        return _sharded_step_sizes([param], lr=lr, kind=kind, rms_floor=rms_floor)[0]
    if kind == "matrix":
        rms = torch.linalg.vector_norm(param, dtype=dtype) / math.sqrt(max(param.numel(), 1))
    elif kind == "embedding":
        width = param.shape[-1] if param.dim() > 0 else 1
        # an opaque op inside torch.compile (Inductor's CPU code generation fails on the row
        # reduction fused with the update, pytorch#196570); the same call eagerly
        rms = row_norm(param, dtype) / math.sqrt(max(width, 1))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return rms.clamp_min_(rms_floor).mul_(lr)


def _sharded_step_sizes(
    params: Sequence[Tensor], *, lr: float | Tensor, kind: str, rms_floor: float
) -> list[Tensor]:
    """η of several DTensor parameters of one kind, their sums of squares all-reduced together
    (one collective per step, not one per tensor)."""
    if kind not in ("matrix", "embedding"):
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    squares = []
    dims: list[int | None] = []
    for param in params:
        dtype = torch.promote_types(param.dtype, torch.float32)
        squares.append(local(param).to(dtype).square())
        dims.append(-1 if kind == "embedding" and param.dim() > 0 else None)
    out = []
    for param, total, dim in zip(params, sharded_sums(squares, params, dims), dims, strict=True):
        count = param.numel() if dim is None else param.shape[-1]
        rms = total.sqrt_().div_(math.sqrt(max(count, 1)))
        out.append(rms.clamp_min_(rms_floor).mul_(lr))
    return out


def tiger(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta: float,
    weight_decay: float,
    kind: str,
    rms_floor: float,
    grad_accum_steps: int = 1,
    first_micro_step: bool = True,
    last_micro_step: bool = True,
    maximize: bool = False,
    finite: Tensor | None = None,
    nonfinite: str = "shrink",
    center: float = 0.0,
    shrink_ratio: float = 0.99,
    stochastic_rounding: bool | None = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Tiger micro-step on tensors of one ``kind``; updates exp_avgs and (on the last
    micro-step of a window) params.

    ``finite`` (optional bool tensor, one entry per tensor) marks tensors whose gradient is
    finite; the others get the non-finite policy of the reference code instead of the update:
    ``nonfinite="shrink"`` sets θ ← (θ − center)·shrink_ratio + center, ``"skip"`` leaves θ;
    the momentum is untouched either way. ``foreach``/``fused`` choose the implementation
    (see ``functional._utils.select_path``); all of them compute the same update. Momentum
    in another dtype than its parameter (e.g. bf16) and ``stochastic_rounding`` of bf16/fp16
    parameters (``None``/``True``: on for them) run the math in fp32: inside the Triton
    kernel on CUDA, elsewhere on upcast copies (``functional.precision``).

    DTensor (FSDP2) tensors take a simple path (:func:`_dtensor_tiger`): the momentum and the
    update run on the local slices, and the RMS factor is computed over the whole tensor (or
    whole rows) across the ranks. ``finite`` must then be the same on every rank (as
    ``finite_mask`` returns it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if nonfinite not in ("shrink", "skip"):
        raise ValueError(f"nonfinite must be 'shrink' or 'skip', got {nonfinite!r}")
    if not params:
        return
    if any_dtensor(params):
        _dtensor_tiger(
            params,
            grads,
            exp_avgs,
            lr=lr,
            beta=beta,
            weight_decay=0.0 if kind == "elementwise" else weight_decay,
            kind=kind,
            rms_floor=rms_floor,
            grad_accum_steps=grad_accum_steps,
            first_micro_step=first_micro_step,
            last_micro_step=last_micro_step,
            maximize=maximize,
            finite=finite,
            nonfinite=nonfinite,
            center=center,
            shrink_ratio=shrink_ratio,
            stochastic_rounding=stochastic_rounding,
        )
        return
    path = select_path(foreach, fused, params)
    if path == "triton":
        from danlu.algorithms.tiger.triton import tiger_triton

        tiger_triton(
            list(params),
            list(grads),
            list(exp_avgs),
            lr=lr,
            beta=beta,
            weight_decay=0.0 if kind == "elementwise" else weight_decay,
            kind=kind,
            rms_floor=rms_floor,
            grad_accum_steps=grad_accum_steps,
            first_micro_step=first_micro_step,
            last_micro_step=last_micro_step,
            maximize=maximize,
            finite=finite,
            nonfinite=nonfinite,
            center=center,
            shrink_ratio=shrink_ratio,
            stochastic_rounding=stochastic_rounding,
        )
        return
    update = functools.partial(
        _update,
        path,
        lr=lr,
        beta=beta,
        weight_decay=weight_decay,
        kind=kind,
        rms_floor=rms_floor,
        grad_accum_steps=grad_accum_steps,
        first_micro_step=first_micro_step,
        last_micro_step=last_micro_step,
        maximize=maximize,
        stochastic_rounding=stochastic_rounding,
    )
    if finite is not None and torch.compiler.is_compiling():
        # inside torch.compile the flags are not read to the host (a graph break, and a
        # recompile whenever they change): every tensor is updated and the non-finite ones
        # are put back (shrunk) with torch.where
        _masked_update(
            params,
            exp_avgs,
            finite,
            lambda: update(params, grads, exp_avgs),
            nonfinite=nonfinite,
            center=center,
            shrink_ratio=shrink_ratio,
        )
        return
    if finite is not None:
        flags = finite.tolist()
        bad = [p for p, ok in zip(params, flags, strict=True) if not ok]
        if nonfinite == "shrink":
            shrink_(bad, center=center, ratio=shrink_ratio)
        keep = [i for i, ok in enumerate(flags) if ok]
        params = [params[i] for i in keep]
        grads = [grads[i] for i in keep]
        exp_avgs = [exp_avgs[i] for i in keep]
        if not params:
            return
    update(params, grads, exp_avgs)


def _update(
    path: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
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
    stochastic_rounding: bool | None,
) -> None:
    """The update of every tensor given (finite gradients) on ``path``."""
    settings: dict[str, Any] = {
        "lr": lr,
        "beta": beta,
        "weight_decay": 0.0 if kind == "elementwise" else weight_decay,
        "kind": kind,
        "rms_floor": rms_floor,
        "grad_accum_steps": grad_accum_steps,
        "first_micro_step": first_micro_step,
        "last_micro_step": last_micro_step,
        "maximize": maximize,
    }
    if needs_upcast_copies(path, params, grads, [exp_avgs], stochastic_rounding):
        # one tensor at a time (as upcast_step goes anyway): the fp32 copies no longer show
        # the momentum's own dtype, so its bound is passed along
        for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
            upcast_step(
                _single_tensor_tiger,
                [param],
                [grad],
                [[exp_avg]],
                stochastic_rounding=stochastic_rounding,
                grad_bound=average_bound(exp_avg.dtype, param.dtype),
                **settings,
            )
        return
    _implementation(path)(list(params), list(grads), list(exp_avgs), **settings)


def _masked_update(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    finite: Tensor,
    update: Callable[[], None],
    *,
    nonfinite: str,
    center: float,
    shrink_ratio: float,
) -> None:
    """``update()`` of every tensor, then θ and m of the tensors whose ``finite`` flag is
    False put back to their old values (θ shrunk with ``nonfinite="shrink"``): the policy of
    :func:`tiger` without reading the flags to the host."""
    old_params = [p.clone() for p in params]
    old_exp_avgs = [m.clone() for m in exp_avgs]
    update()
    for i, (p, m, p0, m0) in enumerate(
        zip(params, exp_avgs, old_params, old_exp_avgs, strict=True)
    ):
        ok = finite[i].to(p.device)
        if nonfinite == "shrink":
            shrink_([p0], center=center, ratio=shrink_ratio)
        p.copy_(torch.where(ok, p, p0))
        m.copy_(torch.where(ok.to(m.device), m, m0))


def _implementation(path: str) -> Callable[..., None]:
    if path == "single":
        return _single_tensor_tiger
    if path == "foreach":
        return _multi_tensor_tiger
    if path == "chunked":
        from danlu.algorithms.tiger.fast import tiger_chunked

        return tiger_chunked
    from danlu.algorithms.tiger.fast import tiger_compiled

    return tiger_compiled


def _single_tensor_tiger(
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
    grad_bound: float | None = None,
) -> None:
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        # η reads θ only, which the momentum update leaves alone: computed first
        step_size = (
            tiger_step_size(param, lr=lr, kind=kind, rms_floor=rms_floor)
            if last_micro_step
            else 0.0
        )
        _tiger_with_step_size(
            [param],
            [grad],
            [exp_avg],
            step_size=step_size,
            beta=beta,
            weight_decay=weight_decay,
            grad_accum_steps=grad_accum_steps,
            first_micro_step=first_micro_step,
            last_micro_step=last_micro_step,
            maximize=maximize,
            grad_bound=grad_bound,
        )


def _multi_tensor_tiger(
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
    grad_bound: float | None = None,
) -> None:
    for (device_params, device_grads, device_exp_avgs), _ in group_by_device_and_dtype(
        [params, grads, exp_avgs]
    ):
        if maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        bounds = (
            average_bounds(device_params, device_exp_avgs) if grad_bound is None else grad_bound
        )
        device_grads = saturate_all(device_grads, bounds, owned=maximize)
        if grad_accum_steps == 1:
            torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta)
        else:
            if first_micro_step:
                torch._foreach_mul_(device_exp_avgs, beta)
            torch._foreach_add_(device_exp_avgs, device_grads, alpha=(1 - beta) / grad_accum_steps)
        if not last_micro_step:
            continue
        updates = torch._foreach_sign(device_exp_avgs)
        if weight_decay != 0:
            torch._foreach_add_(updates, device_params, alpha=weight_decay)
        if kind == "elementwise":
            torch._foreach_mul_(updates, 0.5 * lr)
        elif kind == "matrix":
            dtype = torch.promote_types(device_params[0].dtype, torch.float32)
            norms = list(torch._foreach_norm(device_params, 2, dtype=dtype))
            torch._foreach_div_(norms, [math.sqrt(max(p.numel(), 1)) for p in device_params])
            torch._foreach_clamp_min_(norms, rms_floor)
            torch._foreach_mul_(norms, lr)
            torch._foreach_mul_(updates, norms)
        else:
            for update, param in zip(updates, device_params, strict=True):
                update.mul_(tiger_step_size(param, lr=lr, kind=kind, rms_floor=rms_floor))
        torch._foreach_sub_(device_params, updates)


def _dtensor_tiger(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
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
    finite: Tensor | None,
    nonfinite: str,
    center: float,
    shrink_ratio: float,
    stochastic_rounding: bool | None,
) -> None:
    """Tiger on DTensors: η of every tensor from the whole tensor (or whole rows), one
    collective for all of them; the momentum and the update on the local slices."""
    flags = [True] * len(params) if finite is None else finite.tolist()
    step_sizes: list[float | Tensor] = [0.0] * len(params)
    if last_micro_step:
        stepped = [i for i, ok in enumerate(flags) if ok]
        if kind == "elementwise":
            for i in stepped:
                step_sizes[i] = 0.5 * lr
        else:  # η from θ_{t−1}: before any parameter of the call changes
            sizes = _sharded_step_sizes(
                [params[i] for i in stepped], lr=lr, kind=kind, rms_floor=rms_floor
            )
            for i, size in zip(stepped, sizes, strict=True):
                step_sizes[i] = size
    for param, grad, exp_avg, ok, step_size in zip(
        params, grads, exp_avgs, flags, step_sizes, strict=True
    ):
        p, g, m = local(param), local(grad), local(exp_avg)
        if not ok:
            if nonfinite == "shrink":
                shrink_([p], center=center, ratio=shrink_ratio)
            continue
        settings: dict[str, Any] = {
            "step_size": step_size,
            "beta": beta,
            "weight_decay": weight_decay,
            "grad_accum_steps": grad_accum_steps,
            "first_micro_step": first_micro_step,
            "last_micro_step": last_micro_step,
            "maximize": maximize,
            "grad_bound": average_bound(m.dtype, p.dtype),
        }
        if needs_upcast([p], [[m]], stochastic_rounding):
            upcast_step(
                _tiger_with_step_size,
                [p],
                [g],
                [[m]],
                stochastic_rounding=stochastic_rounding,
                **settings,
            )
        else:
            _tiger_with_step_size([p], [g], [m], **settings)


def _tiger_with_step_size(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    step_size: float | Tensor,
    beta: float,
    weight_decay: float,
    grad_accum_steps: int,
    first_micro_step: bool,
    last_micro_step: bool,
    maximize: bool,
    grad_bound: float | None = None,
) -> None:
    """The ops of :func:`_single_tensor_tiger` with η given (already reduced over the ranks).
    ``grad_bound``: the saturation bound of every gradient (default: each momentum's
    :func:`~danlu.core.overflow.average_bound`)."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        if maximize:
            grad = -grad
        bound = average_bound(exp_avg.dtype, param.dtype) if grad_bound is None else grad_bound
        grad = saturate(grad, bound, owned=maximize)
        if grad_accum_steps == 1:
            exp_avg.lerp_(grad, 1 - beta)
        else:
            if first_micro_step:
                exp_avg.mul_(beta)
            exp_avg.add_(grad, alpha=(1 - beta) / grad_accum_steps)
        if not last_micro_step:
            continue
        update = torch.sign(exp_avg)
        if weight_decay != 0:
            update.add_(param, alpha=weight_decay)
        param.sub_(update.mul_(step_size))

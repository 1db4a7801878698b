"""Tiger, docs/reference/algorithms.md#tiger-rule: the functional entry and its paths (single
tensor, foreach, DTensor); tensors in, tensors updated in place.

The rule itself, one tensor at a time, is :func:`danlu.algorithms.tiger.rule.tiger_update_`;
the single-tensor path is a loop over it, and the other paths use its named pieces (η, the
gradient read, the momentum update, the update direction) where they can.

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
(``core.overflow.average_bound``), so the momentum stays finite for every finite
gradient (+max then −max used to make it ±inf, then NaN); gradients within the bound are read
unchanged, bit for bit. Non-finite gradients go to the non-finite policy as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from danlu.algorithms.tiger.rule import (
    TigerHyper,
    eta_from_rms_,
    rms_root,
    step_size,
    tiger_update_,
)
from danlu.core.dtensor import any_dtensor, is_dtensor, local, sharded_sums
from danlu.core.hyper import accepts_keywords
from danlu.core.nonfinite import shrink_
from danlu.core.overflow import average_bound, average_bounds, saturate_all
from danlu.core.precision import needs_upcast, needs_upcast_copies, upcast_step
from danlu.core.shell import KINDS
from danlu.core.tensors import group_by_device_and_dtype, select_path

__all__ = ["KINDS", "tiger", "tiger_step", "tiger_step_size"]


def tiger_step_size(
    param: Tensor, *, lr: float | Tensor, kind: str, rms_floor: float
) -> float | Tensor:
    """η for one tensor: 0.5·α, α·max(RMS(θ), floor), or a column of per-row values
    (:func:`~danlu.algorithms.tiger.rule.step_size`).

    For a DTensor (FSDP2) parameter the RMS is over the whole tensor (or whole rows), summed
    over the ranks that shard it; the result is laid out like the local slice."""
    if kind != "elementwise" and is_dtensor(param):
        return _sharded_step_sizes([param], lr=lr, kind=kind, rms_floor=rms_floor)[0]
    return step_size(param, lr=lr, kind=kind, rms_floor=rms_floor)


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
    totals = sharded_sums(squares, params, dims)
    return [
        eta_from_rms_(total.sqrt_().div_(rms_root(param, kind)), lr, rms_floor)
        for param, total in zip(params, totals, strict=True)
    ]


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
    (see ``core.tensors.select_path``); all of them compute the same update. Momentum
    in another dtype than its parameter (e.g. bf16) and ``stochastic_rounding`` of bf16/fp16
    parameters (``None``/``True``: on for them) run the math in fp32: inside the Triton
    kernel on CUDA, elsewhere on upcast copies (``core.precision``).

    DTensor (FSDP2) tensors take a simple path (:func:`_dtensor_tiger`): the momentum and the
    update run on the local slices, and the RMS factor is computed over the whole tensor (or
    whole rows) across the ranks. ``finite`` must then be the same on every rank (as
    ``finite_mask`` returns it).
    """
    hyper = TigerHyper.of(
        lr=lr,
        beta=beta,
        weight_decay=weight_decay,
        kind=kind,
        rms_floor=rms_floor,
        grad_accum_steps=grad_accum_steps,
        first_micro_step=first_micro_step,
        last_micro_step=last_micro_step,
        maximize=maximize,
        nonfinite=nonfinite,
        center=center,
        shrink_ratio=shrink_ratio,
        stochastic_rounding=stochastic_rounding,
    )
    tiger_step(params, grads, exp_avgs, hyper, finite=finite, foreach=foreach, fused=fused)


def tiger_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hyper: TigerHyper,
    *,
    finite: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """:func:`tiger` with its settings as one :class:`TigerHyper`: the path is chosen here."""
    if not params:
        return
    if any_dtensor(params):
        _dtensor_tiger(params, grads, exp_avgs, hyper, finite)
        return
    path = select_path(foreach, fused, params)
    if path == "triton":
        from danlu.algorithms.tiger.triton import tiger_triton

        tiger_triton(list(params), list(grads), list(exp_avgs), hyper, finite=finite)
        return
    if finite is not None and torch.compiler.is_compiling():
        # inside torch.compile the flags are not read to the host (a graph break, and a
        # recompile whenever they change): every tensor is updated and the non-finite ones
        # are put back (shrunk) with torch.where
        _masked_update(
            params, exp_avgs, finite, lambda: _update(path, params, grads, exp_avgs, hyper), hyper
        )
        return
    if finite is not None:
        flags = finite.tolist()
        bad = [p for p, ok in zip(params, flags, strict=True) if not ok]
        if hyper.nonfinite == "shrink":
            shrink_(bad, center=hyper.center, ratio=hyper.shrink_ratio)
        keep = [i for i, ok in enumerate(flags) if ok]
        params = [params[i] for i in keep]
        grads = [grads[i] for i in keep]
        exp_avgs = [exp_avgs[i] for i in keep]
        if not params:
            return
    _update(path, params, grads, exp_avgs, hyper)


def _update(
    path: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hyper: TigerHyper,
) -> None:
    """The update of every tensor given (finite gradients) on ``path``."""
    if needs_upcast_copies(path, params, grads, [exp_avgs], hyper.stochastic_rounding):
        # one tensor at a time (as upcast_step goes anyway): the fp32 copies no longer show
        # the momentum's own dtype, so its bound is passed along
        for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
            upcast_step(
                _single_tensor_tiger,
                [param],
                [grad],
                [[exp_avg]],
                stochastic_rounding=hyper.stochastic_rounding,
                hyper=hyper,
                grad_bound=average_bound(exp_avg.dtype, param.dtype),
            )
        return
    _implementation(path)(list(params), list(grads), list(exp_avgs), hyper)


def _masked_update(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    finite: Tensor,
    update: Callable[[], None],
    hyper: TigerHyper,
) -> None:
    """``update()`` of every tensor, then θ and m of the tensors whose ``finite`` flag is
    False put back to their old values (θ shrunk with ``nonfinite="shrink"``): the policy of
    :func:`tiger_step` without reading the flags to the host."""
    old_params = [p.clone() for p in params]
    old_exp_avgs = [m.clone() for m in exp_avgs]
    update()
    for i, (p, m, p0, m0) in enumerate(
        zip(params, exp_avgs, old_params, old_exp_avgs, strict=True)
    ):
        ok = finite[i].to(p.device)
        if hyper.nonfinite == "shrink":
            shrink_([p0], center=hyper.center, ratio=hyper.shrink_ratio)
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


@accepts_keywords(TigerHyper)
def _single_tensor_tiger(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: TigerHyper,
    *,
    grad_bound: float | None = None,
) -> None:
    """The reference rule, one tensor at a time."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        tiger_update_(param, grad, exp_avg, hyper, grad_bound=grad_bound)


def _multi_tensor_tiger(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: TigerHyper,
    *,
    grad_bound: float | None = None,
) -> None:
    """:func:`~danlu.algorithms.tiger.rule.tiger_update_` restated with foreach ops, one
    call per device and dtype (compiled as it is by ``fast.tiger_compiled``)."""
    for (device_params, device_grads, device_exp_avgs), _ in group_by_device_and_dtype(
        [params, grads, exp_avgs]
    ):
        # rule.read_grad
        if hyper.maximize:
            device_grads = list(torch._foreach_neg(device_grads))
        bounds = (
            average_bounds(device_params, device_exp_avgs) if grad_bound is None else grad_bound
        )
        device_grads = saturate_all(device_grads, bounds, owned=hyper.maximize)
        # rule.accumulate_
        if hyper.grad_accum_steps == 1:
            torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - hyper.beta)
        else:
            if hyper.first_micro_step:
                torch._foreach_mul_(device_exp_avgs, hyper.beta)
            torch._foreach_add_(device_exp_avgs, device_grads, alpha=hyper.grad_weight)
        if not hyper.last_micro_step:
            continue
        # rule.direction, then θ ← θ − η·direction
        updates = torch._foreach_sign(device_exp_avgs)
        if hyper.decay != 0:
            torch._foreach_add_(updates, device_params, alpha=hyper.decay)
        if hyper.kind == "matrix":
            # rule.step_size of every tensor: the norms in one foreach call
            dtype = torch.promote_types(device_params[0].dtype, torch.float32)
            norms = list(torch._foreach_norm(device_params, 2, dtype=dtype))
            torch._foreach_div_(norms, [rms_root(p, "matrix") for p in device_params])
            torch._foreach_clamp_min_(norms, hyper.rms_floor)  # rule.eta_from_rms_
            torch._foreach_mul_(norms, hyper.lr)
            torch._foreach_mul_(updates, norms)
        else:
            for update, param in zip(updates, device_params, strict=True):
                update.mul_(
                    step_size(param, lr=hyper.lr, kind=hyper.kind, rms_floor=hyper.rms_floor)
                )
        torch._foreach_sub_(device_params, updates)


def _dtensor_tiger(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hyper: TigerHyper,
    finite: Tensor | None,
) -> None:
    """Tiger on DTensors: η of every tensor from the whole tensor (or whole rows), one
    collective for all of them; the rule on the local slices."""
    flags = [True] * len(params) if finite is None else finite.tolist()
    etas: list[float | Tensor | None] = [None] * len(params)
    if hyper.last_micro_step:
        # η from θ_{t−1}: before any parameter of the call changes
        stepped = [i for i, ok in enumerate(flags) if ok]
        lr, kind, floor = hyper.lr, hyper.kind, hyper.rms_floor
        sizes: Sequence[float | Tensor]
        if kind == "elementwise":
            sizes = [step_size(params[i], lr=lr, kind=kind, rms_floor=floor) for i in stepped]
        else:  # one collective for all of them
            sizes = _sharded_step_sizes(
                [params[i] for i in stepped], lr=lr, kind=kind, rms_floor=floor
            )
        for i, size in zip(stepped, sizes, strict=True):
            etas[i] = size
    for param, grad, exp_avg, ok, eta in zip(params, grads, exp_avgs, flags, etas, strict=True):
        p, g, m = local(param), local(grad), local(exp_avg)
        if not ok:
            if hyper.nonfinite == "shrink":
                shrink_([p], center=hyper.center, ratio=hyper.shrink_ratio)
            continue
        bound = average_bound(m.dtype, p.dtype)
        if needs_upcast([p], [[m]], hyper.stochastic_rounding):
            upcast_step(
                _rule_on_lists,
                [p],
                [g],
                [[m]],
                stochastic_rounding=hyper.stochastic_rounding,
                hyper=hyper,
                eta=eta,
                grad_bound=bound,
            )
        else:
            tiger_update_(p, g, m, hyper, eta=eta, grad_bound=bound)


def _rule_on_lists(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    hyper: TigerHyper,
    eta: float | Tensor | None,
    grad_bound: float,
) -> None:
    """The rule with η given, in ``upcast_step``'s calling convention (one tensor per list)."""
    (param,), (grad,), (exp_avg,) = params, grads, exp_avgs
    tiger_update_(param, grad, exp_avg, hyper, eta=eta, grad_bound=grad_bound)

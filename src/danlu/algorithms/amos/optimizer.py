"""The Amos optimizer shell, docs/reference/algorithms.md#amos-optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from danlu.algorithms.amos.functional import amos
from danlu.algorithms.amos.rule import AMOS_EPS, SLOT_RULES, amos_default_eta, amos_slot_shape
from danlu.core.dtensor import new_state
from danlu.core.precision import check_stochastic_rounding
from danlu.core.shell import (
    KINDS,
    DanluOptimizer,
    GroupTensors,
    ParamsT,
    StepBuckets,
    check_beta,
    check_bool,
    check_choice,
    check_finite,
    check_implementation,
    check_non_negative,
    check_positive,
)
from danlu.core.tensors import statistics_dtype
from danlu.registry import Baseline, CompareSettings, register

__all__ = ["ETA_RULES", "Amos"]

ETA_RULES = ("auto", "output")


def resolve_eta(eta: float | str, param: Tensor, kind: str | None) -> float:
    """η for one tensor of a group: a number as given; ``"auto"``: 0.5 for element-wise tensors
    (``kind="elementwise"``, or ndim ≤ 1 without a kind), √(2/fan_in) otherwise; ``"output"``:
    √(1/fan_in) (0.5 for element-wise tensors)."""
    if not isinstance(eta, str):
        return float(eta)
    elementwise = kind == "elementwise" if kind is not None else param.dim() <= 1
    return amos_default_eta(
        param.shape, rule="he" if eta == "auto" else "lecun", elementwise=elementwise
    )


class Amos(DanluOptimizer):
    r"""Amos, docs/reference/algorithms.md#amos-optimizer; Tian & Parikh 2022 (arXiv 2210.11693);
    kexue 9344; code google-research/jestimator ``amos.py`` (whose semantics this follows exactly).

    .. math::
        \gamma_t = \sqrt{f}\,c_t\,\xi^2\,\frac{\overline{g^2}}{\hat v_t},\quad
        \delta_t = f\,d_t\Big(-\frac{\xi\eta}{\sqrt{\hat v_t}}\,g_t
                   - \tfrac12\gamma_t(\theta_{t-1} - \theta_c)\Big),\quad
        b_t = b_{t-1} + \gamma_t(f + b_{t-1})

    with :math:`c_t=(1+\zeta\sqrt\xi\,b_{t-1})^{-1/2}`,
    :math:`d_t=(1+\zeta\sqrt{\xi\eta}\,b_{t-1})^{-1}`, :math:`\hat v` the bias-corrected EMA
    (rate β) of the mean square gradient over the slot's reduced axes, f = ``finetune_rate``,
    ξ = ``lr`` and θ_c = the group's ``center``. The learning-rate decay (d_t) and the weight
    decay (½γθ, adaptive) both come from b, so no total step count is needed. Steps count from 1.

    **ξ (``lr``)** is global: jestimator recommends ξ ≈ 1/√N with N the number of training
    batches (MNIST, 60000/32 batches: 0.0231). The default ``1e-3`` is 1/√N for N = 10⁶
    batches, a long pre-training run (and pytorch_optimizer.Amos's default); use 1/√N for
    shorter runs. ``1 − beta`` should be of the order of ξ.

    **η (per group ``eta``)** is the expected scale of the tensor's entries. ``"auto"`` (the
    default) applies the docs/reference/algorithms.md#amos-optimizer rules per tensor: 0.5 for
    biases and norm parameters (``kind="elementwise"``, or ndim ≤ 1 in an untagged group),
    √(2/fan_in) for hidden matrices, conv kernels and embeddings (fan_in = numel/shape[0] in
    PyTorch's layout). ``"output"`` gives √(1/fan_in), the rule for the output layer; or pass a
    number. ``danlu.param_groups(model, output_layer=model.head)`` tags the groups for you.

    **Slots (per group ``slots``)**: v and b are reduced to ``"per_output"`` (default: one
    scalar for tensors with ndim ≤ 1, one per index of axis 0 otherwise — an output feature of
    a Linear or conv kernel, a row of an Embedding), ``"scalar"`` (one per tensor, as
    pytorch_optimizer.Amos) or ``"full"`` (the parameter's shape). They are float32 (float64
    for float64 params) whatever the parameter dtype, and fixed at the first step.

    **Norm gains.** Amos decays θ toward 0 (docs/reference/algorithms.md#amos-edge-cases). A group's
    ``center`` (1.0 for norm gains in ``danlu.param_groups``) makes it decay toward that value
    instead, i.e. Amos runs on θ − center, the reparametrisation γ = 1 + γ′
    docs/reference/algorithms.md suggests. jestimator has no such option (it decays LayerNorm scales
    toward 0 with η = 1).

    ``init_b`` (> 0 for tensors restored from a pre-trained checkpoint, roughly in proportion
    to the pre-training epochs) and ``finetune_rate`` are jestimator's ``init_b_fn`` and
    ``finetune_rate``; ``momentum`` is an EMA of δ without debiasing, applied after the step;
    ``clip_value`` clips each gradient entry to [−clip_value, clip_value] first.

    The rule for one tensor is ``danlu.algorithms.amos.rule.amos_update_``; every path (for-loop,
    foreach, compiled, FSDP2) computes the same numbers.

    **Under FSDP2** the mean square over a slot's reduced axes is over the whole tensor (one
    all-reduce per step for all tensors); slots are sharded like the parameter along the axes
    they keep and replicated along the ones they reduce.

    Deviations from the reference:
        * ``center`` (above) is an addition; ``center=0`` is jestimator.
        * per-group keys replace jestimator's ``eta_fn``/``shape_fn``/``init_b_fn`` callables
          (param groups must stay serialisable in ``state_dict``).

    Args:
        params: parameters, named parameters or param groups (keys ``eta``, ``slots``,
            ``init_b``, ``finetune_rate``, ``kind``, ``center`` and the arguments below).
        lr: the global learning rate ξ (≥ 0).
        eta: η > 0, ``"auto"`` or ``"output"``.
        beta: decay rate of the squared-gradient EMA, in [0, 1) (jestimator's 0.999).
        momentum: μ in [0, 1); 0 keeps no momentum. Not for cycling: ``step()`` refuses a
            group that ``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True`` has written
            (pass ``cycle_momentum=False``; see docs/recipes.md, "Schedulers").
        clip_value: gradient clipping value (> 0) or None.
        slots: ``"per_output"``, ``"scalar"`` or ``"full"``.
        init_b: initial value of b (≥ 0).
        finetune_rate: f ≥ 0.
        zeta: ζ ≥ 0 for both decay factors c and d (jestimator's 0.25).
        eps: floor ε > 0 of v (jestimator's 2⁻¹²⁵).
        stochastic_rounding: how bf16/fp16 parameters are written. ``None`` (default) or
            ``True``: the parameter's update runs in fp32 and the result is rounded
            stochastically (unbiased), so updates below the dtype's spacing are not lost
            (pytorch#120376); the noise comes from torch's global RNG of the parameter's
            device, reproducible under ``torch.manual_seed``. ``False``: round to nearest.
            fp32/fp64 parameters are never affected; the state keeps its dtype.
        maximize: ascend instead of descend (the user's gradients are not modified).
        foreach: use the multi-tensor path; ``None`` chooses like torch.optim.
        fused: ``True`` runs the math compiled with ``torch.compile`` (one fused loop per
            tensor; Triton code generated by Inductor on CUDA; the first step compiles).
            ``None`` (default) and ``False``: the foreach path or the for-loop.
    """

    _display_name = "danlu.Amos"
    _float32_state_keys = ("exp_avg_sq", "b")
    _param_shaped_keys = ("exp_avg",)

    def _expected_state_shape(
        self, p: Tensor, group: dict[str, Any], key: str
    ) -> tuple[int, ...] | None:
        if key in ("exp_avg_sq", "b"):
            return amos_slot_shape(p.shape, group["slots"])
        return super()._expected_state_shape(p, group, key)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        eta: float | str = "auto",
        beta: float = 0.999,
        momentum: float = 0.0,
        clip_value: float | None = None,
        *,
        slots: str = "per_output",
        init_b: float = 0.0,
        finetune_rate: float = 1.0,
        zeta: float = 0.25,
        eps: float = AMOS_EPS,
        stochastic_rounding: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "eta": eta,
            "beta": beta,
            "momentum": momentum,
            "clip_value": clip_value,
            "slots": slots,
            "init_b": init_b,
            "finetune_rate": finetune_rate,
            "zeta": zeta,
            "eps": eps,
            "kind": None,
            "center": 0.0,
            "stochastic_rounding": stochastic_rounding,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        check_non_negative(f"{where}lr", group["lr"])
        eta = group["eta"]
        if isinstance(eta, str):
            check_choice(f"{where}eta", eta, ETA_RULES)
        else:
            check_positive(f"{where}eta", eta)
        check_beta(f"{where}beta", group["beta"])
        check_beta(f"{where}momentum", group["momentum"])
        if group["clip_value"] is not None:
            check_positive(f"{where}clip_value", group["clip_value"])
        check_choice(f"{where}slots", group["slots"], SLOT_RULES)
        check_non_negative(f"{where}init_b", group["init_b"])
        check_non_negative(f"{where}finetune_rate", group["finetune_rate"])
        check_non_negative(f"{where}zeta", group["zeta"])
        check_positive(f"{where}eps", group["eps"])
        check_choice(f"{where}kind", group["kind"], (None, *KINDS))
        check_finite(f"{where}center", group["center"])
        if isinstance(group["center"], Tensor):
            raise ValueError(f"{where}center must be a finite float, got {group['center']!r}")
        check_bool(f"{where}maximize", group["maximize"])
        check_stochastic_rounding(group.get("stochastic_rounding"), where=where)
        check_implementation(group, where=where)
        refuse_cycled_momentum(group, where=where)

    def _prepare(self, gathered: list[GroupTensors]) -> list[tuple[Any, ...]]:
        return [self._prepare_group(work) for work in gathered]

    def _prepare_group(self, work: GroupTensors) -> tuple[Any, ...]:
        group = work.group
        lists: tuple[list[Any], ...] = ([], [], [], [], [])
        etas: list[float] = []
        steps: list[Tensor] = []
        for p, g in zip(work.params, work.grads, strict=True):
            dtype = statistics_dtype(p.dtype)
            shape = amos_slot_shape(p.shape, group["slots"])
            v = self._state_tensor(
                p, "exp_avg_sq", lambda p=p, s=shape, d=dtype: new_state(p, s, d)
            )
            b = self._state_tensor(
                p,
                "b",
                lambda p=p, s=shape, d=dtype: new_state(p, s, d, fill=float(group["init_b"])),
            )
            exp_avg = None
            if group["momentum"] > 0:
                exp_avg = self._state_tensor(p, "exp_avg", lambda p=p: torch.zeros_like(p))
            steps.append(
                self._state_tensor(p, "step", lambda: torch.tensor(0.0, dtype=torch.float32))
            )
            etas.append(resolve_eta(group["eta"], p, group["kind"]))
            for lst, value in zip(lists, (p, g, v, b, exp_avg), strict=True):
                lst.append(value)
        return group, lists, etas, StepBuckets.build(steps, lambda i: lists[0][i].numel() > 0)

    def _apply(self, plan: list[tuple[Any, ...]]) -> None:
        for group, lists, etas, buckets in plan:
            for b, indices in enumerate(buckets.indices):
                amos(
                    *([lst[i] for i in indices] for lst in lists),
                    step=buckets.step(b),
                    lr=group["lr"],
                    eta=[etas[i] for i in indices],
                    beta=group["beta"],
                    zeta=group["zeta"],
                    finetune_rate=group["finetune_rate"],
                    center=float(group["center"]),
                    momentum=group["momentum"],
                    clip_value=group["clip_value"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    stochastic_rounding=group.get("stochastic_rounding"),
                    foreach=group["foreach"],
                    fused=group.get("fused"),  # absent from state dicts saved before it existed
                )
            buckets.advance()


def _compare_rule(base: Baseline) -> dict[str, Any]:
    """ξ = 1/√N with N the number of batches in the training data (the Amos paper)."""
    import math  # (the module's imports are left to the algorithm's own changes)

    return {"lr": 1 / math.sqrt(base.batches_per_epoch)}


register(
    "amos",
    Amos,
    reference="docs/reference/algorithms.md#amos-optimizer",
    summary="adaptive weight decay toward a model-oriented scale η, reduced slots (jestimator)",
    state_bytes="≈0 (reduced v, b; no momentum)",
    state_bytes_accum="≈4",
    # no chunked path (slot means need whole tensors); fused=True compiles on CUDA too
    paths={
        "single": {"foreach": False, "fused": False},
        "foreach": {"foreach": True},
        "compiled": {"fused": True},
        "dtensor": {},
    },
    compare=CompareSettings(
        rule=_compare_rule,
        rule_note="ξ = 1/√N, N = batches per epoch (Amos paper, blog 9344)",
        rule_claim="Amos: ξ = 1/√N (N batches per epoch) needs no tuning",
        blog="9344",
        centres={
            "digits": 6.7e-3,  # ξ = 1/√N is 0.21 here: 32 times too large for 1500 steps
            "charlm": None,  # ξ = 1/√N: the rule is the best of ×¼ … ×4
        },
        colour="#8c564b",
        rank=5,
    ),
)


# torch's OneCycleLR and CyclicLR (cycle_momentum=True) write these keys into every group.
CYCLED_MOMENTUM_KEYS = ("max_momentum", "base_momentum")


def refuse_cycled_momentum(group: dict[str, Any], *, where: str) -> None:
    """Raise ValueError if a cyclic lr scheduler is cycling Amos's ``momentum``.

    torch's schedulers find the key ``momentum`` in ``defaults`` and cycle it between 0.85 and
    0.95 (0.8 and 0.9), which turns on a momentum that Amos keeps off by default, silently.
    """
    if any(key in group for key in CYCLED_MOMENTUM_KEYS):
        raise ValueError(
            f"{where}momentum is being cycled by a torch OneCycleLR or CyclicLR scheduler "
            f"(the group holds 'max_momentum' and 'base_momentum', and now momentum="
            f"{group['momentum']!r}); Amos's momentum is an optional smoothing of the update, "
            "off by default (0), and cycling it changes the algorithm. Create the scheduler "
            "with cycle_momentum=False (on a new optimizer: this one's momentum was already "
            "overwritten)"
        )

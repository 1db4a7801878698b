"""The AdaFactor optimizer shell, docs/reference/algorithms.md#adafactor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from danlu.algorithms.adafactor.functional import adafactor_step
from danlu.algorithms.adafactor.rule import (
    FACTORED_DIMS,
    MOMENTUM_MODES,
    AdaFactorHyper,
    adafactor_factored_axes,
)
from danlu.core.dtensor import new_state
from danlu.core.precision import check_stochastic_rounding
from danlu.core.shell import (
    DanluOptimizer,
    GroupTensors,
    ParamsT,
    StepBuckets,
    check_beta,
    check_bool,
    check_choice,
    check_implementation,
    check_in_range,
    check_int_at_least,
    check_non_negative,
    check_positive,
)
from danlu.core.tensors import statistics_dtype
from danlu.registry import CompareSettings, register

__all__ = ["AdaFactor"]

_STATISTICS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


class AdaFactor(DanluOptimizer):
    r"""AdaFactor, docs/reference/algorithms.md#adafactor; Shazeer & Stern 2018 (arXiv 1804.04235);
    the blog https://kexue.fm/archives/7302; code bert4keras ``AdaFactorV2`` and bojone/adafactor.
    The reference rule of one tensor is ``danlu.algorithms.adafactor.rule.adafactor_update_``.

    .. math::
        \hat v_t = \hat\beta_{2,t}\hat v_{t-1} + (1-\hat\beta_{2,t})(g_t^2+\epsilon_1)
        \ \text{(factored: row/column means)},\quad
        \hat u_t = \frac{g_t/\sqrt{\hat v_t}}{\max(1, \mathrm{RMS}(g_t/\sqrt{\hat v_t})/d)},\quad
        \theta_t = \theta_{t-1} - \alpha_t\lambda\theta_{t-1}
                   - \alpha_t\max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\hat u_t

    with :math:`\hat\beta_{2,t} = 1 - t^{-c}` (c = ``decay_rate``; 0 at t = 1, so there is no
    bias correction) unless a constant ``beta2`` is given. Steps count from 1.

    **Defaults** (docs/reference/algorithms.md#adafactor-defaults) are the reference code's
    (bert4keras, bojone/adafactor): ``lr=1e-3``, ``beta1=0``, the β̂ schedule, ε1 = 1e-30,
    ε2 = 1e-3, d = 1, parameter scaling on, ``min_dim_size_to_factor=128``; the paper and the
    blog give the same ε1, ε2, d and c = 0.8 (the paper defaults to the relative step instead
    of an lr). Edge cases: docs/reference/algorithms.md#adafactor-edge-cases.

    **Factoring.** ``factored_dims="two_largest"`` (the reference code, mesh-tensorflow style):
    a tensor with ndim ≥ 2 keeps a row statistic (mean of g²+ε1 over its largest axis) and a
    column statistic (mean over the second largest), every other axis kept, so an n×m matrix
    keeps n + m numbers instead of n·m and a (3, 3, 256, 512) kernel keeps 3·3·(256+512); it is
    not factored when its second largest dim is below ``min_dim_size_to_factor`` (128).
    ``factored_dims="last_two"`` factors the last two dims of every tensor with ndim ≥ 2 with no
    size threshold, as torch.optim.Adafactor and transformers.Adafactor do. The statistics are
    float32 (float64 for float64 params) whatever the parameter dtype: ε1 = 1e-30 underflows to
    0 in fp16, and a bf16 EMA stops moving once 1−β̂ falls below bf16's resolution.

    **Step size.** α_t is ``lr`` (``1e-3`` by default; the blog recommends an explicit lr of
    about 1e-3, even for fine-tuning). ``lr=None`` selects the paper's relative step
    α_t = min(1e-2, 1/√t) (× 0.05 without parameter scaling): the group's ``relative_step``
    becomes True and its ``lr`` holds the multiplier 1.0, so torch LR schedulers keep working
    and scale the relative step (``LinearLR(opt, start_factor=0.1)`` warms it up from 0.1·ρ_t);
    a scheduler never sees ``lr=None`` (the trap of transformers#11612). With
    ``multiply_by_parameter_scale`` the update (not the decay) is multiplied by
    s = max(ε2, RMS(θ_{t−1})), so a zero-initialised tensor still moves.

    **Weight decay** is decoupled (docs/reference/algorithms.md#conventions) and multiplied by the
    *effective step α_t*: ``lr``, or ``lr``·min(1e-2, 1/√t) (×0.05 without scaling) with ``lr=None``
    — but not by the parameter scale s, since λθ is already proportional to θ. That is
    θ ← θ(1 − α_tλ) − α_t s û, as bert4keras' ``extend_with_weight_decay_v2`` applied to
    AdaFactor does. torch.optim.Adafactor also multiplies λ by ``lr`` (equal while
    1/√t ≥ lr); transformers.Adafactor multiplies it by α_t·s; optax's ``add_decayed_weights``
    does not multiply it by the lr at all.

    **Momentum** (``beta1 > 0``) is an EMA of the clipped unit update û before parameter
    scaling (``momentum_mode="unit"``, bert4keras). ``momentum_mode="scaled"`` averages
    α_t·s·û instead and subtracts the average (transformers/fairseq; the order transformers#34506
    reports as a bug). The momentum has the parameter's dtype.

    **Under FSDP2** the row and column means, the update RMS and the parameter RMS are over
    the whole tensor (three all-reduces per step for all tensors together); a statistic that
    averages a sharded axis is replicated, the others are sharded like the parameter.

    Deviations from the reference:
        * ε1 is added to g² once (as in the blog and bojone/adafactor); bert4keras adds it a
          second time inside the square root, which changes nothing unless v̂ ≈ ε1.
        * ties between equal dims are broken toward the later axis (numpy's ``argpartition``
          happens to do the same for 2-D tensors).
        * v̂ (and R/mean(R), C) is floored at the smallest normal number before its inverse
          square root, so that a zero gradient with ε1 = 0 gives a 0 update, not NaN; each
          gradient is saturated where its squares would overflow the statistics' dtype, so
          one huge finite gradient cannot make the parameters NaN.
        * the other differences between the blog, the paper and the code (factored axes,
          momentum order) are choices here: docs/reference/algorithms.md#adafactor-differences.

    Args:
        params: parameters, named parameters or param groups.
        lr: step size α (≥ 0), or None for the relative step (see above).
        beta1: momentum coefficient in [0, 1); 0 (the default) keeps no momentum.
        decay_rate: c in (0, 1) for β̂_t = 1 − t^(−c).
        beta2: a constant β2 in [0, 1) instead of the schedule (None: the schedule).
        eps1: ε1 ≥ 0 added to g² (1e-30).
        eps2: ε2 ≥ 0, the floor of the parameter scale (1e-3).
        clip_threshold: d > 0 for the update clipping (1.0); None disables it.
        multiply_by_parameter_scale: multiply the update by max(ε2, RMS(θ)).
        weight_decay: decoupled decay λ ≥ 0, multiplied by α_t.
        relative_step: use lr·min(1e-2, 1/√t) as α_t (set by ``lr=None``).
        factored_dims: ``"two_largest"`` or ``"last_two"``.
        min_dim_size_to_factor: threshold (integer ≥ 0) for ``"two_largest"``.
        momentum_mode: ``"unit"`` (bert4keras) or ``"scaled"`` (transformers).
        stochastic_rounding: how bf16/fp16 parameters are written. ``None`` (default) or
            ``True``: the parameter's update runs in fp32 and the result is rounded
            stochastically (unbiased), so updates below the dtype's spacing are not lost
            (pytorch#120376); the noise comes from torch's global RNG of the parameter's
            device, reproducible under ``torch.manual_seed``. ``False``: round to nearest.
            fp32/fp64 parameters are never affected; the state keeps its dtype.
        maximize: ascend instead of descend (the user's gradients are not modified).
        foreach: use the multi-tensor path; ``None`` chooses like torch.optim.
        fused: ``True`` runs the Triton kernels on CUDA (the statistics stay torch ops, the
            clipping and parameter-scale sums and the update are fused passes); without
            Triton it runs the foreach path. ``None`` (default) uses Triton on CUDA when
            available and, on CPU, the single-tensor loop.
    """

    _display_name = "danlu.AdaFactor"
    _float32_state_keys = _STATISTICS
    _param_shaped_keys = ("exp_avg", "exp_avg_sq")

    def _expected_state_shape(
        self, p: Tensor, group: dict[str, Any], key: str
    ) -> tuple[int, ...] | None:
        axes = self._axes(p, group)
        if key in ("exp_avg_sq_row", "exp_avg_sq_col") and axes is not None:
            shape = list(p.shape)
            shape[axes[0] if key == "exp_avg_sq_row" else axes[1]] = 1
            return tuple(shape)
        return super()._expected_state_shape(p, group, key)

    def _check_loaded_state(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        factored = self._axes(p, group) is not None
        keys = ("exp_avg_sq_row", "exp_avg_sq_col") if factored else ("exp_avg_sq",)
        if any(key in state for key in _STATISTICS) and not all(key in state for key in keys):
            raise ValueError(
                f"{label}: the statistics were saved {'without' if factored else 'with'} "
                "factoring, but this group's factored_dims/min_dim_size_to_factor say otherwise"
            )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor | None = 1e-3,
        beta1: float = 0.0,
        decay_rate: float = 0.8,
        beta2: float | None = None,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float | None = 1.0,
        multiply_by_parameter_scale: bool = True,
        weight_decay: float = 0.0,
        *,
        relative_step: bool = False,
        factored_dims: str = "two_largest",
        min_dim_size_to_factor: int = 128,
        momentum_mode: str = "unit",
        stochastic_rounding: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_bool("relative_step", relative_step)  # before lr=None overrides it
        if lr is None:
            lr, relative_step = 1.0, True
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "decay_rate": decay_rate,
            "beta2": beta2,
            "eps1": eps1,
            "eps2": eps2,
            "clip_threshold": clip_threshold,
            "multiply_by_parameter_scale": multiply_by_parameter_scale,
            "weight_decay": weight_decay,
            "relative_step": relative_step,
            "factored_dims": factored_dims,
            "min_dim_size_to_factor": min_dim_size_to_factor,
            "momentum_mode": momentum_mode,
            "stochastic_rounding": stochastic_rounding,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "lr" in param_group and param_group["lr"] is None:
            param_group = {**param_group, "lr": 1.0, "relative_step": True}
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        check_non_negative(f"{where}lr", group["lr"])
        check_beta(f"{where}beta1", group["beta1"])
        check_in_range(
            f"{where}decay_rate", group["decay_rate"], 0.0, 1.0, low_open=True, high_open=True
        )
        if group["beta2"] is not None:
            check_beta(f"{where}beta2", group["beta2"])
        check_non_negative(f"{where}eps1", group["eps1"])
        check_non_negative(f"{where}eps2", group["eps2"])
        if group["clip_threshold"] is not None:
            check_positive(f"{where}clip_threshold", group["clip_threshold"])
        check_bool(f"{where}multiply_by_parameter_scale", group["multiply_by_parameter_scale"])
        check_non_negative(f"{where}weight_decay", group["weight_decay"])
        check_bool(f"{where}relative_step", group["relative_step"])
        check_choice(f"{where}factored_dims", group["factored_dims"], FACTORED_DIMS)
        check_int_at_least(f"{where}min_dim_size_to_factor", group["min_dim_size_to_factor"], 0)
        check_choice(f"{where}momentum_mode", group["momentum_mode"], MOMENTUM_MODES)
        check_bool(f"{where}maximize", group["maximize"])
        check_stochastic_rounding(group.get("stochastic_rounding"), where=where)
        check_implementation(group, where=where)

    def _axes(self, p: Tensor, group: dict[str, Any]) -> tuple[int, int] | None:
        return adafactor_factored_axes(
            p.shape,
            factored_dims=group["factored_dims"],
            min_dim_size_to_factor=group["min_dim_size_to_factor"],
        )

    def _prepare(self, gathered: list[GroupTensors]) -> list[tuple[Any, ...]]:
        # A parameter whose existing statistics do not fit the group's factoring rule (the
        # rule was changed, or a state_dict from another layout was loaded) fails here.
        for work in gathered:
            for p, name in zip(work.params, work.names, strict=True):
                state = self.state.get(p)
                if not state or not any(key in state for key in _STATISTICS):
                    continue
                factored = self._axes(p, work.group) is not None
                if factored != ("exp_avg_sq_row" in state):
                    raise ValueError(
                        f"danlu.AdaFactor: the statistics of {name} were built "
                        f"{'with' if not factored else 'without'} factoring, but factored_dims/"
                        "min_dim_size_to_factor now say otherwise; they cannot change after "
                        "the first step"
                    )
        return [self._prepare_group(work) for work in gathered]

    def _prepare_group(self, work: GroupTensors) -> tuple[Any, ...]:
        group = work.group
        steps: list[Tensor] = []
        lists: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for p, g in zip(work.params, work.grads, strict=True):
            dtype = statistics_dtype(p.dtype)
            axes = self._axes(p, group)
            if axes is None:
                row = col = None
                full = self._state_tensor(
                    p, "exp_avg_sq", lambda p=p, d=dtype: torch.zeros_like(p, dtype=d)
                )
            else:
                largest, second = axes
                row_shape, col_shape = list(p.shape), list(p.shape)
                row_shape[largest] = 1
                col_shape[second] = 1
                row = self._state_tensor(
                    p, "exp_avg_sq_row", lambda p=p, s=row_shape, d=dtype: new_state(p, s, d)
                )
                col = self._state_tensor(
                    p, "exp_avg_sq_col", lambda p=p, s=col_shape, d=dtype: new_state(p, s, d)
                )
                full = None
            exp_avg = None
            if group["beta1"] > 0:
                exp_avg = self._state_tensor(p, "exp_avg", lambda p=p: torch.zeros_like(p))
            steps.append(
                self._state_tensor(p, "step", lambda: torch.tensor(0.0, dtype=torch.float32))
            )
            for lst, value in zip(lists, (p, g, row, col, full, exp_avg), strict=True):
                lst.append(value)
        return group, lists, StepBuckets.build(steps, lambda i: lists[0][i].numel() > 0)

    def _apply(self, plan: list[tuple[Any, ...]]) -> None:
        for group, lists, buckets in plan:
            for b, indices in enumerate(buckets.indices):
                adafactor_step(
                    tuple([lst[i] for i in indices] for lst in lists),  # type: ignore[arg-type]
                    AdaFactorHyper.at_step(buckets.step(b), group),
                    stochastic_rounding=group.get("stochastic_rounding"),
                    foreach=group["foreach"],
                    fused=group.get("fused"),  # absent from state dicts saved before it existed
                )
            buckets.advance()


register(
    "adafactor",
    AdaFactor,
    reference="docs/reference/algorithms.md#adafactor-rule",
    summary="factored second moments (n+m per n×m matrix), update clipping, relative scale",
    state_bytes="≈0 (β1=0); ≈4 with momentum",
    state_bytes_accum="≈4 (β1=0); ≈8 with momentum",
    # no chunked or compiled path: on CPU fused=True runs the single-tensor loop
    paths={
        "single": {"foreach": False, "fused": False},
        "foreach": {"foreach": True},
        "triton": {"fused": True},
        "dtensor": {},
    },
    compare=CompareSettings(
        rule=lambda base: {"lr": 1e-3},
        rule_note="lr 1e-3, even for fine-tuning (blog 7302)",
        rule_claim="AdaFactor: an lr of 1e-3 works (even for fine-tuning)",
        blog="7302",
        centres={"digits": 2e-3, "charlm": 3e-2},
        colour="#d62728",
        rank=3,
    ),
)

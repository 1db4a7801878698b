"""The AdaX optimizer shell, docs/reference/algorithms.md#adax."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from danlu.algorithms.adax.functional import adax_step
from danlu.algorithms.adax.rule import AdaXHyper
from danlu.core.precision import check_stochastic_rounding
from danlu.core.shell import (
    DanluOptimizer,
    GroupTensors,
    ParamsT,
    StepBuckets,
    check_beta,
    check_bool,
    check_implementation,
    check_in_range,
    check_non_negative,
)
from danlu.core.tensors import statistics_dtype
from danlu.registry import CompareSettings, register

__all__ = ["AdaX"]


class AdaX(DanluOptimizer):
    r"""AdaX, docs/reference/algorithms.md#adax; Li et al. 2020 (arXiv 2004.09740);
    kexue.fm/archives/7387; code bojone/adax.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        \hat v_t = \frac{\beta_2 \sum_{i\le t} (1+\beta_2)^{t-i} g_i^2}{(1+\beta_2)^t - 1},\quad
        \theta_t = \theta_{t-1} - \alpha\Big(\frac{m_t}{\sqrt{\hat v_t} + \epsilon}
                   + \lambda\theta_{t-1}\Big)

    The rule for one tensor is ``danlu.algorithms.adax.rule.adax_update_``
    (docs/reference/algorithms.md#adax-rule). Older gradients get exponentially *larger*
    weight in v̂ ("exponential long-term memory"); there is no bias correction on m, so the
    first step is 0.1·α·sign(g) for β1 = 0.9.

    The state keeps v̂ itself in the normalised EMA form of docs/reference/algorithms.md#adax-rule,
    v̂_t = β̂_t v̂_{t−1} + (1 − β̂_t) g² with 1 − β̂_t = β2/((1+β2)^t − 1): it equals the blog's
    v_t/((1+β2)^t − 1) but cannot overflow (the blog's v_t passes float32's maximum after about
    9·10⁵ steps at β2 = 1e-4). v̂ is float32 (float64 for float64 params) whatever the
    parameter dtype, because 1 − β̂_t ≈ 1/t soon drops below bf16's resolution and a bf16 v̂
    would stop moving; m has the parameter's dtype.

    Defaults are the reference code's tf.keras version
    (docs/reference/algorithms.md#adax-defaults): ``lr=1e-3``, ``betas=(0.9, 1e-4)``,
    ``eps=1e-6`` added after the square root (``eps_inside_sqrt=True`` gives the blog's
    √(v̂ + ε); docs/reference/algorithms.md#adax-differences).

    Deviations from the reference:
        * decoupled weight decay (docs/reference/algorithms.md#conventions, multiplied by the
          lr; 0 by default) is an addition: the reference code has none.
        * v̂ is stored normalised (see above) instead of the growing v_t.
        * gradients are read saturated where g² would overflow v̂'s dtype (about 1.3e19 in
          float32), so one huge finite gradient cannot turn v̂ into inf; ordinary gradients
          are read bit for bit.
        * stochastic rounding of bf16/fp16 parameters (on by default) is an addition.

    Args:
        params: parameters, named parameters or param groups.
        lr: step size α (≥ 0).
        betas: (β1, β2) with β1 in [0, 1) and β2 in (0, 1).
        eps: ε ≥ 0 in the denominator.
        weight_decay: decoupled decay λ ≥ 0, multiplied by the lr.
        eps_inside_sqrt: ε under the square root (the blog) instead of after it (the code).
        stochastic_rounding: how bf16/fp16 parameters are written. ``None`` (default) or
            ``True``: the parameter's update runs in fp32 and the result is rounded
            stochastically (unbiased), so updates below the dtype's spacing are not lost
            (pytorch#120376); the noise comes from torch's global RNG of the parameter's
            device, reproducible under ``torch.manual_seed``. ``False``: round to nearest.
            fp32/fp64 parameters are never affected; the state keeps its dtype.
        maximize: ascend instead of descend (the user's gradients are not modified).
        foreach: use the multi-tensor path; ``None`` chooses like torch.optim.
        fused: ``True`` runs the fused kernel (Triton on CUDA; on CPU the math compiled with
            ``torch.compile``, which compiles on the first step); ``None`` (default) uses
            Triton on CUDA when available and, on CPU, the chunked for-loop (bit-identical to
            the single-tensor math, no parameter-sized temporaries).
    """

    _display_name = "danlu.AdaX"
    _float32_state_keys = ("exp_avg_sq",)
    _param_shaped_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        eps_inside_sqrt: bool = False,
        stochastic_rounding: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "eps_inside_sqrt": eps_inside_sqrt,
            "stochastic_rounding": stochastic_rounding,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        check_non_negative(f"{where}lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
        check_beta(f"{where}betas[0]", betas[0])
        check_in_range(f"{where}betas[1]", betas[1], 0.0, 1.0, low_open=True, high_open=True)
        check_non_negative(f"{where}eps", group["eps"])
        check_non_negative(f"{where}weight_decay", group["weight_decay"])
        check_bool(f"{where}eps_inside_sqrt", group["eps_inside_sqrt"])
        check_bool(f"{where}maximize", group["maximize"])
        check_stochastic_rounding(group.get("stochastic_rounding"), where=where)
        check_implementation(group, where=where)

    def _prepare(
        self, gathered: list[GroupTensors]
    ) -> list[tuple[GroupTensors, list[Tensor], list[Tensor], StepBuckets]]:
        plan = []
        for work in gathered:
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in work.params:
                dtype = statistics_dtype(p.dtype)
                exp_avgs.append(self._state_tensor(p, "exp_avg", lambda p=p: torch.zeros_like(p)))
                exp_avg_sqs.append(
                    self._state_tensor(
                        p, "exp_avg_sq", lambda p=p, d=dtype: torch.zeros_like(p, dtype=d)
                    )
                )
                steps.append(
                    self._state_tensor(p, "step", lambda: torch.tensor(0.0, dtype=torch.float32))
                )
            plan.append((work, exp_avgs, exp_avg_sqs, StepBuckets.build(steps, lambda i: True)))
        return plan

    def _apply(
        self, plan: list[tuple[GroupTensors, list[Tensor], list[Tensor], StepBuckets]]
    ) -> None:
        for work, exp_avgs, exp_avg_sqs, buckets in plan:
            group = work.group
            for b, indices in enumerate(buckets.indices):
                adax_step(
                    [work.params[i] for i in indices],
                    [work.grads[i] for i in indices],
                    [exp_avgs[i] for i in indices],
                    [exp_avg_sqs[i] for i in indices],
                    AdaXHyper.from_group(group, buckets.step(b)),
                    stochastic_rounding=group.get("stochastic_rounding"),
                    foreach=group["foreach"],
                    fused=group.get("fused"),  # absent from state dicts saved before it existed
                )
            buckets.advance()


register(
    "adax",
    AdaX,
    reference="docs/reference/algorithms.md#adax-rule",
    summary="Adam with exponential long-term memory in v̂ (β̂_t from 0 to 1), no m correction",
    state_bytes="8",
    state_bytes_accum="12",
    paths={
        "single": {"foreach": False, "fused": False},  # on CPU these select "chunked"
        "foreach": {"foreach": True},
        "chunked": {"foreach": False, "fused": False},
        "compiled": {"fused": True},
        "triton": {"fused": True},
    },
    compare=CompareSettings(
        rule=lambda base: {"lr": base.lr, "weight_decay": base.weight_decay},
        rule_note="AdamW's lr (blog 7387)",
        rule_claim="AdaX: AdamW's lr carries over",
        blog="7387",
        centres={"digits": 3e-3, "charlm": 6e-3},  # digits: flat, like AdamW
        colour="#9467bd",
        rank=4,
    ),
)

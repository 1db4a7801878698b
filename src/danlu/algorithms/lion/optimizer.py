"""The Lion optimizer shell, docs/reference/algorithms.md#lion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from danlu.algorithms.lion.functional import lion_step
from danlu.algorithms.lion.rule import LionHyper
from danlu.core.precision import check_stochastic_rounding
from danlu.core.shell import (
    DanluOptimizer,
    GroupTensors,
    ParamsT,
    check_beta,
    check_bool,
    check_implementation,
    check_non_negative,
    check_state_dtype,
)
from danlu.recipes import adamw_to_lion
from danlu.registry import CompareSettings, register

__all__ = ["Lion"]


class Lion(DanluOptimizer):
    r"""Lion (EvoLved Sign Momentum), docs/reference/algorithms.md#lion; Chen et al. 2023 (arXiv
    2302.06675); kexue.fm/archives/9473; code google/automl ``lion/lion_pytorch.py``.

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        \theta_t = \theta_{t-1} - \eta\,(\mathrm{sign}(c_t) + \lambda\theta_{t-1}),\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    The rule for one tensor is ``danlu.algorithms.lion.rule.lion_update_``
    (docs/reference/algorithms.md#lion-rule).

    Defaults are google/automl's ``lion_pytorch.py`` (docs/reference/algorithms.md#lion-defaults):
    ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0``. Weight decay uses the old parameter
    and is multiplied by the lr (so when moving from AdamW, divide the lr by 3-10 and multiply
    weight_decay by the same factor; ``danlu.recipes.adamw_to_lion``). For language models the
    paper uses ``betas=(0.95, 0.98)``.

    State: one momentum buffer ``exp_avg`` per parameter (4 bytes per fp32 parameter), the same
    key and layout as ``lion_pytorch.Lion``. Lion cannot hide gradient accumulation in its
    momentum (docs/reference/algorithms.md#lion-edge-cases); wrap it in
    ``danlu.GradientAccumulation`` or use ``danlu.Tiger``.

    Deviations from the reference:
        * gradients beyond half the largest value of the momentum's dtype (±inf included) are
          read saturated at that bound, so the momentum and the parameters stay finite;
          ordinary gradients are read bit for bit (docs/optimizers/lion.md, "Huge gradients").
        * ``state_dtype`` (e.g. a bf16 momentum) and stochastic rounding of bf16/fp16
          parameters (on by default) are additions; with fp32 parameters and state the
          update is the reference's.

    Args:
        params: parameters, named parameters or param groups.
        lr: step size η (≥ 0).
        betas: (β1, β2), each in [0, 1): interpolation for the update and momentum decay.
        weight_decay: decoupled decay λ (≥ 0), applied as θ·(1 − ηλ).
        state_dtype: dtype of the momentum (default: the parameter's). ``torch.bfloat16``
            halves the state to 2 bytes per parameter; the math runs in fp32 and the
            momentum is rounded to nearest. Kept through ``load_state_dict``.
        stochastic_rounding: how bf16/fp16 parameters are written. ``None`` (default) or
            ``True``: the parameter's update runs in fp32 and the result is rounded
            stochastically (unbiased), so updates below the dtype's spacing are not lost
            (pytorch#120376); the noise comes from torch's global RNG of the parameter's
            device, reproducible under ``torch.manual_seed``. ``False``: round to nearest.
            fp32/fp64 parameters are never affected; the state keeps its dtype.
        maximize: ascend instead of descend (the user's gradients are not modified).
        foreach: use the multi-tensor path; ``None`` chooses like torch.optim.
        fused: ``True`` runs the fused kernel (Triton on CUDA; on CPU the foreach math
            compiled with ``torch.compile``, which compiles on the first step); ``None``
            (default) uses Triton on CUDA when available and, on CPU, the chunked for-loop
            (bit-identical to the single-tensor math, no parameter-sized temporaries).
    """

    _state_dtype_keys = ("exp_avg",)
    _param_shaped_keys = ("exp_avg",)
    _display_name = "danlu.Lion"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "state_dtype": state_dtype,
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
        check_beta(f"{where}betas[1]", betas[1])
        check_non_negative(f"{where}weight_decay", group["weight_decay"])
        check_bool(f"{where}maximize", group["maximize"])
        check_state_dtype(group["state_dtype"], where=where)
        check_stochastic_rounding(group.get("stochastic_rounding"), where=where)
        check_implementation(group, where=where)

    def _prepare(self, gathered: list[GroupTensors]) -> list[tuple[GroupTensors, list[Tensor]]]:
        return [
            (
                work,
                [
                    self._state_tensor(
                        p,
                        "exp_avg",
                        lambda p=p, group=work.group: torch.zeros_like(
                            p, dtype=self._state_dtype(group, "exp_avg", p)
                        ),
                    )
                    for p in work.params
                ],
            )
            for work in gathered
        ]

    def _apply(self, plan: list[tuple[GroupTensors, list[Tensor]]]) -> None:
        for work, exp_avgs in plan:
            group = work.group
            lion_step(
                work.params,
                work.grads,
                exp_avgs,
                LionHyper.from_group(group),
                # absent from state dicts saved before they existed
                stochastic_rounding=group.get("stochastic_rounding"),
                foreach=group["foreach"],
                fused=group.get("fused"),
            )


register(
    "lion",
    Lion,
    reference="docs/reference/algorithms.md#lion-rule",
    summary="sign of an interpolated momentum, decoupled decay (Chen et al. 2023)",
    state_bytes="4",
    state_bytes_accum="8",
    paths={
        "single": {"foreach": False, "fused": False},  # on CPU these select "chunked"
        "foreach": {"foreach": True},
        "chunked": {"foreach": False, "fused": False},
        "compiled": {"fused": True},
        "triton": {"fused": True},
    },
    compare=CompareSettings(
        # lr ÷ 10, weight decay × 10
        rule=lambda base: adamw_to_lion(base.lr, base.weight_decay)._asdict(),
        rule_note="lr ÷ 10, weight decay × 10 (blog 9473)",
        rule_claim="Lion: AdamW's lr ÷ 10 and weight decay × 10 carry over",
        matches_adamw_claim="Lion reaches AdamW's quality with half its optimizer state",
        blog="9473",
        centres={
            "digits": 3e-4,  # = the rule: 1.5e-4 scored 0.4 points higher, within the noise
            # 2e-3 and 4e-3 within 0.014 bits/char; the rule's weight decay (1.0) beat 0.3 and
            # 0.075 at every lr
            "charlm": 3e-3,
        },
        colour="#ff7f0e",
        rank=1,
    ),
)

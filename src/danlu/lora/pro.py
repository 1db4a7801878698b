"""LoRA-Pro: adjust LoRA's gradients so that its step matches full fine-tuning,
docs/reference/algorithms.md#lora-pro.

kexue 10266; paper arXiv 2407.18242; reference code mrflogs/LoRA-Pro (peta/optim.py). PEFT
naming (docs/reference/algorithms.md#conventions): ``W = W0 + s · B @ A`` with A = ``lora_A``
(r×in), B = ``lora_B`` (out×r), and g_A, g_B the autograd gradients of A and B (they already contain
s).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from danlu.core.dtensor import full_tensor, local, local_slice, new_state
from danlu.core.nonfinite import finite_mask
from danlu.core.shell import (
    DanluOptimizer,
    GroupTensors,
    check_beta,
    check_choice,
    check_non_negative,
    param_label,
)
from danlu.lora.layers import LoRATriple, find_lora_adapters
from danlu.wrappers._base import OptimizerWrapper

__all__ = ["MODES", "X_MODES", "LoRAPro", "LoRAProAdam", "lora_pro_gradients"]

MODES = ("efficient", "full")
X_MODES = ("sylvester", "symmetric", "zero")

_LORA_GA_ADVICE = (
    "standard LoRA starts lora_B at zero, which LoRA-Pro cannot adjust; initialise the "
    "adapters with LoRA-GA first (danlu.lora.lora_ga_init_)"
)


# ----------------------------------------------------------------------------------------------
# The math (docs/reference/algorithms.md#lora-pro-rule, paper/code form). Everything runs in fp32,
# or fp64 for fp64 inputs.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _Spectrum:
    """Eigen-decompositions B^T B = P diag(lam) P^T and A A^T = Q diag(mu) Q^T (ascending)."""

    lam: Tensor
    vec_b: Tensor
    mu: Tensor
    vec_a: Tensor

    def inverses(self, ridge: float) -> tuple[Tensor, Tensor]:
        """(B^T B + ridge·I)^{-1} and (A A^T + ridge·I)^{-1} (the reference: pinv(M + 1e-8 I))."""
        gram_b_inv = (self.vec_b / (self.lam + ridge)) @ self.vec_b.mT
        gram_a_inv = (self.vec_a / (self.mu + ridge)) @ self.vec_a.mT
        return gram_b_inv, gram_a_inv


def _spectra(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> list[_Spectrum]:
    """One batched ``eigh`` per (rank, device, dtype) bucket of the r×r Gram matrices."""
    out: list[_Spectrum | None] = [None] * len(As)
    buckets: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
    for i, A in enumerate(As):
        buckets.setdefault((A.shape[0], A.device, A.dtype), []).append(i)
    for indices in buckets.values():
        gram_b = torch.stack([Bs[i].mT @ Bs[i] for i in indices])
        gram_a = torch.stack([As[i] @ As[i].mT for i in indices])
        lam, vec_b = torch.linalg.eigh(gram_b)
        mu, vec_a = torch.linalg.eigh(gram_a)
        for j, i in enumerate(indices):
            out[i] = _Spectrum(lam[j], vec_b[j], mu[j], vec_a[j])
    return out  # type: ignore[return-value]


def _solve_sylvester(spec: _Spectrum, rhs: Tensor) -> Tensor:
    """X with B^T B X + X A A^T = rhs, by diagonalising both sides
    (docs/reference/algorithms.md#lora-pro-edge-cases): X = P [(P^T rhs Q)_ij / (lam_i + mu_j)]
    Q^T."""
    core = spec.vec_b.mT @ rhs @ spec.vec_a
    return spec.vec_b @ (core / (spec.lam[:, None] + spec.mu[None, :])) @ spec.vec_a.mT


def _adjust(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scale: float,
    spec: _Spectrum,
    *,
    x_mode: str,
    ridge: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Returns (ĝ_A, ĝ_B, t_A, t_B) where t_A, t_B are the X = 0 terms:

    t_A = s^{-2} (BᵀB)^{-1} g_A,   t_B = s^{-2} (I − B(BᵀB)^{-1}Bᵀ) g_B (AAᵀ)^{-1},
    ĝ_A = t_A + X A,   ĝ_B = t_B − B X.
    """
    inv_s2 = 1.0 / (scale * scale)
    gram_b_inv, gram_a_inv = spec.inverses(ridge)
    t_A = inv_s2 * (gram_b_inv @ grad_A)
    bt_gb = B.mT @ grad_B
    t_B = inv_s2 * ((grad_B - B @ (gram_b_inv @ bt_gb)) @ gram_a_inv)
    if x_mode == "sylvester":
        # BᵀB X + X AAᵀ = −s^{-2} (BᵀB)^{-1} g_A Aᵀ = −t_A Aᵀ
        X = _solve_sylvester(spec, -(t_A @ A.mT))
    elif x_mode == "symmetric":
        # the corrected symmetric split, docs/reference/algorithms.md#lora-differences: X = −½
        # s^{-2} (BᵀB)^{-1} Bᵀ g_B (AAᵀ)^{-1}
        X = (-0.5 * inv_s2) * (gram_b_inv @ bt_gb @ gram_a_inv)
    else:
        return t_A, t_B, t_A, t_B
    return t_A + X @ A, t_B - B @ X, t_A, t_B


def lora_pro_gradients(
    lora_A: Tensor,
    lora_B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scale: float,
    *,
    x_mode: str = "sylvester",
    ridge: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    r"""LoRA-Pro's adjusted gradients (ĝ_A, ĝ_B) for one adapter,
    docs/reference/algorithms.md#lora-pro-rule:

    .. math::
        \hat g_A = \tfrac1{s^2}(B^\top B)^{-1}g_A + XA,\qquad
        \hat g_B = \tfrac1{s^2}\big(I-B(B^\top B)^{-1}B^\top\big)g_B(AA^\top)^{-1} - BX,

    so that s(B ĝ_A + ĝ_B A) is the projection of the full gradient onto the directions LoRA
    can move in. X: ``"sylvester"`` (LoRA-Pro; closest to (g_A, g_B)),
    ``"symmetric"`` (the blog's symmetric split, the docs/reference/algorithms.md#lora-differences
    corrected form) or ``"zero"``. Computed in fp32 (fp64 for fp64 inputs); returned in that dtype.
    No rank check: see :class:`LoRAPro`.
    """
    check_choice("x_mode", x_mode, X_MODES)
    dtype = _compute_dtype(lora_A.dtype)
    A, B, gA, gB = (full_tensor(t).detach().to(dtype) for t in (lora_A, lora_B, grad_A, grad_B))
    (spec,) = _spectra([A], [B])
    hat_A, hat_B, _, _ = _adjust(A, B, gA, gB, float(scale), spec, x_mode=x_mode, ridge=ridge)
    return hat_A, hat_B


def _check_spectra(
    spectra: list[_Spectrum],
    grads: list[tuple[Tensor, Tensor]],
    labels: list[str],
    rank_tol: float,
    who: str,
) -> None:
    """Raise (before anything is written) for a rank-deficient factor or a non-finite grad."""
    if not spectra:
        return
    flags = []
    for spec, (gA, gB) in zip(spectra, grads, strict=True):
        flags.append(
            torch.stack(
                [
                    spec.lam[0] <= rank_tol * spec.lam[-1],
                    spec.mu[0] <= rank_tol * spec.mu[-1],
                    ~torch.isfinite(gA).all(),
                    ~torch.isfinite(gB).all(),
                ]
            ).cpu()
        )
    table = torch.stack(flags).tolist()  # one host transfer
    for label, (bad_b, bad_a, bad_ga, bad_gb) in zip(labels, table, strict=True):
        if bad_b or bad_a:
            which = "lora_B" if bad_b else "lora_A"
            raise ValueError(
                f"{who}: {which} of {label} is not of full rank r (smallest/largest eigenvalue "
                f"of its r×r Gram matrix <= rank_tol={rank_tol:g}); LoRA-Pro needs full-rank "
                f"factors: {_LORA_GA_ADVICE}. Nothing was modified."
            )
        if bad_ga or bad_gb:
            raise FloatingPointError(
                f"{who}: non-finite gradient for {label}; nothing was modified"
            )


# ----------------------------------------------------------------------------------------------
# Full mode: Adam with full (out×in) state on the equivalent gradient,
# docs/reference/algorithms.md#lora-pro "With Adam".


@dataclass
class _FullModePlan:
    """What a checked full-mode step updates: the adapters (group, A, B, base weight), their
    fp32 (A, B, g_A, g_B) and spectra, and the plain groups."""

    adapters: list[tuple[dict[str, Any], Tensor, Tensor, Tensor | None]]
    compute: list[tuple[Tensor, Tensor, Tensor, Tensor]]
    spectra: list[_Spectrum]
    plain: list[GroupTensors]


class LoRAProAdam(DanluOptimizer):
    r"""LoRA-Pro's full mode (the reference's ``mode="full"``; the blog's "LoRA-Pro with Adam").

    A param group holding ``[lora_A, lora_B]`` or ``[lora_A, lora_B, base_weight]`` and a
    ``lora_scale`` s is one adapter; groups with ``lora_scale=None`` are plain AdamW. Per
    adapter and step:

    1. G̃ = s(B t_A + t_B A), the full gradient projected on LoRA's directions;
    2. Adam with full out×in state: m ← β1 m + (1−β1) G̃, v ← β2 v + (1−β2) G̃²,
       U = (m/(1−β1^t)) / (√(v/(1−β2^t)) + ε);
    3. U_A = s Bᵀ U, U_B = s U Aᵀ, adjusted with X like gradients (:func:`lora_pro_gradients`);
    4. A ← √(1−ηλ) A − η Û_A, B ← √(1−ηλ) B − η Û_B and the base weight ← (1−ηλ) W0, so the
       effective weight decays by 1−ηλ like AdamW's.

    Usually built by :class:`LoRAPro` (``mode="full"``). State per adapter (keyed by its
    ``lora_A``): ``step``, ``exp_avg``, ``exp_avg_sq`` (out×in, fp32 even for bf16 params).

    ``load_state_dict`` checks everything before it changes anything: moments of the shape
    above (parameter-shaped in plain groups), all three keys together, no state under an
    adapter's ``lora_B`` or base weight, each group's ``lora_scale`` unchanged; the moments
    are loaded in fp32 (fp64 for fp64 params).
    """

    _display_name = "danlu.lora.LoRAPro(mode='full')"
    _moment_keys = ("exp_avg", "exp_avg_sq")
    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        x_mode: str = "sylvester",
        ridge: float = 1e-8,
        rank_tol: float = 1e-6,
    ) -> None:
        check_choice("x_mode", x_mode, X_MODES)
        check_non_negative("ridge", ridge)
        check_non_negative("rank_tol", rank_tol)
        self.x_mode, self.ridge, self.rank_tol = x_mode, float(ridge), float(rank_tol)
        #: How load errors name a parameter beyond its position (``LoRAPro`` fills it in:
        #: "lora_A of adapter 'layers.0.q_proj'"), by ``id``.
        self.param_roles: dict[int, str] = {}
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "lora_scale": None,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        self._check_group(self.param_groups[index], where=f"param_groups[{index}]: ")

    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        _check_adam_settings(group, where)
        scale = group.get("lora_scale")
        if scale is None:
            return
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"{where}lora_scale must be None or a finite number > 0")
        if not 0 < scale < math.inf:
            raise ValueError(f"{where}lora_scale must be None or a finite number > 0")
        params = group.get("params")
        if params is not None:
            if len(params) not in (2, 3):
                raise ValueError(
                    f"{where}an adapter group holds [lora_A, lora_B] or [lora_A, lora_B, "
                    f"base_weight], got {len(params)} tensors"
                )
            if len(params) == 2 and group["weight_decay"] > 0:
                raise ValueError(
                    f"{where}weight_decay > 0 in full mode also decays the frozen base weight "
                    "(docs/reference/algorithms.md#lora-pro); give the adapter's base_weight"
                )

    # -- checkpoints: DanluOptimizer's two-phase load, with this layout's checks --------------
    def _state_dtype(self, group: dict[str, Any], key: str, param: Tensor) -> torch.dtype:
        if key in self._moment_keys:  # the dtype the step computes in
            return _compute_dtype(param.dtype)
        return super()._state_dtype(group, key, param)

    def _expected_state_shape(
        self, p: Tensor, group: dict[str, Any], key: str
    ) -> tuple[int, ...] | None:
        if key not in self._moment_keys:
            return None
        if group.get("lora_scale") is None:
            return tuple(p.shape)
        A, B = group["params"][0], group["params"][1]
        if p is A:  # the adapter's out×in moments
            return (B.shape[0], A.shape[1])
        return None  # lora_B, base weight: no state (refused in _check_loaded_state)

    def _role(self, p: Tensor, group: dict[str, Any]) -> str:
        if group.get("lora_scale") is None:
            return ""
        position = next(i for i, q in enumerate(group["params"]) if q is p)
        return ("lora_A", "lora_B", "base weight")[position]

    def _loaded(self, state_dict: Any) -> tuple[list[dict[str, Any]], defaultdict[Any, Any]]:
        where = f"{self._display_name}.load_state_dict: "
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if isinstance(saved_groups, Sequence) and len(saved_groups) == len(self.param_groups):
            for index, (group, saved) in enumerate(
                zip(self.param_groups, saved_groups, strict=True)
            ):
                if not isinstance(saved, Mapping) or "lora_scale" not in saved:
                    continue  # no lora_scale saved: the group keeps its own
                if saved["lora_scale"] != group["lora_scale"]:
                    raise ValueError(
                        f"{where}param_groups[{index}]: lora_scale={saved['lora_scale']!r} "
                        f"in the state dict, but this group's adapter has lora_scale="
                        f"{group['lora_scale']!r} (s = alpha/r of the model's forward pass: a "
                        "checkpoint of another model?); nothing was modified"
                    )
        return super()._loaded(state_dict)

    def _loaded_param_state(
        self, p: Tensor, group: dict[str, Any], entry: Any, label: str
    ) -> dict[str, Any]:
        role = self.param_roles.get(id(p))
        return super()._loaded_param_state(p, group, entry, f"{label}, {role}" if role else label)

    def _check_loaded_state(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        present = [key for key in self._state_keys if key in state]
        role = self._role(p, group)
        if present and role not in ("", "lora_A"):
            raise ValueError(
                f"{label}: has {', '.join(map(repr, present))}, but LoRA-Pro's full mode keeps "
                f"an adapter's state under its lora_A, none under its {role} (a checkpoint of "
                "mode='efficient' or of another optimizer?); nothing was modified"
            )
        missing = [key for key in self._state_keys if key not in state]
        if present and missing:
            raise ValueError(
                f"{label}: has {', '.join(map(repr, present))} but not "
                f"{', '.join(map(repr, missing))}; a LoRA-Pro state holds 'step', 'exp_avg' "
                "and 'exp_avg_sq' together; nothing was modified"
            )

    def _prepare(self, gathered: list[GroupTensors]) -> _FullModePlan:
        """Every check of a step (rank, missing or non-finite gradients), before any write."""
        adapters: list[tuple[dict[str, Any], Tensor, Tensor, Tensor | None]] = []
        plain: list[GroupTensors] = []
        raw_grads: list[tuple[Tensor, Tensor]] = []
        labels = []
        for index, work in enumerate(gathered):
            group = work.group
            if group["lora_scale"] is None:
                plain.append(work)
                continue
            A, B = group["params"][0], group["params"][1]
            if A.grad is None and B.grad is None:
                continue
            label = f"param_groups[{index}]"
            if A.grad is None or B.grad is None:
                missing = "lora_A" if A.grad is None else "lora_B"
                raise ValueError(
                    f"{self._display_name}: {missing} of {label} has no gradient while the "
                    "other factor has one; nothing was modified"
                )
            base = group["params"][2] if len(group["params"]) == 3 else None
            adapters.append((group, A, B, base))
            raw_grads.append((A.grad, B.grad))
            labels.append(label)
        compute = [
            tuple(full_tensor(t).detach().to(_compute_dtype(A.dtype)) for t in (A, B, gA, gB))
            for (_, A, B, _), (gA, gB) in zip(adapters, raw_grads, strict=True)
        ]
        spectra = _spectra([c[0] for c in compute], [c[1] for c in compute])
        _check_spectra(
            spectra, [(c[2], c[3]) for c in compute], labels, self.rank_tol, self._display_name
        )
        for work in plain:
            finite = finite_mask(work.grads).tolist()
            for ok, name in zip(finite, work.names, strict=True):
                if not ok:
                    raise FloatingPointError(
                        f"{self._display_name}: non-finite gradient in {name}; nothing was modified"
                    )
        return _FullModePlan(adapters, compute, spectra, plain)  # type: ignore[arg-type]

    def _apply(self, plan: _FullModePlan) -> None:
        for (group, A, B, base), (A32, B32, gA, gB), spec in zip(
            plan.adapters, plan.compute, plan.spectra, strict=True
        ):
            self._step_adapter(group, A, B, base, A32, B32, gA, gB, spec)
        for work in plan.plain:
            self._step_plain(work)

    def _moments(
        self, p: Tensor, shape: tuple[int, ...], dtype: torch.dtype, *, like: Tensor | None
    ) -> dict[str, Any]:
        """The moments of ``p`` (created on first use), as local tensors. ``like``: the tensor
        they are laid out as (a DTensor parameter's slices), or None for whole tensors (an
        adapter's out×in moments, the same on every rank under FSDP2)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                if like is None:
                    state[key] = torch.zeros(shape, dtype=dtype, device=local(p).device)
                else:
                    state[key] = new_state(like, shape, dtype)
        return {key: local(value) for key, value in state.items()}

    @staticmethod
    def _adam_direction(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        return (state["exp_avg"] / (1 - beta1**t)) / denom

    def _step_adapter(
        self,
        group: dict[str, Any],
        A: Tensor,
        B: Tensor,
        base: Tensor | None,
        A32: Tensor,
        B32: Tensor,
        gA: Tensor,
        gB: Tensor,
        spec: _Spectrum,
    ) -> None:
        s = float(group["lora_scale"])
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        _, _, t_A, t_B = _adjust(A32, B32, gA, gB, s, spec, x_mode="zero", ridge=self.ridge)
        equivalent = s * (B32 @ t_A + t_B @ A32)  # G̃, out×in
        del t_A, t_B
        state = self._moments(A, tuple(equivalent.shape), equivalent.dtype, like=None)
        direction = self._adam_direction(state, equivalent, group)
        del equivalent
        u_A, u_B = s * (B32.mT @ direction), s * (direction @ A32.mT)
        del direction
        step_A, step_B, _, _ = _adjust(
            A32, B32, u_A, u_B, s, spec, x_mode=self.x_mode, ridge=self.ridge
        )
        keep = math.sqrt(1 - lr * wd) if wd else 1.0
        # under FSDP2 each rank writes its slice of the (identical) whole results
        local(A).copy_(local_slice(A32 * keep - lr * step_A, A))
        local(B).copy_(local_slice(B32 * keep - lr * step_B, B))
        if wd and base is not None:
            local(base).mul_(1 - lr * wd)

    def _step_plain(self, work: GroupTensors) -> None:
        group = work.group
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        for p, g in zip(work.params, work.grads, strict=True):
            dtype = _compute_dtype(p.dtype)
            state = self._moments(p, tuple(p.shape), dtype, like=p)
            direction = self._adam_direction(state, local(g).to(dtype), group)
            piece = local(p)
            piece.copy_(piece.to(dtype) * (1 - lr * wd) - lr * direction)


# ----------------------------------------------------------------------------------------------
# The optimizer users build.


def _as_triple(item: Any, index: int) -> LoRATriple:
    if isinstance(item, LoRATriple):
        return item
    if not isinstance(item, tuple | list) or len(item) not in (3, 4):
        raise ValueError(
            f"lora[{index}] must be a (lora_A, lora_B, scale) or (lora_A, lora_B, scale, "
            f"base_weight) tuple, got {type(item).__name__}"
        )
    return LoRATriple(*item)


def _check_triple(t: LoRATriple, label: str) -> None:
    A, B, s, W = t
    if not isinstance(A, Tensor) or not isinstance(B, Tensor):
        raise ValueError(f"{label}: lora_A and lora_B must be tensors")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{label}: lora_A must be (r, in) and lora_B (out, r) with the same r, got "
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
        )
    r, n_in, n_out = A.shape[0], A.shape[1], B.shape[0]
    if not 1 <= r < min(n_in, n_out):
        raise ValueError(
            f"{label}: rank r={r} must be in [1, min(in, out) - 1] = [1, {min(n_in, n_out) - 1}]"
        )
    if A is B:
        raise ValueError(f"{label}: lora_A and lora_B are the same tensor")
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(f"{label}: lora_A and lora_B must share dtype and device")
    if not A.is_floating_point() or not A.requires_grad or not B.requires_grad:
        raise ValueError(f"{label}: lora_A and lora_B must be floating tensors requiring grad")
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s < math.inf:
        raise ValueError(f"{label}: scale must be a finite number > 0, got {s!r}")
    if W is not None and (
        not isinstance(W, Tensor) or tuple(W.shape) not in ((n_out, n_in), (n_in, n_out))
    ):
        got = tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{label}: base_weight must be ({n_out}, {n_in}), got {got}")


def _check_adam_settings(group: dict[str, Any], where: str = "") -> None:
    check_non_negative(f"{where}lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta(f"{where}betas[0]", betas[0])
    check_beta(f"{where}betas[1]", betas[1])
    check_non_negative(f"{where}eps", group["eps"])
    check_non_negative(f"{where}weight_decay", group["weight_decay"])


_ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ADAMW_FLAGS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def _check_adamw_state_dict(inner: Optimizer, state_dict: Any, roles: dict[int, str]) -> None:
    """Raise ValueError, naming the parameter, unless ``state_dict`` can drive ``inner`` (the
    ``torch.optim.AdamW`` that LoRAPro builds for mode="efficient") without failing midway:
    the structure torch checks, the loaded Adam settings, and each parameter's state (all of
    ``step``, ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; moments
    floating and parameter-shaped; the step a finite number >= 0). Reads only."""
    where = "danlu.lora.LoRAPro.load_state_dict: "
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{where}state_dict must be a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, Sequence) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in saved_groups
    ):
        raise ValueError(f"{where}'param_groups' must be a list of dicts with 'params'")
    if not isinstance(saved_state, Mapping):
        raise ValueError(f"{where}'state' must be a dict")
    if len(saved_groups) != len(inner.param_groups):
        raise ValueError(
            f"{where}the state dict has {len(saved_groups)} parameter groups, this optimizer "
            f"{len(inner.param_groups)} (a checkpoint of mode='full'?)"
        )
    groups = []
    for index, (group, saved) in enumerate(zip(inner.param_groups, saved_groups, strict=True)):
        label = f"{where}param_groups[{index}]: "
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{label}the state dict's group has {len(saved['params'])} parameters, this "
                f"one {len(group['params'])}"
            )
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        _check_adam_settings(merged, label)
        for key in _ADAMW_FLAGS:
            if not isinstance(merged.get(key, False), bool):
                raise ValueError(f"{label}{key} must be True or False, got {merged[key]!r}")
        groups.append(merged)
    positions = [
        (index, i) for index, g in enumerate(inner.param_groups) for i in range(len(g["params"]))
    ]
    by_id = dict(
        zip(chain.from_iterable(g["params"] for g in saved_groups), positions, strict=True)
    )
    for saved_id, entry in saved_state.items():
        if saved_id not in by_id:
            continue  # kept as it is, as torch does
        index, i = by_id[saved_id]
        group, p = groups[index], inner.param_groups[index]["params"][i]
        role = roles.get(id(p))
        label = f"{where}state of {param_label(index, group, i, p)}" + (f", {role}" if role else "")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{label} must be a dict, got {type(entry).__name__}")
        if not entry:
            continue
        required = ("step", "exp_avg", "exp_avg_sq") + (
            ("max_exp_avg_sq",) if group.get("amsgrad") else ()
        )
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(
                f"{label}: has {', '.join(map(repr, entry))} but not "
                f"{', '.join(map(repr, missing))}; nothing was modified"
            )
        for key in _ADAMW_MOMENTS:
            value = entry.get(key)
            if key not in entry:
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{label}: {key!r} must be a floating tensor, got {got}")
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{label}: {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(p.shape)} (a resized adapter, or a checkpoint of another model or "
                    "of mode='full'?)"
                )
        step = entry["step"]
        number = None
        if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex():
            number = float(step.item())
        elif isinstance(step, int | float) and not isinstance(step, bool):
            number = float(step)
        if number is None or not (math.isfinite(number) and number >= 0):
            raise ValueError(f"{label}: 'step' must be a finite number >= 0, got {step!r}")


class LoRAPro(OptimizerWrapper):
    r"""LoRA-Pro (docs/reference/algorithms.md#lora-pro): LoRA steps that follow full fine-tuning's.

    ``lora`` is a model (danlu :class:`~danlu.lora.LoRALinear` layers or a PEFT ``LoraModel`` /
    ``PeftModel``: adapters are found by module structure) or explicit triples
    ``(lora_A, lora_B, scale[, base_weight])``, never pairs matched by name. With a model, its
    other trainable parameters (heads, biases) are optimised too; with triples, pass them in
    ``params``.

    * ``mode="efficient"`` (the reference default): every step replaces each adapter's
      gradients by LoRA-Pro's (:func:`lora_pro_gradients`), then the inner optimizer steps.
      ``inner`` may be any ``torch.optim.Optimizer`` holding every lora_A and lora_B (then
      ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay`` belong to it); by default it is
      ``torch.optim.AdamW`` with A- and B-shaped state, as the reference code.
    * ``mode="full"``: :class:`LoRAProAdam`, Adam with full out×in state on the equivalent
      gradient (the blog's "LoRA-Pro with Adam"; no optimizer-memory saving over full
      fine-tuning).

    ``x_mode``: ``"sylvester"`` (default; the r×r Sylvester equation solved by eigen-
    decomposition), ``"symmetric"`` (the docs/reference/algorithms.md#lora-differences corrected
    form, not the reference code's) or ``"zero"`` (X = 0 in the paper's parameterisation). ``ridge``
    is added to the r×r Gram matrices before inverting (the reference's 1e-8). Linear algebra runs
    in fp32 for bf16 or fp16 parameters.

    Both factors must have full rank r: a lora_B at PEFT's zero init (or a factor whose Gram
    matrix has smallest/largest eigenvalue ≤ ``rank_tol``) raises ``ValueError`` at
    construction and at ``step``, with the advice to initialise with LoRA-GA. A step raises
    before writing anything when one factor of an adapter has a gradient and the other has
    none, or when a gradient is not finite (``FloatingPointError``); adapters with no
    gradient at all are skipped.

    LoRA dropout breaks the exact relation g_A = s Bᵀ G, g_B = s G Aᵀ the adjustment relies on
    (docs/reference/algorithms.md#lora-pro-edge-cases); use ``dropout=0`` with LoRA-Pro.

    It behaves as the inner optimizer: ``param_groups``, ``state``, ``state_dict()`` and
    ``load_state_dict()`` are the inner optimizer's (LR schedulers work on it), and no state is
    keyed by name. ``load_state_dict()`` is checked against the parameters before anything
    changes (except for an ``inner`` given by the user): ValueError naming the parameter, the
    optimizer left as it was (docs/lora.md, "Checkpoints"). After an efficient step the
    ``.grad`` of the factors hold the adjusted gradients.

    Under FSDP2 the factors and their gradients are gathered (r×(in+out) numbers per
    adapter), the adjustment is computed whole on every rank and each rank keeps its slice; the
    full mode's out×in moments are then whole tensors, the same on every rank.

    Deviations from the reference: explicit triples instead of name pairing; a rank check
    instead of a silently degenerate step; the symmetric X uses (AAᵀ)^{-1} where the reference
    code multiplies by AAᵀ (docs/reference/algorithms.md#lora-differences); the Sylvester equation
    is solved through two symmetric r×r eigen-decompositions instead of a complex ``eig``; full mode
    keeps its moments in fp32 (the reference: bf16).
    """

    #: its state dict is the inner optimizer's, with no record of its own
    records_state = False

    def __init__(
        self,
        lora: nn.Module | Iterable[Any],
        params: Iterable[Tensor] | None = None,
        *,
        mode: str = "efficient",
        x_mode: str = "sylvester",
        inner: Optimizer | None = None,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        ridge: float = 1e-8,
        rank_tol: float = 1e-6,
    ) -> None:
        check_choice("mode", mode, MODES)
        check_choice("x_mode", x_mode, X_MODES)
        check_non_negative("ridge", ridge)
        check_non_negative("rank_tol", rank_tol)
        triples, labels, extra = self._resolve(lora, params)
        self.triples: list[LoRATriple] = triples
        self.labels: list[str] = labels
        self.mode, self.x_mode = mode, x_mode
        self.ridge, self.rank_tol = float(ridge), float(rank_tol)
        hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        given = [k for k, v in hyper.items() if v is not None]
        lr = 1e-3 if lr is None else lr
        betas = (0.9, 0.999) if betas is None else betas
        eps = 1e-8 if eps is None else eps
        weight_decay = 0.0 if weight_decay is None else weight_decay
        _check_adam_settings({"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._check_full_rank()
        # the default inner optimizer's layout is known: its loads are checked first
        self._owns_inner = mode == "efficient" and inner is None
        if inner is not None:
            if mode == "full":
                raise ValueError("inner is for mode='efficient'; mode='full' runs its own Adam")
            if given or params is not None:
                raise ValueError(
                    f"with an inner optimizer, give {', '.join(given) or 'params'} to the inner "
                    "optimizer, not to LoRAPro"
                )
            if not isinstance(inner, Optimizer):
                raise ValueError(f"inner must be a torch.optim.Optimizer, got {inner!r}")
            held = {id(p) for g in inner.param_groups for p in g["params"]}
            for t, label in zip(triples, labels, strict=True):
                if id(t.lora_A) not in held or id(t.lora_B) not in held:
                    raise ValueError(f"the inner optimizer does not hold the factors of {label}")
        elif mode == "efficient":
            lora_params = [p for t in triples for p in (t.lora_A, t.lora_B)]
            inner = torch.optim.AdamW(
                lora_params + extra, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
            )
        else:
            groups: list[dict[str, Any]] = [
                {
                    "params": [t.lora_A, t.lora_B]
                    + ([t.base_weight] if t.base_weight is not None else []),
                    "lora_scale": float(t.scale),
                }
                for t in triples
            ]
            if extra:
                groups.append({"params": extra, "lora_scale": None})
            inner = LoRAProAdam(
                groups,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                x_mode=x_mode,
                ridge=ridge,
                rank_tol=rank_tol,
            )
        #: How load errors name a parameter: "lora_A of adapter 'layers.0.q_proj'", by id.
        self._roles: dict[int, str] = {}
        for t, label in zip(triples, labels, strict=True):
            self._roles[id(t.lora_A)] = f"lora_A of {label}"
            self._roles[id(t.lora_B)] = f"lora_B of {label}"
            if t.base_weight is not None:
                self._roles[id(t.base_weight)] = f"base weight of {label}"
        if isinstance(inner, LoRAProAdam):
            inner.param_roles = self._roles
        super().__init__(inner)

    # -- construction helpers -----------------------------------------------------------------
    @staticmethod
    def _resolve(
        lora: nn.Module | Iterable[Any], params: Iterable[Tensor] | None
    ) -> tuple[list[LoRATriple], list[str], list[Tensor]]:
        if isinstance(lora, nn.Module):
            if params is not None:
                raise ValueError(
                    "with a model, LoRAPro optimises all its trainable parameters; do not pass "
                    "params"
                )
            adapters = find_lora_adapters(lora)
            triples = [a.triple() for a in adapters]
            labels = [f"adapter {a.label!r}" for a in adapters]
        else:
            if isinstance(lora, Tensor):
                raise ValueError("lora must be a model or an iterable of triples, not a tensor")
            triples = [_as_triple(item, i) for i, item in enumerate(lora)]
            labels = [f"lora[{i}]" for i in range(len(triples))]
        if not triples:
            raise ValueError("LoRAPro got no LoRA adapters (lora has no triples / LoRA layers)")
        seen: set[int] = set()
        for t, label in zip(triples, labels, strict=True):
            _check_triple(t, label)
            for p in (t.lora_A, t.lora_B):
                if id(p) in seen:
                    raise ValueError(f"{label}: a factor appears in more than one triple")
                seen.add(id(p))
        extra: list[Tensor]
        if isinstance(lora, nn.Module):
            extra = [p for p in lora.parameters() if p.requires_grad and id(p) not in seen]
        else:
            extra = list(params) if params is not None else []
            if any(id(p) in seen for p in extra):
                raise ValueError("params must not repeat the LoRA factors")
        return triples, labels, list({id(p): p for p in extra}.values())

    def _check_full_rank(self) -> None:
        with torch.no_grad():
            compute = [
                (
                    full_tensor(t.lora_A).detach().to(_compute_dtype(t.lora_A.dtype)),
                    full_tensor(t.lora_B).detach(),
                )
                for t in self.triples
            ]
            As = [A for A, _ in compute]
            Bs = [B.to(A.dtype) for A, B in compute]
            spectra = _spectra(As, Bs)
            zeros = [(torch.zeros(()), torch.zeros(()))] * len(spectra)
            _check_spectra(spectra, zeros, self.labels, self.rank_tol, "danlu.lora.LoRAPro")

    # -- the Optimizer interface: the inner optimizer's (OptimizerWrapper) -----------------------
    @property
    def inner(self) -> Optimizer:
        """The optimizer that steps the adjusted gradients (``self.optimizer``)."""
        return self.optimizer

    def refuses_per_parameter(self, where: str) -> str | None:
        return (
            f"{where}: danlu.lora.LoRAPro adjusts the gradients of an adapter's two factors "
            "together, so it cannot step one parameter at a time inside backward"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """The inner optimizer's, all-or-nothing and checked against the parameters first: a
        state dict that would fail a later step raises ValueError naming the parameter and
        changes nothing. mode="full" checks in :class:`LoRAProAdam`; the default
        mode="efficient" optimizer (torch.optim.AdamW) here; an ``inner`` given by the user
        loads as it does itself."""
        super().load_state_dict(state_dict)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if self._owns_inner:
            _check_adamw_state_dict(self.inner, state_dict, self._roles)
        super()._load(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.mode == "efficient":
            self._adjust_gradients()
        self.inner.step()
        return loss

    def _adjust_gradients(self) -> None:
        work: list[tuple[LoRATriple, Tensor, Tensor]] = []
        labels = []
        for t, label in zip(self.triples, self.labels, strict=True):
            gA, gB = t.lora_A.grad, t.lora_B.grad
            if gA is None and gB is None:
                continue
            if gA is None or gB is None:
                missing = "lora_A" if gA is None else "lora_B"
                raise ValueError(
                    f"danlu.lora.LoRAPro: {missing} of {label} has no gradient while the other "
                    "factor has one; nothing was modified"
                )
            if gA.is_sparse or gB.is_sparse:
                raise RuntimeError(f"danlu.lora.LoRAPro: sparse gradient for {label}")
            work.append((t, gA, gB))
            labels.append(label)
        compute = [
            tuple(
                full_tensor(x).detach().to(_compute_dtype(t.lora_A.dtype))
                for x in (t.lora_A, t.lora_B, gA, gB)
            )
            for t, gA, gB in work
        ]
        spectra = _spectra([c[0] for c in compute], [c[1] for c in compute])
        _check_spectra(
            spectra, [(c[2], c[3]) for c in compute], labels, self.rank_tol, "danlu.lora.LoRAPro"
        )
        adjusted = [
            _adjust(A, B, gA, gB, float(t.scale), spec, x_mode=self.x_mode, ridge=self.ridge)[:2]
            for (t, _, _), (A, B, gA, gB), spec in zip(work, compute, spectra, strict=True)
        ]
        for (_, raw_A, raw_B), (hat_A, hat_B) in zip(work, adjusted, strict=True):
            # under FSDP2 each rank keeps its slice of the (identical) adjusted gradients
            local(raw_A).copy_(local_slice(hat_A, raw_A))
            local(raw_B).copy_(local_slice(hat_B, raw_B))

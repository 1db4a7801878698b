"""A minimal LoRA layer, injection into a model, and discovery of LoRA adapters
(docs/reference/algorithms.md#conventions, #lora).

Naming follows PyTorch/PEFT (docs/reference/algorithms.md#conventions): for ``nn.Linear`` the
effective weight is ``W = W0 + scale · lora_B @ lora_A`` with ``lora_A`` (r×in, the right factor)
and ``lora_B`` (out×r, the left factor). The blog's A is ``lora_B`` and the blog's B is ``lora_A``.

:func:`find_lora_adapters` returns the same view of danlu's :class:`LoRALinear` and of PEFT's
LoRA ``Linear`` layers (``LoraModel`` / ``PeftModel``), so LoRA-GA and LoRA-Pro accept either.
Adapters are found by module structure, never by pairing parameter names.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoRAAdapter",
    "LoRALinear",
    "LoRATriple",
    "find_lora_adapters",
    "inject",
    "lora_triples",
]

Target = str | Iterable[str] | Callable[[str, nn.Module], bool]


def _check_rank(rank: Any, in_features: int, out_features: int, *, where: str) -> None:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < limit:
        raise ValueError(
            f"{where}rank must be an integer in [1, {limit - 1}] (below min(in_features, "
            f"out_features) = min({in_features}, {out_features})), got {rank!r}"
        )


def _check_dropout(dropout: Any) -> None:
    ok = not isinstance(dropout, bool) and isinstance(dropout, int | float)
    if not ok or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def lora_scale(rank: int, alpha: float | None, rslora: bool) -> float:
    """s = α/r, or α/√r with rsLoRA; α defaults to r (s = 1 without rsLoRA)."""
    alpha = float(rank) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


class LoRALinear(nn.Module):
    r"""``nn.Linear`` with a LoRA adapter: :math:`y = x W_0^\top + b + s\,x A^\top B^\top`.

    ``base`` (the wrapped ``nn.Linear``) is frozen; ``lora_A`` (r×in) starts like PEFT's default
    (Kaiming-uniform with a = √5) and ``lora_B`` (out×r) at zero, so the layer starts as
    ``base``. ``scale`` is α/r (α/√r with ``rslora=True``); α defaults to r. ``dropout`` acts on
    the input of the LoRA branch only. The factors have the base weight's dtype and device.

    Args:
        base: the ``nn.Linear`` to adapt (kept as ``self.base``).
        rank: r, an integer in [1, min(in_features, out_features) − 1].
        alpha: α > 0 (default r).
        rslora: use s = α/√r.
        dropout: dropout probability in [0, 1) on the LoRA branch's input.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        *,
        rslora: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_rank(rank, base.in_features, base.out_features, where="")
        _check_dropout(dropout)
        self.base = base
        self.rank = rank
        self.scale = lora_scale(rank, alpha, rslora)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scale * lora

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


# ----------------------------------------------------------------------------------------------
# A uniform view of danlu and PEFT adapters.


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """One LoRA adapter on one linear layer: ``W = W0 + scale · lora_B @ lora_A``.

    ``base_weight`` is (out, in), or (in, out) when ``fan_in_fan_out`` (PEFT on GPT-2's
    ``Conv1D``). ``key`` tells adapters of the same module apart (the PEFT adapter name).
    """

    name: str
    module: nn.Module
    key: str
    lora_A: Tensor
    lora_B: Tensor
    scale: float
    base_weight: Tensor
    fan_in_fan_out: bool = False

    @property
    def label(self) -> str:
        """The module name, with the adapter name when it is not PEFT's ``"default"``."""
        return self.name if self.key in ("", "default") else f"{self.name}[{self.key}]"

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def triple(self) -> LoRATriple:
        return LoRATriple(self.lora_A, self.lora_B, self.scale, self.base_weight)


class LoRATriple(NamedTuple):
    """An explicit (lora_A, lora_B, scale) triple for LoRA-Pro; ``base_weight`` is optional
    (LoRA-Pro's full mode decays it when ``weight_decay > 0``)."""

    lora_A: Tensor
    lora_B: Tensor
    scale: float
    base_weight: Tensor | None = None


def _peft_linear_type() -> type | None:
    """PEFT's LoRA ``Linear`` class, if PEFT is loaded (a PEFT model cannot exist otherwise, so
    danlu never imports PEFT itself)."""
    module = sys.modules.get("peft.tuners.lora.layer")
    return getattr(module, "Linear", None)


def _peft_adapters(name: str, module: Any) -> list[LoRAAdapter]:
    out = []
    variants = getattr(module, "lora_variant", {}) or {}
    for key in module.active_adapters:
        if key not in module.lora_A:
            continue
        label = f"{name} (adapter {key!r})"
        if key in variants or getattr(module, "use_dora", {}).get(key, False):
            raise ValueError(
                f"{label} is a {type(variants.get(key)).__name__} LoRA variant; danlu.lora "
                "supports plain LoRA only"
            )
        if module.merged:
            raise ValueError(f"{label} is merged into its base weight; unmerge it first")
        if getattr(module, "lora_bias", {}).get(key, False):
            raise ValueError(f"{label} has a LoRA bias (lora_bias=True); not supported")
        out.append(
            LoRAAdapter(
                name=name,
                module=module,
                key=key,
                lora_A=module.lora_A[key].weight,
                lora_B=module.lora_B[key].weight,
                scale=float(module.scaling[key]),
                base_weight=module.get_base_layer().weight,
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
            )
        )
    return out


def find_lora_adapters(model: nn.Module) -> list[LoRAAdapter]:
    """Every LoRA adapter on a linear layer of ``model``, in ``named_modules`` order.

    Finds danlu's :class:`LoRALinear` and the active adapters of PEFT's LoRA ``Linear`` layers
    (a ``PeftModel`` or ``LoraModel``). PEFT's DoRA and other variants, merged adapters and
    LoRA biases raise ``ValueError``; PEFT's embedding and convolution adapters are not
    linear layers and are not returned.
    """
    if isinstance(model, LoRALinear):
        named: Iterable[tuple[str, nn.Module]] = [("", model)]
    else:
        named = model.named_modules()
    peft_linear = _peft_linear_type()
    out: list[LoRAAdapter] = []
    for name, module in named:
        if isinstance(module, LoRALinear):
            out.append(
                LoRAAdapter(
                    name=name,
                    module=module,
                    key="",
                    lora_A=module.lora_A,
                    lora_B=module.lora_B,
                    scale=module.scale,
                    base_weight=module.base.weight,
                )
            )
        elif peft_linear is not None and isinstance(module, peft_linear):
            out.extend(_peft_adapters(name, module))
    return out


def lora_triples(model: nn.Module) -> list[LoRATriple]:
    """(lora_A, lora_B, scale, base_weight) for each adapter of :func:`find_lora_adapters`."""
    return [adapter.triple() for adapter in find_lora_adapters(model)]


# ----------------------------------------------------------------------------------------------
# Injection.


def _target_matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if callable(target):
        return target
    if isinstance(target, str):
        pattern = re.compile(target)
        return lambda name, module: pattern.fullmatch(name) is not None
    keys = list(target) if isinstance(target, Iterable) else []
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            "target must be a regex string, a non-empty list of module names (or name "
            f"suffixes), or a callable(name, module) -> bool, got {target!r}"
        )
    return lambda name, module: any(name == k or name.endswith("." + k) for k in keys)


def inject(
    model: nn.Module,
    target: Target,
    rank: int,
    alpha: float | None = None,
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    freeze_base: bool = True,
) -> list[str]:
    """Replace the matching ``nn.Linear`` layers of ``model`` with :class:`LoRALinear`.

    ``target`` follows PEFT's ``target_modules``: a string is a regular expression matched
    against the whole qualified module name; a list matches names equal to an entry or ending
    in ``"." + entry``; a callable ``(name, module) -> bool`` decides itself. Only
    ``nn.Linear`` layers are replaced. With ``freeze_base`` (default) every parameter of the
    model other than the new LoRA factors stops requiring gradients, as PEFT does.

    All checks run before the model is changed: no matching layer, or a rank not below
    ``min(in_features, out_features)`` for some layer, raises ``ValueError`` and leaves the
    model as it was. Returns the qualified names of the replaced layers.
    """
    match = _target_matcher(target)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and match(name, module)
    ]
    if not chosen:
        raise ValueError(f"no nn.Linear layer of the model matches target={target!r}")
    for name, module in chosen:
        _check_rank(rank, module.in_features, module.out_features, where=f"{name!r}: ")
    lora_scale(rank, alpha, rslora)
    _check_dropout(dropout)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    replaced = []
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, rslora=rslora, dropout=dropout))
        replaced.append(name)
    return replaced

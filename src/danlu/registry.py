"""The optimizer registry: one frozen record per optimizer (DESIGN.md "Layout").

It drives :func:`create_optimizer`, the ``danlu compare`` CLI, the README table and the shared
conformance test suite.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["REGISTRY", "OptimizerInfo", "create_optimizer", "get_info", "register"]


@dataclass(frozen=True)
class OptimizerInfo:
    """What danlu knows about one optimizer.

    ``state_bytes`` and ``state_bytes_accum`` are optimizer-state bytes per fp32 parameter
    without and with k-step gradient accumulation (SPEC.md §0 table); they are strings because
    some are approximate ("≈0").
    """

    name: str
    cls: type[Optimizer]
    spec_section: str
    summary: str
    state_bytes: str
    state_bytes_accum: str
    defaults: Mapping[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, OptimizerInfo] = {}


def _signature_defaults(cls: type) -> Mapping[str, Any]:
    params = inspect.signature(cls).parameters
    return MappingProxyType(
        {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    )


def register(
    name: str,
    cls: type[Optimizer],
    *,
    spec_section: str,
    summary: str,
    state_bytes: str,
    state_bytes_accum: str,
) -> OptimizerInfo:
    key = name.lower()
    if key in REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    info = OptimizerInfo(
        name=key,
        cls=cls,
        spec_section=spec_section,
        summary=summary,
        state_bytes=state_bytes,
        state_bytes_accum=state_bytes_accum,
        defaults=_signature_defaults(cls),
    )
    REGISTRY[key] = info
    return info


def get_info(name: str) -> OptimizerInfo:
    key = name.lower() if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def create_optimizer(name: str, params: nn.Module | Iterable[Any], **kwargs: Any) -> Optimizer:
    """Build a registered optimizer by name: ``create_optimizer("tiger", model, lr=1.5e-3)``.

    ``params`` may be a module (then :func:`danlu.param_groups` tags its parameters, with
    ``weight_decay`` taken from ``kwargs`` for the matrix and embedding groups), an iterable
    of parameters, named parameters or param groups. ``kwargs`` go to the constructor.
    """
    from danlu.params import param_groups

    info = get_info(name)
    if isinstance(params, nn.Module):
        params = param_groups(params, weight_decay=kwargs.get("weight_decay"))
    return info.cls(params, **kwargs)

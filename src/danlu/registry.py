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
    without and with k-step gradient accumulation
    (docs/reference/algorithms.md#optimizer-state-memory); they are strings because some are
    approximate ("≈0").
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


def create_optimizer(
    first: str | nn.Module | Iterable[Any],
    second: str | nn.Module | Iterable[Any] | None = None,
    /,
    *,
    opt: str | None = None,
    filter_bias_and_bn: bool = True,
    **kwargs: Any,
) -> Optimizer:
    """Build a registered optimizer by name, with the arguments in either order.

    * danlu style: ``create_optimizer("tiger", model, lr=1.5e-3)``;
    * timm style (``timm.optim.create_optimizer_v2``): ``create_optimizer(model, "tiger",
      lr=1.5e-3)`` or ``create_optimizer(model, opt="tiger", lr=1.5e-3)``.

    The parameters may be a module, an iterable of parameters, named parameters or param
    groups. A module is split by :func:`danlu.param_groups`: matrices and embeddings get
    ``weight_decay`` (from ``kwargs``, else the optimizer's default) and every 1-D parameter,
    bias and norm gain gets none, which is timm's no-decay convention (ndim ≤ 1 or a ``.bias``)
    plus the ``kind`` tags that Tiger and Amos read. As in timm, the names returned by
    ``model.no_weight_decay()``, when the model defines it, get no decay either, and
    ``filter_bias_and_bn=False`` passes the module's trainable parameters as one untagged
    group instead. The remaining ``kwargs`` go to the constructor.
    """
    from danlu.core.shell import check_bool
    from danlu.params import param_groups

    name, params = _name_and_params(first, second, opt)
    info = get_info(name)
    check_bool("filter_bias_and_bn", filter_bias_and_bn)
    if isinstance(params, nn.Module):
        model = params
        if filter_bias_and_bn:
            groups = param_groups(model, weight_decay=kwargs.get("weight_decay"))
            params = _no_weight_decay_split(groups, _no_weight_decay_names(model))
        else:
            params = [p for p in model.parameters() if p.requires_grad]
    return info.cls(params, **kwargs)


def _name_and_params(first: Any, second: Any, opt: str | None) -> tuple[str, Any]:
    if isinstance(first, str):
        if opt is not None:
            raise ValueError(f"opt: the optimizer is already named {first!r}")
        if second is None or isinstance(second, str):
            raise ValueError(
                "params: give the parameters (a module or an iterable of parameters) after "
                f"the optimizer name, got {second!r}"
            )
        return first, second
    if isinstance(second, str):
        if opt is not None:
            raise ValueError(f"opt: the optimizer is already named {second!r}")
        return second, first
    if second is not None:
        raise ValueError(
            "create_optimizer takes one optimizer name (a string) and one set of parameters, "
            f"got {type(first).__name__} and {type(second).__name__}"
        )
    if not isinstance(opt, str):
        raise ValueError(
            f"opt: name the optimizer (one of {', '.join(sorted(REGISTRY))}), got {opt!r}"
        )
    return opt, first


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    skip = getattr(model, "no_weight_decay", None)
    return set(skip()) if callable(skip) else set()


def _no_weight_decay_split(groups: list[dict[str, Any]], skip: set[str]) -> list[dict[str, Any]]:
    """Move the parameters named in ``skip`` into copies of their groups with no decay."""
    if not skip:
        return groups
    out = []
    for group in groups:
        pairs = list(zip(group["param_names"], group["params"], strict=True))
        kept = [(n, p) for n, p in pairs if n not in skip]
        moved = [(n, p) for n, p in pairs if n in skip]
        for members, extra in ((kept, {}), (moved, {"weight_decay": 0.0})):
            if members:
                names, params = zip(*members, strict=True)
                out.append({**group, **extra, "params": list(params), "param_names": list(names)})
    return out

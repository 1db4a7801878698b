"""The optimizer registry: one frozen record per optimizer, declared where the optimizer is
defined (``register(...)`` at the bottom of ``danlu/algorithms/<name>/optimizer.py``).

It drives everything that lists optimizers: :func:`create_optimizer`, the ``danlu compare``
CLI (its choices, each optimizer's transfer rule, grid centres and plot colour), the README
table and the docs check, the shared conformance, fuzz and path-parity tests and the
benchmarks.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = [
    "PATHS",
    "REGISTRY",
    "Baseline",
    "CompareSettings",
    "OptimizerInfo",
    "compare_names",
    "create_optimizer",
    "get_info",
    "register",
]

#: The implementation paths an algorithm may declare, and what selects each
#: (``danlu.core.tensors.select_path``):
#:
#: * ``"single"``: the reference loop, one tensor at a time. Every algorithm has it. It runs
#:   with ``foreach=False, fused=False`` on CUDA, and on CPU where the algorithm has no
#:   ``"chunked"`` path (with one, CPU gets the chunked loop instead);
#: * ``"foreach"``: torch's multi-tensor ``_foreach`` ops, ``foreach=True``;
#: * ``"chunked"``: the single-tensor rule on cache-sized slices, the CPU default
#:   (bit-identical to ``"single"``);
#: * ``"compiled"``: the foreach math compiled by ``torch.compile``, ``fused=True`` on CPU;
#: * ``"triton"``: the fused Triton kernels, the CUDA default (and ``fused=True`` there);
#: * ``"dtensor"``: DTensor (FSDP2) parameters, with whole-tensor means and norms reduced
#:   across the shards (elementwise rules need no path of their own: they run on the local
#:   slices).
PATHS = ("single", "foreach", "chunked", "compiled", "triton", "dtensor")


@dataclass(frozen=True)
class Baseline:
    """A ``danlu compare`` task's AdamW setting, from which the blog's transfer rules derive
    every other optimizer's (each :attr:`CompareSettings.rule`)."""

    lr: float
    weight_decay: float
    batches_per_epoch: int  # N in Amos's ξ ≈ 1/√N
    vision: bool = False  # a vision task (the blog's Tiger β: 0.945 for vision, 0.965 else)


@dataclass(frozen=True)
class CompareSettings:
    """How ``danlu compare`` runs one optimizer.

    * ``rule``: its hyper-parameters from the task's AdamW :class:`Baseline` (the blog's
      transfer rule), run as a marked point of the lr grid;
    * ``rule_note``: that rule in a few words, for the tables and results.json;
    * ``rule_claim``: the blog's claim about the rule that the run tests (None: no claim);
    * ``matches_adamw_claim``: the blog's claim that it reaches AdamW's quality with half the
      state (None: no claim);
    * ``blog``: the kexue.fm article number the claims cite;
    * ``centres``: per task, the measured centre of its lr grid (None or absent: the rule's
      lr), from ``benchmarks/compare_centres.py`` (docs/compare.md);
    * ``grid_overrides``: per task, hyper-parameters of the grid other than the rule's;
    * ``colour``: its colour in every figure; ``rank``: its place in the default list.
    """

    rule: Callable[[Baseline], dict[str, Any]]
    rule_note: str
    rank: int
    colour: str
    rule_claim: str | None = None
    matches_adamw_claim: str | None = None
    blog: str | None = None
    centres: Mapping[str, float | None] = field(default_factory=dict)
    grid_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerInfo:
    """What danlu knows about one optimizer.

    ``reference`` is its section of the algorithms reference
    (``docs/reference/algorithms.md#<anchor>``). ``paths`` maps each implementation path it
    has (:data:`PATHS`) to the constructor keywords that select it: on CPU for ``"single"``
    (CUDA where the algorithm also has ``"chunked"``), ``"foreach"``, ``"chunked"`` and
    ``"compiled"``, on CUDA for ``"triton"``, with DTensor parameters for ``"dtensor"``.
    ``state_bytes`` and ``state_bytes_accum`` are optimizer-state bytes per fp32 parameter
    without and with k-step gradient accumulation
    (docs/reference/algorithms.md#optimizer-state-memory); they are strings because some are
    approximate ("≈0"). ``compare`` is how ``danlu compare`` runs it (None: not offered there).
    """

    name: str
    cls: type[Optimizer]
    reference: str
    summary: str
    state_bytes: str
    state_bytes_accum: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    paths: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    compare: CompareSettings | None = None

    @property
    def spec_section(self) -> str:
        """Deprecated: ``reference``. (It cited a section of a file that was never shipped.)"""
        warnings.warn(
            "OptimizerInfo.spec_section is deprecated; use OptimizerInfo.reference (a link into "
            "docs/reference/algorithms.md)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.reference


REGISTRY: dict[str, OptimizerInfo] = {}


def _signature_defaults(cls: type) -> Mapping[str, Any]:
    params = inspect.signature(cls).parameters
    return MappingProxyType(
        {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    )


def _check_paths(name: str, cls: type, paths: Mapping[str, Mapping[str, Any]]) -> None:
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"{name}: paths: unknown path {unknown[0]!r}; choose from {PATHS}")
    if "single" not in paths:
        raise ValueError(f"{name}: paths must include 'single' (the reference loop)")
    accepted = inspect.signature(cls).parameters
    for path, options in paths.items():
        for key in options:
            if key not in accepted:
                raise ValueError(
                    f"{name}: paths[{path!r}] sets {key!r}, which {cls.__name__} does not take"
                )


def register(
    name: str,
    cls: type[Optimizer],
    *,
    reference: str | None = None,
    summary: str,
    state_bytes: str,
    state_bytes_accum: str,
    paths: Mapping[str, Mapping[str, Any]] | None = None,
    compare: CompareSettings | None = None,
    spec_section: str | None = None,
) -> OptimizerInfo:
    """Record an optimizer (see :class:`OptimizerInfo`). ``paths`` defaults to the single
    path alone (selected by no keyword); ``spec_section`` is the deprecated name of
    ``reference``."""
    key = name.lower()
    if key in REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    if spec_section is not None:
        warnings.warn(
            "register(spec_section=...) is deprecated; pass reference= (a link into the docs)",
            DeprecationWarning,
            stacklevel=2,
        )
        if reference is None:
            reference = spec_section
    if reference is None:
        raise ValueError(f"{name}: give reference=, the link to its docs section")
    paths = {"single": {}} if paths is None else paths
    _check_paths(key, cls, paths)
    info = OptimizerInfo(
        name=key,
        cls=cls,
        reference=reference,
        summary=summary,
        state_bytes=state_bytes,
        state_bytes_accum=state_bytes_accum,
        defaults=_signature_defaults(cls),
        paths=MappingProxyType({p: MappingProxyType(dict(o)) for p, o in paths.items()}),
        compare=compare,
    )
    REGISTRY[key] = info
    return info


def get_info(name: str) -> OptimizerInfo:
    key = name.lower() if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


def compare_names() -> tuple[str, ...]:
    """The optimizers ``danlu compare`` offers, in its display order."""
    ranked = sorted(
        (info.compare.rank, info.name) for info in REGISTRY.values() if info.compare is not None
    )
    return tuple(name for _, name in ranked)


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

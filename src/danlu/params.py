"""Parameter kinds and param-group building, SPEC.md §2(c) (and DESIGN.md "Public API").

``param_groups(model)`` walks the modules and returns groups tagged with ``kind`` and
``center`` that Tiger reads (torch optimizers ignore the extra keys, so the same groups give
the usual "no decay for biases and norms" split with AdamW too).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["classify_parameters", "is_norm_layer", "param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_layer(module: nn.Module) -> bool:
    """Torch's norm layers, and any class whose name ends in "Norm" (LlamaRMSNorm, T5LayerNorm,
    ...): their ``weight`` is a gain centred at 1."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def classify_parameters(model: nn.Module) -> list[tuple[str, Tensor, str, float]]:
    """(name, parameter, kind, center) for each trainable parameter, each listed once.

    * ``nn.Embedding`` / ``nn.EmbeddingBag`` weights → ``"embedding"``;
    * norm-layer weights → ``"elementwise"`` with center 1;
    * biases (norm biases included) → ``"elementwise"`` with center 0;
    * any other parameter with ndim ≤ 1 → ``"elementwise"`` with center 0 (the fallback Tiger
      uses for untagged tensors);
    * everything else → ``"matrix"``.

    A parameter shared by several modules (tied embeddings) takes the kind of its first owner
    in ``named_modules`` order.
    """
    seen: set[int] = set()
    out: list[tuple[str, Tensor, str, float]] = []
    for module_name, module in model.named_modules():
        for local_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{module_name}.{local_name}" if module_name else local_name
            if isinstance(module, nn.Embedding | nn.EmbeddingBag) and local_name == "weight":
                kind, center = "embedding", 0.0
            elif is_norm_layer(module) and local_name == "weight":
                kind, center = "elementwise", 1.0
            elif local_name == "bias" or p.dim() <= 1:
                kind, center = "elementwise", 0.0
            else:
                kind, center = "matrix", 0.0
            out.append((name, p, kind, center))
    return out


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Param groups for ``model`` tagged with ``kind`` and ``center`` (see
    :func:`classify_parameters`).

    Elementwise groups get ``weight_decay=0``; matrix and embedding groups get ``weight_decay``
    when it is given, otherwise the optimizer's default. Each group carries ``param_names`` so
    that error messages (and ``state_dict``) name the parameters.
    """
    if weight_decay is not None and (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, int | float)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    buckets: dict[tuple[str, float], dict[str, Any]] = {}
    for name, p, kind, center in classify_parameters(model):
        group = buckets.get((kind, center))
        if group is None:
            group = {"params": [], "param_names": [], "kind": kind, "center": center}
            if kind == "elementwise":
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
            buckets[(kind, center)] = group
        group["params"].append(p)
        group["param_names"].append(name)
    order = [("matrix", 0.0), ("embedding", 0.0), ("elementwise", 1.0), ("elementwise", 0.0)]
    return [buckets[key] for key in order if key in buckets]

"""Parameter kinds and param-group building, docs/reference/algorithms.md#tiger-edge-cases and
#amos-optimizer (and DESIGN.md "Public API").

``param_groups(model)`` walks the modules and returns groups tagged with ``kind``, ``center``
and ``eta`` that Tiger and Amos read (torch optimizers ignore the extra keys, so the same groups
give the usual "no decay for biases and norms" split with AdamW too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["OutputLayerSpec", "classify_parameters", "is_norm_layer", "param_groups"]

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


OutputLayerSpec = nn.Module | str | Tensor | Iterable[nn.Module | str | Tensor]


def _output_parameter_ids(model: nn.Module, output_layer: OutputLayerSpec | None) -> set[int]:
    """Ids of the parameters named by ``output_layer``: modules (or their names in
    ``model.named_modules()``), parameters (or their names in ``model.named_parameters()``)."""
    if output_layer is None:
        return set()
    items: list[Any]
    if isinstance(output_layer, nn.Module | str | Tensor):
        items = [output_layer]
    elif isinstance(output_layer, Iterable):
        items = list(output_layer)
    else:
        raise ValueError(
            "output_layer must be a module, a parameter, a name or a list of them, "
            f"got {type(output_layer).__name__}"
        )
    modules = dict(model.named_modules())
    named = dict(model.named_parameters(remove_duplicate=False))
    owned = {id(p) for p in model.parameters()}
    ids: set[int] = set()
    for item in items:
        if isinstance(item, str):
            if item in modules:
                item = modules[item]
            elif item in named:
                item = named[item]
            else:
                raise ValueError(
                    f"output_layer {item!r} is neither a module nor a parameter name of the model"
                )
        params: list[Tensor]
        if isinstance(item, nn.Module):
            params = list(item.parameters())
        elif isinstance(item, Tensor):
            params = [item]
        else:
            raise ValueError(
                f"output_layer must be a module, a parameter or a name, got {type(item).__name__}"
            )
        if not params or any(id(p) not in owned for p in params):
            raise ValueError(f"output_layer {item!r} has no parameters of this model")
        ids.update(id(p) for p in params)
    return ids


def param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    *,
    output_layer: OutputLayerSpec | None = None,
) -> list[dict[str, Any]]:
    """Param groups for ``model`` tagged with ``kind``, ``center`` (see
    :func:`classify_parameters`) and Amos's ``eta`` (docs/reference/algorithms.md#amos-optimizer).

    Elementwise groups get ``weight_decay=0``; matrix and embedding groups get ``weight_decay``
    when it is given, otherwise the optimizer's default. Each group carries ``param_names`` so
    that error messages (and ``state_dict``) name the parameters.

    ``eta`` (read by :class:`danlu.Amos`, ignored by the others) is 0.5 for elementwise groups
    (biases and norm parameters) and ``"auto"`` (√(2/fan_in) per tensor, for hidden layers)
    for matrix and embedding groups, so hidden layers of different widths share one group. The
    ≥2-D parameters of ``output_layer`` (a module, a parameter, their names, or a list of them)
    go to their own group with ``eta="output"`` (√(1/fan_in)); its biases stay elementwise.
    Without ``output_layer`` the groups are the same four as without Amos.
    """
    if weight_decay is not None and (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, int | float)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    output_ids = _output_parameter_ids(model, output_layer)
    buckets: dict[tuple[str, float, float | str], dict[str, Any]] = {}
    for name, p, kind, center in classify_parameters(model):
        if kind == "elementwise":
            eta: float | str = 0.5
        else:
            eta = "output" if id(p) in output_ids else "auto"
        key = (kind, center, eta)
        group = buckets.get(key)
        if group is None:
            group = {"params": [], "param_names": [], "kind": kind, "center": center, "eta": eta}
            if kind == "elementwise":
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = float(weight_decay)
            buckets[key] = group
        group["params"].append(p)
        group["param_names"].append(name)
    order = [
        ("matrix", 0.0, "auto"),
        ("matrix", 0.0, "output"),
        ("embedding", 0.0, "auto"),
        ("embedding", 0.0, "output"),
        ("elementwise", 1.0, 0.5),
        ("elementwise", 0.0, 0.5),
    ]
    return [buckets[key] for key in order if key in buckets]

"""Shared plumbing for danlu's optimizer shells.

The shells validate hyper-parameters, gather the tensors of each param group and hand them to
the functional core in ``danlu.functional``. A step runs in two phases: everything that can
fail (hyper-parameter checks, sparse or complex gradients, the non-finite check under
``"raise"``) happens before the first tensor is written, so a failed step leaves parameters and
state exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.distributed import check_placements, is_dtensor

__all__ = [
    "DanluOptimizer",
    "GroupTensors",
    "check_beta",
    "check_finite",
    "check_in_range",
    "check_non_negative",
    "check_positive",
]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


# ----------------------------------------------------------------------------------------------
# Hyper-parameter checks: ValueError naming the argument and the allowed range, never assert.


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


#: The largest hyper-parameter accepted: the kernels take scalars as float32 (float64 for
#: float64 tensors), and torch raises mid-step on a scalar beyond float32's range.
MAX_SCALAR = float(torch.finfo(torch.float32).max)


def _in_float32_range(value: Any) -> bool:
    return _is_number(value) and abs(_as_float(value)) <= MAX_SCALAR  # False for NaN


def check_non_negative(name: str, value: Any) -> None:
    if not _in_float32_range(value) or _as_float(value) < 0:
        raise ValueError(f"{name} must be a number in [0, {MAX_SCALAR:.5g}], got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not _in_float32_range(value) or _as_float(value) <= 0:
        raise ValueError(f"{name} must be a number in (0, {MAX_SCALAR:.5g}], got {value!r}")


def check_in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> None:
    """Raise ValueError unless ``value`` lies in the interval (low|[low, high)|]."""
    ok = _is_number(value)
    if ok:
        x = _as_float(value)
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_finite(name: str, value: Any) -> None:
    if not _in_float32_range(value):
        raise ValueError(
            f"{name} must be a finite number of magnitude <= {MAX_SCALAR:.5g}, got {value!r}"
        )


def check_beta(name: str, value: Any) -> None:
    check_in_range(name, value, 0.0, 1.0, low_open=False, high_open=True)


def check_int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_foreach(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"foreach must be None, True or False, got {value!r}")


def check_state_dtype(value: Any, *, where: str = "") -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(
            f"{where}state_dtype must be None or a floating torch.dtype, got {value!r}"
        )


def check_implementation(group: dict[str, Any], *, where: str = "") -> None:
    """``foreach`` and ``fused`` are None, True or False, and not both True (as torch.optim)."""
    for key in ("foreach", "fused"):
        value = group.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}{key} must be None, True or False, got {value!r}")
    if group.get("foreach") and group.get("fused"):
        raise ValueError(f"{where}foreach and fused cannot both be True")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def step_buckets(steps: Sequence[Tensor]) -> dict[float, list[int]]:
    """Positions of ``steps`` (0-d CPU step counters) grouped by value, read in one host call."""
    buckets: dict[float, list[int]] = {}
    if steps:
        for i, value in enumerate(torch.stack(list(steps)).tolist()):
            buckets.setdefault(value, []).append(i)
    return buckets


# ----------------------------------------------------------------------------------------------


@dataclass
class GroupTensors:
    """The tensors of one param group that take part in a step (those with a gradient)."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


class DanluOptimizer(Optimizer):
    """Base class: argument checks, two-phase steps and error messages that name parameters.

    Subclasses implement ``_check_group`` (raise ValueError for a bad hyper-parameter) and
    ``_step(gathered)`` (the update itself, after every check has passed).
    """

    #: Human-readable name used in error messages.
    _display_name = "optimizer"
    #: State keys stored in the group's ``state_dtype`` when one is set (e.g. momentum).
    _state_dtype_keys: tuple[str, ...] = ()
    #: State keys kept in float32 (float64 for float64 params) whatever the parameter dtype
    #: (e.g. AdaFactor's statistics: 1e-30 underflows in bf16).
    _float32_state_keys: tuple[str, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_group(defaults, where="")
        super().__init__(params, defaults)

    def _state_dtype(self, group: dict[str, Any], key: str, param: Tensor) -> torch.dtype:
        """The dtype that ``state[param][key]`` is kept in."""
        if key in self._float32_state_keys:
            return torch.promote_types(param.dtype, torch.float32)
        if key in self._state_dtype_keys and group.get("state_dtype") is not None:
            return group["state_dtype"]
        return param.dtype

    # -- group checks ---------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        index = len(self.param_groups)
        self._check_group(merged, where=f"param_groups[{index}]: ")
        params = param_group["params"]
        candidates = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(candidates):
            tensor = p[1] if isinstance(p, tuple) else p
            if isinstance(tensor, Tensor) and tensor.is_complex():
                raise ValueError(
                    f"{self._display_name} does not support complex parameters "
                    f"(param_groups[{index}] parameter {i} has dtype {tensor.dtype}); "
                    "optimise torch.view_as_real(p) instead"
                )
        super().add_param_group(param_group)

    # -- stepping -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._check_group(group, where=f"param_groups[{index}]: ")
        gathered = [self._gather(index, group) for index, group in enumerate(self.param_groups)]
        self._step(gathered)
        return loss

    def _step(self, gathered: list[GroupTensors]) -> None:
        raise NotImplementedError

    def _gather(self, index: int, group: dict[str, Any]) -> GroupTensors:
        out = GroupTensors(group)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = names[i] if names is not None and i < len(names) else None
            label = f"{name!r}" if name else f"param_groups[{index}]['params'][{i}]"
            label += f" (shape {tuple(p.shape)})"
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{self._display_name} does not support sparse gradients ({label}); "
                    "use a dense embedding (nn.Embedding(sparse=False)) or danlu.Lazy"
                )
            if p.is_complex():
                raise ValueError(
                    f"{self._display_name} does not support complex parameters ({label})"
                )
            if is_dtensor(p):
                check_placements(p, label)
            out.params.append(p)
            out.grads.append(p.grad)
            out.names.append(label)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but each state tensor keeps the dtype it is stored in.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter dtype
        (ao#3314): fp32 statistics of bf16 parameters would lose precision and bf16 momentum
        would double in size. Such entries are re-read from the saved values in their own dtype.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_saved_id = dict(zip(saved_ids, params, strict=False))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, saved_state in state_dict["state"].items():
            p = by_saved_id.get(saved_id)
            if p is None:
                continue
            for key, value in saved_state.items():
                if key == "step" or not (isinstance(value, Tensor) and value.is_floating_point()):
                    continue
                wanted = self._state_dtype(group_of[id(p)], key, p)
                if wanted != p.dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=wanted, copy=True)

    def _state_tensor(self, p: Tensor, key: str, factory: Callable[..., Tensor]) -> Tensor:
        """Return ``state[p][key]``, creating it on first use."""
        state = self.state[p]
        if key not in state:
            state[key] = factory()
        return state[key]

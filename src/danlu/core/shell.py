"""Shared plumbing for danlu's optimizer shells.

The shells validate hyper-parameters, gather the tensors of each param group and hand them to
the functional core in ``danlu.functional``. A step runs in two phases: everything that can
fail (hyper-parameter checks, sparse or complex gradients, the non-finite check under
``"raise"``) happens before the first tensor is written, so a failed step leaves parameters and
state exactly as they were.
"""

from __future__ import annotations

import contextvars
import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.core.dtensor import check_placements, is_dtensor
from danlu.core.tensors import step_tensor

__all__ = [
    "KINDS",
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
    """A real number: int, float, numpy scalar or a real one-element tensor (not bool, not on
    the meta device, whose value cannot be read)."""
    if isinstance(value, Tensor):
        return (
            value.numel() == 1
            and not value.is_complex()
            and value.dtype != torch.bool
            and not value.is_meta
        )
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_numpy_scalar(value: Any) -> bool:
    return type(value).__module__ == "numpy" and getattr(value, "shape", None) == ()


def normalize_hyper_parameter(value: Any) -> Any:
    """``value`` as the shells store it: a numpy scalar becomes the Python number it holds (so
    state dicts stay loadable with ``weights_only=True``), a one-element tensor of any shape
    a 0-d view of it (torch.optim accepts ``torch.tensor([1e-3])``; the view shares its
    storage, so ``lr.fill_()`` by a scheduler still reaches it), tuples and lists element-wise.
    Anything else is returned unchanged (the checks then judge it)."""
    if _is_numpy_scalar(value):
        return value.item()
    if isinstance(value, Tensor):
        return value.reshape(()) if value.dim() != 0 and value.numel() == 1 else value
    if isinstance(value, tuple | list):
        items = [normalize_hyper_parameter(v) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return type(value)(items)
    return value


def normalize_group(group: dict[str, Any]) -> None:
    """Apply :func:`normalize_hyper_parameter` to every setting of ``group``, in place."""
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        normalized = normalize_hyper_parameter(value)
        if normalized is not value:
            group[key] = normalized


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


#: Set while the checks run in the eager prologue of a ``torch.compile``d step: a tensor
#: hyper-parameter on an accelerator is then not read back (that would wait for the device on
#: every step); it was checked when it was set (constructor, ``add_param_group``,
#: ``load_state_dict``) and is checked on every eager step. CPU tensors are always read.
_NO_DEVICE_READS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "danlu_no_device_reads", default=False
)


def _unread(value: Any) -> bool:
    """Whether a value check skips ``value``: a tensor on an accelerator during a compiled
    step's checks (see ``_NO_DEVICE_READS``)."""
    return (
        isinstance(value, Tensor)
        and value.device.type not in ("cpu", "meta")
        and _NO_DEVICE_READS.get()
        and _is_number(value)
    )


#: The largest hyper-parameter accepted: the kernels take scalars as float32 (float64 for
#: float64 tensors), and torch raises mid-step on a scalar beyond float32's range.
MAX_SCALAR = float(torch.finfo(torch.float32).max)

#: The parameter kinds of ``danlu.param_groups`` that Tiger and Amos read from a group's ``kind``.
KINDS = ("matrix", "elementwise", "embedding")


def _in_float32_range(value: Any) -> bool:
    return _is_number(value) and abs(_as_float(value)) <= MAX_SCALAR  # False for NaN


def check_non_negative(name: str, value: Any) -> None:
    if _unread(value):
        return
    if not _in_float32_range(value) or _as_float(value) < 0:
        raise ValueError(f"{name} must be a number in [0, {MAX_SCALAR:.5g}], got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if _unread(value):
        return
    if not _in_float32_range(value) or _as_float(value) <= 0:
        raise ValueError(f"{name} must be a number in (0, {MAX_SCALAR:.5g}], got {value!r}")


def check_in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> None:
    """Raise ValueError unless ``value`` lies in the interval (low|[low, high)|]."""
    if _unread(value):
        return
    ok = _is_number(value)
    if ok:
        x = _as_float(value)
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_finite(name: str, value: Any) -> None:
    if _unread(value):
        return
    if not _in_float32_range(value):
        raise ValueError(
            f"{name} must be a finite number of magnitude <= {MAX_SCALAR:.5g}, got {value!r}"
        )


def check_beta(name: str, value: Any) -> None:
    check_in_range(name, value, 0.0, 1.0, low_open=False, high_open=True)


def check_int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
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


@dataclass
class StepBuckets:
    """The tensors of one group split by their step counter (for the optimizers whose update
    depends on the step count: AdaX, AdaFactor, Amos). Built eagerly by ``_prepare``;
    ``step(b)`` is what ``_apply`` hands to the functional core."""

    steps: list[Tensor]  # one 0-d counter per tensor (the count of steps taken so far)
    indices: list[list[int]]  # per bucket: the positions of its tensors
    values: list[float]  # per bucket: the counter's value (read on the host, eager only)

    @classmethod
    def build(cls, steps: list[Tensor], keep: Callable[[int], bool]) -> StepBuckets:
        """Buckets of the positions ``keep`` accepts (one host read of all counters)."""
        values, indices = [], []
        for value, members in step_buckets(steps).items():
            members = [i for i in members if keep(i)]
            if members:
                values.append(value)
                indices.append(members)
        return cls(steps, indices, values)

    def step(self, bucket: int) -> float | Tensor:
        """The 1-based step of ``bucket``'s update: a float, or inside ``torch.compile`` a 0-d
        tensor read from the counter (a Python number that changes on every step would
        recompile the graph)."""
        if torch.compiler.is_compiling():
            return step_tensor(self.steps[self.indices[bucket][0]])
        return self.values[bucket] + 1

    def advance(self) -> None:
        """Count the step: every counter + 1 (tensor ops, traced under compile)."""
        if self.steps:
            torch._foreach_add_(self.steps, 1.0)


# ----------------------------------------------------------------------------------------------


@dataclass
class GroupTensors:
    """The tensors of one param group that take part in a step (those with a gradient)."""

    group: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


#: Parameter dtypes the shells update (integer, bool, complex and 8-bit float tensors cannot
#: take a step: torch raises in the middle of one).
SUPPORTED_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def param_label(index: int, group: dict[str, Any], position: int, p: Tensor) -> str:
    """How error messages name a parameter: its name when the group has ``param_names``."""
    names = group.get("param_names")
    name = names[position] if names is not None and position < len(names) else None
    label = f"{name!r}" if name else f"param_groups[{index}]['params'][{position}]"
    return f"{label} (shape {tuple(p.shape)})"


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
    #: State keys shaped like their parameter (checked on load).
    _param_shaped_keys: tuple[str, ...] = ()
    #: State keys that count steps: 0-d tensors kept on the CPU (read without a device sync).
    _counter_keys: tuple[str, ...] = ("step",)
    #: The dtype counters are created in (exact up to 2**24 in float32, 2**53 in float64).
    _counter_dtype = torch.float32
    #: Param-group keys of other libraries' optimizers that danlu does not have, with the value
    #: danlu's math equals; a loaded group with another value is refused (a feature danlu
    #: lacks), the supported value is ignored. Keys not listed here are kept and ignored.
    _foreign_group_keys: Mapping[str, Any] = MappingProxyType(
        {
            "amsgrad": False,
            "differentiable": False,
            "decoupled_weight_decay": True,
            "nesterov": False,
        }
    )

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        normalize_group(defaults)
        self._check_group(defaults, where="")
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # As torch.optim: groups pickled before a setting existed get its default (not
        # "differentiable", which torch's __setstate__ adds to the defaults).
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in self._foreign_group_keys:
                    group.setdefault(key, value)

    def _state_dtype(self, group: dict[str, Any], key: str, param: Tensor) -> torch.dtype:
        """The dtype that ``state[param][key]`` is kept in."""
        if key in self._float32_state_keys:
            return torch.promote_types(param.dtype, torch.float32)
        if key in self._state_dtype_keys and group.get("state_dtype") is not None:
            return group["state_dtype"]
        return param.dtype

    def _expected_state_shape(
        self, p: Tensor, group: dict[str, Any], key: str
    ) -> tuple[int, ...] | None:
        """The shape ``state[p][key]`` must have; None for a key this optimizer does not use.
        Subclasses with reduced state (AdaFactor's factors, Amos's slots) override it."""
        if key in self._param_shaped_keys:
            return tuple(p.shape)
        return None

    def _check_loaded_state(
        self, p: Tensor, group: dict[str, Any], state: dict[str, Any], label: str
    ) -> None:
        """Raise ValueError if ``state`` (one parameter's, about to be loaded) cannot be
        stepped with ``group``'s settings. Shapes and dtypes are already checked."""

    # -- group checks ---------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any], *, where: str) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        settings = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        normalize_group(settings)
        merged = {**self.defaults, **settings}
        index = len(self.param_groups)
        self._check_group(merged, where=f"param_groups[{index}]: ")
        params = param_group["params"]
        candidates = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(candidates):
            name, tensor = p if isinstance(p, tuple) else (None, p)
            if isinstance(tensor, Tensor):
                label = f"{name!r}" if name else f"parameter {i}"
                self._check_param_dtype(tensor, f"param_groups[{index}] {label}")
        if isinstance(params, set):
            candidates = params  # type: ignore[assignment]  # torch's TypeError names it
        super().add_param_group({**param_group, **settings, "params": candidates})

    def _check_param_dtype(self, p: Tensor, label: str) -> None:
        if p.is_complex():
            raise ValueError(
                f"{self._display_name} does not support complex parameters "
                f"({label} has dtype {p.dtype}); optimise torch.view_as_real(p) instead"
            )
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise ValueError(
                f"{self._display_name} updates float16, bfloat16, float32 and float64 "
                f"parameters; {label} has dtype {p.dtype}"
            )

    # -- stepping -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step, in three parts: ``_prepare`` (checks, state created on first use, the
        partition of the tensors: everything that reads Python values), ``_apply`` (tensor
        ops only) and ``_finish`` (Python-side bookkeeping such as micro-step counters).

        Inside ``torch.compile`` the first and last parts run eagerly, outside the graph (as
        torch.optim's steps break the graph on entry and exit): the graph holds only the
        update, so a scheduler changing a tensor lr, a step counter growing or the state being
        created on the first step do not recompile it, and the checks keep their eager error
        messages and their "a failed step changes nothing" contract."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            plan = _prepare_eagerly(self)
            self._apply(plan)
            if type(self)._finish is not DanluOptimizer._finish:
                _finish_eagerly(self, plan)
        else:
            plan = self._prepare(self._checked_step_inputs())
            self._apply(plan)
            self._finish(plan)
        return loss

    def _checked_step_inputs(self) -> list[GroupTensors]:
        """Phase 1 of a step, shared by the shell's checks: settings checked, tensors gathered
        and checked. Writes nothing; wrappers that step several optimizers call it on each
        before stepping any."""
        for index, group in enumerate(self.param_groups):
            normalize_group(group)
            self._check_group(group, where=f"param_groups[{index}]: ")
        return [self._gather(index, group) for index, group in enumerate(self.param_groups)]

    def _prepare(self, gathered: list[GroupTensors]) -> Any:
        """Phase 1 of a step, continued (subclasses): the checks that need the gathered
        tensors, state created on first use, and the plan that ``_apply`` follows. Reads
        Python values freely; runs eagerly even inside ``torch.compile``. By default the plan
        is ``gathered`` itself, for ``_step``."""
        return gathered

    def _apply(self, plan: Any) -> None:
        """Phase 2 (subclasses): the update, tensor ops only. Inside ``torch.compile`` this is
        what is traced: it must not read a value that changes from step to step (a counter,
        a tensor's contents) into Python. By default ``_step(plan)``."""
        self._step(plan)

    def _step(self, gathered: list[GroupTensors]) -> None:
        """The whole update in one method (subclasses that do not split it into ``_prepare``
        and ``_apply``, such as ``danlu.lora.LoRAProAdam``; traced as it is under compile)."""
        raise NotImplementedError

    def _finish(self, plan: Any) -> None:
        """After the update (subclasses): Python-side bookkeeping; eager under compile."""

    def _gather(self, index: int, group: dict[str, Any]) -> GroupTensors:
        """The parameters of ``group`` with a gradient; raises (naming the parameter) for one
        that cannot be stepped, before anything is written."""
        out = GroupTensors(group)
        for i, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            label = param_label(index, group, i, p)
            if grad.is_sparse:
                raise RuntimeError(
                    f"{self._display_name} does not support sparse gradients ({label}); "
                    "use a dense embedding (nn.Embedding(sparse=False)) or danlu.Lazy"
                )
            self._check_param_dtype(p, label)
            if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
                raise ValueError(
                    f"{self._display_name}: the gradient of {label} has dtype {grad.dtype}, "
                    f"shape {tuple(grad.shape)} on {grad.device}; it must have the "
                    f"parameter's ({p.dtype}, {tuple(p.shape)} on {p.device})"
                )
            if is_dtensor(p):
                check_placements(p, label)
            out.params.append(p)
            out.grads.append(grad)
            out.names.append(label)
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, checked first and all-or-nothing: nothing changes unless all of
        ``state_dict`` can be loaded.

        * Settings missing from a saved group (a checkpoint of another library's optimizer,
          or of an older danlu) keep this optimizer's current value for that group; the loaded
          settings pass the constructor's checks. Other libraries' keys are kept and ignored,
          unless they ask for a feature danlu lacks (``amsgrad=True``): ValueError.
        * Every state tensor must fit its parameter (shape, floating dtype): a resized
          embedding fails here, naming the parameter, not in the middle of the next step.
        * Each state tensor keeps the dtype it is stored in (torch casts floating state to
          the parameter's dtype, ao#3314: fp32 statistics of bf16 parameters would lose
          precision); step counters stay exact 0-d CPU tensors (torch casts them to float32
          for ``fused`` groups, where counting stops at 2**24), and a counter saved as a
          Python number (older torch checkpoints) becomes one.
        """
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = self._loaded(state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded(self, state_dict: Any) -> tuple[list[dict[str, Any]], defaultdict[Any, Any]]:
        """The param groups and state ``state_dict`` loads to; raises before anything changes."""
        where = f"{self._display_name}.load_state_dict: "
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{where}state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, Sequence) or not all(
            isinstance(g, Mapping) and "params" in g for g in saved_groups
        ):
            raise ValueError(f"{where}'param_groups' must be a list of dicts with 'params'")
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"{where}'state' must be a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{where}loaded state dict has a different number of parameter groups "
                f"({len(saved_groups)}, this optimizer has {len(self.param_groups)})"
            )
        groups: list[dict[str, Any]] = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            label = f"{where}param_groups[{index}]: "
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{label}loaded state dict contains a parameter group that doesn't match "
                    f"the size of optimizer's group ({len(saved['params'])} parameters, this "
                    f"group has {len(group['params'])})"
                )
            settings = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            for key, supported in self._foreign_group_keys.items():
                if key in settings and key not in self.defaults and settings[key] != supported:
                    raise ValueError(
                        f"{label}{key}={settings[key]!r} (a setting of another optimizer) is "
                        f"not supported by {self._display_name}, whose update is the one with "
                        f"{key}={supported!r}"
                    )
            new = {**group, **settings, "params": group["params"]}
            normalize_group(new)
            self._check_group(new, where=label)
            groups.append(new)
        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        positions = [
            (index, i, p) for index, g in enumerate(groups) for i, p in enumerate(g["params"])
        ]
        by_saved_id = dict(zip(saved_ids, positions, strict=True))
        state: defaultdict[Any, Any] = defaultdict(dict)
        for saved_id, entry in saved_state.items():
            if saved_id not in by_saved_id:
                state[saved_id] = entry  # kept as is, as torch does
                continue
            index, i, p = by_saved_id[saved_id]
            label = f"{where}state of {param_label(index, groups[index], i, p)}"
            state[p] = self._loaded_param_state(p, groups[index], entry, label)
        return groups, state

    def _loaded_param_state(
        self, p: Tensor, group: dict[str, Any], entry: Any, label: str
    ) -> dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise ValueError(f"{label} must be a dict, got {type(entry).__name__}")
        out: dict[str, Any] = {}
        for key, value in entry.items():
            if key in self._counter_keys:
                out[key] = self._loaded_counter(value, f"{label}: {key!r}")
                continue
            expected = self._expected_state_shape(p, group, key)
            if not isinstance(value, Tensor):
                if expected is not None:  # a key the step reads as a tensor
                    raise ValueError(
                        f"{label}: {key!r} must be a floating tensor of shape {expected}, got "
                        f"{type(value).__name__}"
                    )
                out[key] = copy.deepcopy(value)
                continue
            if expected is None:
                # a key this optimizer does not use (another library's): carried along, cast
                # as torch casts it, except that a 0-d counter keeps its dtype
                keep = value.dim() == 0 or not value.is_floating_point()
                cast = value.dtype if keep else p.dtype
                out[key] = value.to(device=p.device, dtype=cast, copy=True)
                continue
            if not value.is_floating_point():
                raise ValueError(
                    f"{label}: {key!r} has dtype {value.dtype}; it must be a floating tensor"
                )
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"{label}: {key!r} has shape {tuple(value.shape)}, expected {expected} "
                    "(was the parameter resized, or the checkpoint saved for another model?)"
                )
            out[key] = value.to(device=p.device, dtype=self._state_dtype(group, key, p), copy=True)
        self._check_loaded_state(p, group, out, label)
        return out

    def _loaded_counter(self, value: Any, label: str) -> Tensor:
        """A step counter as a 0-d CPU tensor in a dtype that holds it exactly: the saved
        floating dtype when it is at least as wide as ``_counter_dtype``, else that."""
        if isinstance(value, Tensor):
            if not _is_number(value):
                raise ValueError(f"{label} must be a real number, got {value!r}")
            counter = value.detach().reshape(())
            dtype = self._counter_dtype
            if counter.is_floating_point():
                dtype = torch.promote_types(counter.dtype, dtype)
            number = float(counter.item())
        elif _is_number(value) and not isinstance(value, Tensor):
            number, dtype = float(value), self._counter_dtype
        else:
            raise ValueError(f"{label} must be a number or a 0-d tensor, got {value!r}")
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {number!r}")
        if float(torch.tensor(number, dtype=dtype)) != number:
            dtype = torch.float64  # e.g. an int64 count beyond float32's 2**24
        if isinstance(value, Tensor) and value.dtype == dtype and value.device.type == "cpu":
            return value.detach().reshape(()).clone()
        return torch.tensor(number, dtype=dtype)

    def _state_tensor(self, p: Tensor, key: str, factory: Callable[..., Tensor]) -> Tensor:
        """Return ``state[p][key]``, creating it on first use."""
        state = self.state[p]
        if key not in state:
            state[key] = factory()
        return state[key]


@torch.compiler.disable
def _prepare_eagerly(opt: DanluOptimizer) -> Any:
    """``opt``'s checks and ``_prepare``, outside the graph of a compiled step."""
    token = _NO_DEVICE_READS.set(True)
    try:
        return opt._prepare(opt._checked_step_inputs())
    finally:
        _NO_DEVICE_READS.reset(token)


@torch.compiler.disable
def _finish_eagerly(opt: DanluOptimizer, plan: Any) -> None:
    """``opt._finish(plan)`` outside the graph of a compiled step."""
    opt._finish(plan)

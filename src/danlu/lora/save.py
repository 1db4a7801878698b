"""Save a LoRA-GA-initialised PEFT model as an ordinary PEFT adapter for the original base model.

:func:`~danlu.lora.lora_ga_init_` shifts each frozen base weight, W0 ← W0 − s·B0A0, so that the
model is unchanged at the start. ``PeftModel.save_pretrained`` writes the adapter only, so that
adapter loaded onto the original base model computes W0 + s·BA instead of W0 − s·B0A0 + s·BA.
The change the fine-tuned model makes to the original base is s·(BA − B0A0) =
s·[B, −B0]·[A; A0], a LoRA adapter of rank 2r with the same scale: this is what
:func:`save_lora_ga_adapter` writes (PEFT's PiSSA/OLoRA conversion,
``save_pretrained(path_initial_model_for_weight_conversion=...)``, writes the same form).
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from typing import Any

import torch
from torch import Tensor, nn

from danlu.lora.ga import _ga_init

__all__ = ["save_lora_ga_adapter"]

_A_KINDS = ("lora_A", "lora_embedding_A")
_B_KINDS = ("lora_B", "lora_embedding_B")
_RESERVED = ("selected_adapters", "state_dict", "path_initial_model_for_weight_conversion")


def _peft_model_type() -> type | None:
    """PEFT's ``PeftModel``, if PEFT is loaded (danlu never imports PEFT itself)."""
    module = sys.modules.get("peft.peft_model")
    return getattr(module, "PeftModel", None)


def save_lora_ga_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    **save_kwargs: Any,
) -> None:
    r"""Save the LoRA-GA adapter ``adapter_name`` of a PEFT ``model`` so that it reloads
    correctly onto the **original** base model, with ``PeftModel.from_pretrained``.

    Plain ``model.save_pretrained`` is wrong after :func:`lora_ga_init_`: it saves B and A, but
    the base weights W0 were shifted by −s·B0A0 and are not saved, so the adapter on a fresh
    base model computes a different function. This writes instead, per layer, the rank-2r
    adapter ``lora_A = [A; A0]``, ``lora_B = [B, −B0]`` with the same scale s, whose
    change s·(BA − B0A0) is the fine-tuned model's change against the original W0. The adapter
    config is the model's with ``r`` (and ``rank_pattern``) doubled, ``lora_alpha`` (and
    ``alpha_pattern``) doubled, or times √2 with rsLoRA, so each layer keeps its scale, and
    ``init_lora_weights=True`` so loading it runs no initialisation. A layer whose base weight
    was shifted by more than one LoRA-GA call gets the whole shift (a larger rank: every layer
    is padded with zero rows to a common multiple of its rank); LoRA layers that LoRA-GA did not
    touch (embeddings, say) are padded with zeros. The adapter is in the adapters' dtype; the
    model, its config and its adapters are not changed.

    :func:`lora_ga_init_` records B0, A0 and s on each layer object (not in the
    ``state_dict``), so call this on the model that ran it, in the same process. To resume a
    run in a new process, build the model, run :func:`lora_ga_init_` again with the same
    batches and ``seed`` (it is deterministic, given the same model and a model without
    dropout or with the same RNG state) and then load the checkpoint's adapter weights.

    The shift of a bf16 base weight was rounded to bf16 once at initialisation; the saved
    adapter on the original base then differs from the trained model by that rounding (it is
    the exact W0 + change).

    Args:
        model: a ``peft.PeftModel`` on which :func:`lora_ga_init_` ran.
        save_directory: the directory to write (``adapter_config.json`` and the weights), or
            its parent for an adapter not named ``"default"``, as ``PeftModel.save_pretrained``.
        adapter_name: the PEFT adapter to save.
        save_kwargs: passed to ``PeftModel.save_pretrained`` (``safe_serialization``,
            ``is_main_process``, ...).

    Raises ``ValueError`` for a model that is not a ``PeftModel``, an unknown adapter, a LoRA
    variant (DoRA) or an adapter that :func:`lora_ga_init_` did not initialise (save that one
    with ``save_pretrained``).
    """
    peft_model = _peft_model_type()
    if peft_model is None or not isinstance(model, peft_model):
        raise ValueError(
            "model must be a peft.PeftModel (PEFT writes the adapter); for danlu's LoRALinear "
            "layers use danlu.lora.export_lora_delta(model), got " + type(model).__name__
        )
    for key in _RESERVED:
        if key in save_kwargs:
            raise ValueError(f"{key} is set by save_lora_ga_adapter; do not pass it")
    wrapper: Any = model  # a PeftModel: its attributes are PEFT's
    configs: dict[str, Any] = wrapper.peft_config
    if adapter_name not in configs:
        raise ValueError(f"adapter_name must be one of {sorted(configs)}, got {adapter_name!r}")
    config = configs[adapter_name]
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"adapter {adapter_name!r} is not a LoRA adapter ({config.peft_type})")
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {adapter_name!r} is a DoRA adapter; not supported")

    state = model.state_dict()
    converted, factor = _converted_tensors(model, state, adapter_name, config)
    new_config = copy.deepcopy(config)
    new_config.init_lora_weights = True
    new_config.r = config.r * factor
    new_config.rank_pattern = {k: v * factor for k, v in (config.rank_pattern or {}).items()}
    alpha_factor = math.sqrt(factor) if config.use_rslora else factor
    new_config.lora_alpha = config.lora_alpha * alpha_factor
    new_config.alpha_pattern = {
        k: v * alpha_factor for k, v in (config.alpha_pattern or {}).items()
    }
    state.update(converted)
    configs[adapter_name] = new_config
    try:
        wrapper.save_pretrained(
            str(save_directory), selected_adapters=[adapter_name], state_dict=state, **save_kwargs
        )
    finally:
        configs[adapter_name] = config


def _converted_tensors(
    model: nn.Module, state: dict[str, Tensor], adapter_name: str, config: Any
) -> tuple[dict[str, Tensor], int]:
    """{state-dict key: converted lora_A / lora_B} and the rank factor of the new config."""
    pattern = re.compile(
        rf"^(?P<module>.+)\.(?P<kind>lora_\w+?)\.{re.escape(adapter_name)}(?P<rest>\.\w+)?$"
    )
    pairs: dict[str, dict[str, str]] = {}
    for key in state:
        match = pattern.match(key)
        if match is None:
            continue
        kind, rest = match["kind"], match["rest"] or ""
        if kind in _A_KINDS + _B_KINDS and rest in ("", ".weight"):
            side = "A" if kind in _A_KINDS else "B"
            pairs.setdefault(match["module"], {})[side] = key
        elif not (kind == "lora_B" and rest == ".bias"):  # a LoRA bias is kept as it is
            raise ValueError(f"{key!r}: this kind of LoRA tensor is not supported")

    parts: dict[str, tuple[Tensor, Tensor, int]] = {}  # module: (new A, new B, old rank)
    initialised = False
    for name, keys in pairs.items():
        if set(keys) != {"A", "B"}:
            raise ValueError(f"{name!r}: adapter {adapter_name!r} has lora_A or lora_B only")
        module: Any = model.get_submodule(name)  # a PEFT LoRA layer
        lora_A, lora_B = state[keys["A"]].detach(), state[keys["B"]].detach()
        rank = lora_A.shape[0]
        record = _ga_init(module, adapter_name)
        if record is None:
            parts[name] = (lora_A, lora_B, rank)
            continue
        initialised = True
        if lora_A.ndim != 2 or lora_B.ndim != 2:
            raise ValueError(f"{name!r}: LoRA-GA records exist only for linear layers")
        scale = float(module.scaling[adapter_name])
        r = module.r[adapter_name]
        alpha = float(module.lora_alpha[adapter_name])
        config_scale = alpha / (math.sqrt(r) if config.use_rslora else r)
        # The saved config reproduces the scale PEFT derives from r and alpha; a scale changed
        # on the live model (set_scale) goes into lora_B.
        new_B = _times(lora_B, scale / config_scale)
        offset_A = record.offset_A.to(device=lora_A.device, dtype=lora_A.dtype)
        offset_B = _times(-record.offset_B.to(lora_B.device), record.scale / config_scale)
        parts[name] = (
            torch.cat([lora_A, offset_A], dim=0),
            torch.cat([new_B, offset_B.to(lora_B.dtype)], dim=1),
            rank,
        )
    if not initialised:
        raise ValueError(
            f"adapter {adapter_name!r} was not initialised by danlu.lora.lora_ga_init_ (no "
            "LoRA-GA record on any of its layers): save it with model.save_pretrained"
        )
    factor = max(-(-new_A.shape[0] // rank) for new_A, _, rank in parts.values())
    out = {}
    for name, (new_A, new_B, rank) in parts.items():
        pad = factor * rank - new_A.shape[0]
        if pad:
            new_A = torch.cat([new_A, new_A.new_zeros((pad, *new_A.shape[1:]))], dim=0)
            zeros = new_B.new_zeros((new_B.shape[0], pad, *new_B.shape[2:]))
            new_B = torch.cat([new_B, zeros], dim=1)
        out[pairs[name]["A"]] = new_A.contiguous()
        out[pairs[name]["B"]] = new_B.contiguous()
    return out, factor


def _times(t: Tensor, ratio: float) -> Tensor:
    """``t * ratio``, computed in fp32 or wider, and ``t`` itself when the ratio is 1."""
    if ratio == 1.0:
        return t
    return (t.to(torch.promote_types(t.dtype, torch.float32)) * ratio).to(t.dtype)

"""danlu under ``torch.distributed`` (docs/distributed.md): the DTensor helpers of
``danlu.core.dtensor`` and distributed checkpoints of danlu wrappers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from danlu.core.dtensor import (
    agree,
    any_dtensor,
    any_over_shards,
    full_tensor,
    is_dtensor,
    local,
    local_slice,
    new_state,
    reduce_partial_sums,
    set_gradient_sync,
    sharded_mean,
    sharded_norm,
    sharded_sum,
    sharded_sums,
)
from danlu.wrappers._base import WRAPPERS_KEY, WrapperBase, unwrap

__all__ = [
    "agree",
    "any_dtensor",
    "any_over_shards",
    "full_tensor",
    "get_optimizer_state_dict",
    "is_dtensor",
    "local",
    "local_slice",
    "new_state",
    "reduce_partial_sums",
    "set_gradient_sync",
    "set_optimizer_state_dict",
    "sharded_mean",
    "sharded_norm",
    "sharded_sum",
    "sharded_sums",
]


# ----------------------------------------------------------------------------------------------
# Distributed checkpoints of danlu wrappers


def _wrappers(
    optimizer: torch.optim.Optimizer,
) -> tuple[list[WrapperBase], torch.optim.Optimizer]:
    """(the danlu wrappers that add a record to the state dict, outermost first; the innermost
    optimizer)."""
    chain = list(unwrap(optimizer))
    return [o for o in chain if isinstance(o, WrapperBase) and o.records_state], chain[-1]


def _multi_parts(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, ...] | None:
    """The inner optimizers of a wrapper that ``holds_several`` (``MultiOptimizer``: torch's
    helpers take several optimizers and merge their states by parameter name), or None for
    anything else."""
    if not isinstance(optimizer, WrapperBase) or not optimizer.holds_several:
        return None
    parts = tuple(optimizer.parts().values())
    for name, part in optimizer.parts().items():
        if isinstance(part, WrapperBase) and part.records_state:
            kind = type(optimizer).__name__
            raise ValueError(
                f"{kind}[{name!r}] is a danlu wrapper; distributed checkpoints of a {kind} take "
                f"bare optimizers (wrap the {kind} instead)"
            )
    return parts


def get_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` that also works for
    danlu's wrappers.

    torch's helper keeps only ``state`` and ``param_groups``, so a wrapper's own record
    (``GradientAccumulation``'s micro-step, ``NonFiniteGuard``'s counters) would be lost, and it
    calls ``step()`` on an optimizer without state, which a wrapper would count. Here torch's
    helper runs on the innermost optimizer and the records ride along under
    ``"danlu_wrappers"`` (plain numbers and strings), so the result saves with
    ``torch.distributed.checkpoint.save`` and loads on any number of ranks. A
    ``GradientAccumulation`` must be at a window boundary (``micro_step == 0``): its running
    sums are gradients, which distributed checkpoints do not hold; likewise a ``Lazy`` must
    hold no rows of a window in progress (under accumulation). A ``MultiOptimizer`` is
    passed to torch's helper as its inner optimizers (one state dict keyed by parameter name).
    For a bare optimizer this is torch's helper. ``kwargs`` (``options``) go to torch's helper.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as torch_get

    parts = _multi_parts(optimizer)
    if parts is not None:
        return dict(torch_get(model, parts, **kwargs))
    wrappers, inner = _wrappers(optimizer)
    records = []
    for wrapper in reversed(wrappers):
        # raises for a wrapper that cannot be saved so now (mid-window)
        records.append({"type": type(wrapper).__name__, **wrapper._distributed_state()})
    out = dict(torch_get(model, inner, **kwargs))
    if records:
        out[WRAPPERS_KEY] = records
    return out


def set_optimizer_state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim_state_dict: dict[str, Any],
    **kwargs: Any,
) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` for danlu optimizers
    and wrappers: the counterpart of :func:`get_optimizer_state_dict`. Every wrapper record is
    checked before anything is loaded."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    parts = _multi_parts(optimizer)
    if parts is not None:
        torch_set(model, parts, optim_state_dict, **kwargs)
        return
    wrappers, inner = _wrappers(optimizer)
    records = list(optim_state_dict.get(WRAPPERS_KEY) or [])
    if len(records) != len(wrappers):
        raise ValueError(
            f"optim_state_dict holds {len(records)} danlu wrapper records and the optimizer "
            f"has {len(wrappers)} wrappers; save with danlu.distributed.get_optimizer_state_dict"
        )
    pairs = list(zip(reversed(wrappers), records, strict=True))
    for wrapper, record in pairs:
        if not isinstance(record, dict) or record.get("type") != type(wrapper).__name__:
            found = record.get("type") if isinstance(record, dict) else record
            raise ValueError(
                f"wrapper record {found!r} does not match danlu.{type(wrapper).__name__}"
            )
        wrapper._check_wrapper_state(record)
    plain = {k: v for k, v in optim_state_dict.items() if k != WRAPPERS_KEY}
    torch_set(model, inner, plain, **kwargs)
    for wrapper, record in pairs:
        wrapper._load_wrapper_state(record)

"""Several optimizers over disjoint parameters as one
(docs/reference/algorithms.md#embedding-drift-fixes item 3: "Adam for the embeddings, Tiger for the
rest")."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from danlu.wrappers._base import (
    WrapperBase,
    check_before_step,
    check_optimizer,
    counts_windows,
    iter_params,
)

__all__ = ["MultiOptimizer"]


class _JoinedState(Mapping[Tensor, Any]):
    """``state[p]`` looked up in the optimizer that owns ``p``."""

    def __init__(self, multi: MultiOptimizer) -> None:
        self._multi = multi

    def __getitem__(self, p: Tensor) -> Any:
        for opt in self._multi.optimizers.values():
            if p in opt.state:
                return opt.state[p]
        owner = self._multi.owner(p)
        if owner is None:
            raise KeyError(p)
        return owner.state[p]

    def get(self, p: Tensor, default: Any = None) -> Any:  # type: ignore[override]
        for opt in self._multi.optimizers.values():
            if p in opt.state:
                return opt.state[p]
        return default

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._multi.optimizers.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._multi.optimizers.values())


class MultiOptimizer(WrapperBase):
    """One optimizer object made of several, each over its own parameters.

    ``step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` act on every inner
    optimizer; ``param_groups`` is the concatenation of their groups (the same dict objects), so
    one ``torch.optim.lr_scheduler`` scheduler drives all of them, or attach one per inner
    optimizer (``multi["rest"]``). Parameters must be disjoint (ValueError otherwise).

    ``MultiOptimizer({"embeddings": torch.optim.AdamW(emb), "rest": danlu.Tiger(rest)})``, or a
    list (named "0", "1", ...). The one-liner for the Lion authors' fix of the embedding drift
    is :meth:`adam_for_embeddings`.
    """

    holds_several = True
    #: its state dict holds its parts' state dicts, and no record of its own
    records_state = False

    def __init__(self, optimizers: Mapping[str, Optimizer] | Sequence[Optimizer]) -> None:
        if isinstance(optimizers, Mapping):
            named = dict(optimizers)
        elif isinstance(optimizers, Sequence) and not isinstance(optimizers, str):
            named = {str(i): opt for i, opt in enumerate(optimizers)}
        else:
            raise ValueError(
                "optimizers must be a mapping {name: optimizer} or a sequence of optimizers, "
                f"got {type(optimizers).__name__}"
            )
        if not named:
            raise ValueError("optimizers must hold at least one optimizer")
        owners: dict[int, str] = {}
        for name, opt in named.items():
            if not isinstance(name, str):
                raise ValueError(f"optimizers: names must be strings, got {name!r}")
            check_optimizer(f"optimizers[{name!r}]", opt)
            if isinstance(opt, WrapperBase) and opt.holds_several:
                raise ValueError(f"optimizers[{name!r}]: nest the inner optimizers directly")
            for _, p in iter_params(opt):
                if id(p) in owners and owners[id(p)] != name:
                    raise ValueError(
                        f"optimizers: a parameter of shape {tuple(p.shape)} is in both "
                        f"{owners[id(p)]!r} and {name!r}; the parameters must be disjoint"
                    )
                owners[id(p)] = name
        self.optimizers: dict[str, Optimizer] = named
        super().__init__()

    # -- capabilities -----------------------------------------------------------------------------
    def parts(self) -> dict[str, Optimizer]:
        return self.optimizers

    def keeps_window(self) -> bool:
        return any(counts_windows(opt) for opt in self.optimizers.values())

    def refuses_per_parameter(self, where: str) -> str | None:
        # at the top of step_in_backward the parts are checked and stepped one by one
        return f"{where}: wrap the optimizers inside the MultiOptimizer, not the MultiOptimizer"

    # -- the Optimizer interface ------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    @property
    def state(self) -> Mapping[Tensor, Any]:  # type: ignore[override]
        return _JoinedState(self)

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """{name: that optimizer's defaults}."""
        return {name: opt.defaults for name, opt in self.optimizers.items()}

    def __getitem__(self, name: str) -> Optimizer:
        return self.optimizers[name]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every part before stepping any, so that one part's error leaves the others too.
        check_before_step(self, "danlu.MultiOptimizer")
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any], optimizer: str | None = None) -> None:
        """Add a group to the inner optimizer named ``optimizer`` (may be omitted when there is
        only one); its parameters must not belong to another inner optimizer."""
        if optimizer is None:
            if len(self.optimizers) != 1:
                raise ValueError(
                    f"optimizer: name the inner optimizer to add the group to, one of "
                    f"{', '.join(repr(n) for n in self.optimizers)}"
                )
            optimizer = next(iter(self.optimizers))
        if optimizer not in self.optimizers:
            raise ValueError(
                f"optimizer must be one of {', '.join(repr(n) for n in self.optimizers)}, "
                f"got {optimizer!r}"
            )
        params = param_group["params"]
        new = [params] if isinstance(params, Tensor) else list(params)
        new = [p[1] if isinstance(p, tuple) else p for p in new]
        for name, opt in self.optimizers.items():
            if name == optimizer:
                continue
            taken = {id(p) for _, p in iter_params(opt)}
            if any(id(p) in taken for p in new):
                raise ValueError(
                    f"param_group: a parameter already belongs to optimizer {name!r}; the "
                    "parameters must be disjoint"
                )
        self.optimizers[optimizer].add_param_group(param_group)

    def _state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load every inner optimizer's part; all or nothing: if one part cannot be loaded, the
        error propagates and every inner optimizer stays as it was."""
        super().load_state_dict(state_dict)

    def _load(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, Mapping) or set(saved) != set(self.optimizers):
            found = sorted(saved) if isinstance(saved, Mapping) else None
            raise ValueError(
                f"state_dict must hold the optimizers {sorted(self.optimizers)}, got {found}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{name!r}: {opt!r}" for name, opt in self.optimizers.items())
        return f"MultiOptimizer({{{inner}}})"

    # -- the one-liner ----------------------------------------------------------------------------
    @classmethod
    def adam_for_embeddings(
        cls,
        model: nn.Module,
        optimizer: Callable[..., Optimizer] | None = None,
        *,
        embedding_lr: float = 1e-3,
        embedding_betas: tuple[float, float] = (0.9, 0.999),
        embedding_eps: float = 1e-8,
        embedding_weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> MultiOptimizer:
        """AdamW for the embedding tables, ``optimizer`` (default ``danlu.Tiger``) for the rest.

        ``opt = danlu.MultiOptimizer.adam_for_embeddings(model, danlu.Tiger, lr=1.5e-3,
        weight_decay=0.01)``. Parameters are split by ``danlu.param_groups(model)``: the
        ``kind="embedding"`` groups (``nn.Embedding`` weights, tied ones included) go to
        ``danlu.AdamW(lr=embedding_lr, betas=embedding_betas, eps=embedding_eps,
        weight_decay=embedding_weight_decay)``, named ``"embeddings"``; the other groups, with
        their kinds and centres, go to ``optimizer(groups, **kwargs)``, named ``"rest"``.
        """
        from danlu.algorithms.adamw.optimizer import AdamW
        from danlu.algorithms.tiger.optimizer import Tiger
        from danlu.params import param_groups

        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        groups = param_groups(model)
        embedding_groups = [g for g in groups if g["kind"] == "embedding"]
        rest_groups = [g for g in groups if g["kind"] != "embedding"]
        if not embedding_groups:
            raise ValueError("model: no nn.Embedding / nn.EmbeddingBag weight to give to Adam")
        for g in embedding_groups:
            g.pop("weight_decay", None)
        embeddings = AdamW(
            embedding_groups,
            lr=embedding_lr,
            betas=embedding_betas,
            eps=embedding_eps,
            weight_decay=embedding_weight_decay,
        )
        named: dict[str, Optimizer] = {"embeddings": embeddings}
        if rest_groups:
            named["rest"] = (optimizer or Tiger)(rest_groups, **kwargs)
        return cls(named)

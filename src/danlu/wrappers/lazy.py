"""Lazy (row-masked) updates of embedding tables (kexue 6869, 9736), with the rows of an
accumulation window tracked over the whole window."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from danlu.core.dtensor import any_over_shards, local
from danlu.core.shell import check_bool
from danlu.core.window import WindowedOptimizer
from danlu.wrappers._base import OptimizerWrapper, WrapperBase, iter_params
from danlu.wrappers.accumulation import _is_count

__all__ = ["Lazy"]

#: The row masks a table may hold between steps (see ``Lazy._window`` and ``Lazy._pending``).
MASKS = ("window", "pending")


def _row_shape(p: Tensor) -> tuple[int, ...]:
    """The shape of a table's row mask: every axis but the last (each entry of a 1-D table is
    a row); for a DTensor, of the local slice."""
    piece = local(p)
    return tuple(piece.shape[:-1]) if piece.dim() > 1 else tuple(piece.shape)


def _union(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else torch.logical_or(a, b)


@dataclass
class _Route:
    """What the coming ``step()`` does to one table, read before the step."""

    #: the innermost optimizer steps (a GradientAccumulation mid-window only counts)
    reaches: bool = True
    #: the call ends the accumulation window: the table's rows seen in it may move
    closes: bool = True
    #: ... and a table with a gradient earlier in the window but none now is stepped with a
    #: zero gradient (the inner optimizer's own window, or an UpdateEvery's)
    carries: bool = False
    #: the innermost optimizer when it keeps a window of its own (grad_accum_steps > 1)
    windowed: WindowedOptimizer | None = None
    #: ... and this call opens that window for the table: it decays the table as a whole
    opens: bool = False
    #: the wrappers on the way that hold the gradients of a window (GradientAccumulation: they
    #: may keep the gradient as their sum)
    holders: list[WrapperBase] = field(default_factory=list)
    #: the wrappers on the way that may withhold gradients (NonFiniteGuard), each with the
    #: holders outside it
    guards: list[tuple[WrapperBase, tuple[WrapperBase, ...]]] = field(default_factory=list)


@dataclass
class _Plan:
    p: Tensor
    route: _Route
    rows: Tensor | None  # the rows with a gradient in this call (None: no gradient)
    dense: Tensor | None  # the sparse gradient, densified for the inner step
    #: a NonFiniteGuard inside skips the gradient that this call steps on: no row is present
    skipped: bool = False
    #: ... and shrinks the table (mode "shrink"): the rows of that gradient may change
    shrinks: bool = False


class Lazy(OptimizerWrapper):
    """Move a row of an embedding table only if its gradient row is non-zero (kexue 6869, 9736).

    The row mask is r_i = 1[∃j: g_ij ≠ 0] over the last axis; each entry of a 1-D table is a
    row (for a sparse gradient, the rows it lists: the token ids of the batch). The inner
    optimizer steps as usual, then:

    * ``lazy_moments=False`` (the blog's variant, bojone/keras_lazyoptimizer): the rows with
      r_i = 0 get their old parameter values back, so θ_i ← θ_i + r_i·Δθ_i; the moments of every
      row are updated as the inner optimizer does (absent rows decay).
    * ``lazy_moments=True`` (the standard one, TF LazyAdam, torch SparseAdam): the absent rows of
      the parameter *and* of every state tensor shaped like it (Adam's ``exp_avg`` and
      ``exp_avg_sq``, Tiger's ``exp_avg``) get their old values back; scalar state such as
      ``step`` keeps counting, so bias correction uses the global step. On a table's first
      step its state does not exist yet: the absent rows of the new moments hold what a zero
      gradient gives them (0 for Adam's and Tiger's).

    **Under gradient accumulation** the mask belongs to the accumulation window, not to the
    micro-batch: a row is present in a window when its gradient row is non-zero on any of the
    window's micro-batches (the mask is OR-ed over them and reset when the window ends), so a
    row seen on the first micro-batch but not on the last one still moves at the window's end,
    and a row absent from the whole window keeps its values. This holds for the inner
    optimizer's own window (``danlu.Tiger`` or ``danlu.AdamW`` with ``grad_accum_steps=k``:
    each present row takes one step on its window's mean gradient, the step of the same
    optimizer with k = 1 on the mean, and with ``lazy_moments=True`` its moments decay once in
    the window, also when it first appears after the window's first micro-batch), for
    :class:`GradientAccumulation` and for :class:`UpdateEvery` inside this wrapper. The masks
    of a window in progress are saved in ``state_dict`` (one boolean per row), so a checkpoint
    taken mid-window resumes exactly; a checkpoint without them (danlu 0.1.0) loads with none
    in progress. ``danlu.distributed.get_optimizer_state_dict`` saves at window ends only.
    Around a :class:`GradientAccumulation` (``GradientAccumulation(Lazy(opt), k)``) the wrapper
    sees one gradient per window, the sum, whose zero rows are absent.

    Around a :class:`NonFiniteGuard` (``Lazy(NonFiniteGuard(opt))``) a table whose gradient
    the guard skips has no rows present on that call: the micro-batch adds nothing to the
    window, so a row seen only there keeps its values (with ``mode="shrink"`` the guard's pull
    reaches the rows of that gradient and of the window so far, not the absent ones). The
    reverse order, ``NonFiniteGuard(Lazy(opt))``, hides the gradient from this wrapper and
    gives the same rows.

    Limitation: with ``UpdateEvery`` and ``lazy_moments=True`` a row's moments stay frozen on
    the micro-steps of a window before its first gradient in it, so a row that first appears
    on micro-step j misses j β̃ decays of the window (β̃^j ≈ 1 − j(1 − β)/k).

    Absent rows are restored by copying the saved values back, never by multiplying the update
    by the mask: a row that never had a gradient may compute 0/0 = NaN inside the inner step (Adam
    with ε = 0), and NaN·0 is NaN.

    ``params`` are the tables to treat lazily (they must belong to the inner optimizer); by
    default every parameter of a group tagged ``kind="embedding"`` (``danlu.param_groups`` tags
    ``nn.Embedding`` weights). Other parameters step normally. Sparse gradients
    (``nn.Embedding(sparse=True)``) are accepted: they are densified for the inner step and put
    back afterwards, except where a :class:`GradientAccumulation` inside keeps the dense sum
    in ``.grad`` until its window ends (so each micro-batch counts once). A sparse gradient
    must have its table's shape, dtype and device and list rows in [0, rows): otherwise
    ValueError naming the table, and nothing changes.

    Cost per step and lazy table: one boolean per row, and a transient copy of the absent rows
    (absent rows × row size, close to one copy of the table for a large vocabulary; with
    ``lazy_moments=True`` the same again per moment tensor), freed after the step; under
    accumulation the window's mask (one boolean per row) is kept between micro-steps. With
    tied embeddings every row has a gradient and nothing is copied (and nothing is lazy).

    Under DDP every rank sees the same averaged gradient, hence the same rows. Under FSDP2
    (DTensor tables) each rank restores rows of its own slice, and when the table is sharded
    along its last axis a row counts as present if any rank's part of it has a non-zero
    gradient, so all ranks treat it alike.

    Deviations: a present row whose gradient is exactly zero is treated as absent, unless the
    gradient is sparse. With ``lazy_moments=True`` and the inner optimizer's
    ``grad_accum_steps``, the decay of a row first seen mid-window is applied by this wrapper
    in the moment's dtype: the same bits as the optimizer's own decay, except for a momentum
    kept in a narrower dtype than its parameter (``state_dtype``) or the fused CUDA kernel,
    within one rounding.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Iterable[Tensor] | None = None,
        lazy_moments: bool = False,
    ) -> None:
        super().__init__(optimizer)
        check_bool("lazy_moments", lazy_moments)
        owned = {id(p) for _, p in iter_params(self)}
        if params is None:
            chosen = [p for group, p in iter_params(self) if group.get("kind") == "embedding"]
            if not chosen:
                raise ValueError(
                    "params: none given and no param group of the optimizer has "
                    "kind='embedding'; pass params=[embedding.weight]"
                )
        else:
            chosen = list(params)
            if not chosen:
                raise ValueError("params must list at least one tensor")
        for i, p in enumerate(chosen):
            if not isinstance(p, Tensor):
                raise ValueError(f"params[{i}] must be a tensor, got {type(p).__name__}")
            if id(p) not in owned:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not optimised by the wrapped "
                    "optimizer"
                )
            if p.dim() == 0:
                raise ValueError(f"params[{i}] must have at least one dimension (rows)")
        self.lazy_params = chosen
        self.lazy_moments = lazy_moments
        # Row masks of the window in progress, per table: ``_window`` the rows seen in the
        # inner steps of the window so far, ``_pending`` those seen since the last inner step
        # (a GradientAccumulation inside only counts until its window ends).
        self._window: dict[Tensor, Tensor] = {}
        self._pending: dict[Tensor, Tensor] = {}

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        stepped = {id(p) for _, p in iter_params(self)}  # step_in_backward passes one at a time
        # Phase 1, no writes: the checks, each table's rows and what the step does to it.
        plans = [
            self._plan(index, p) for index, p in enumerate(self.lazy_params) if id(p) in stepped
        ]
        self._mark_skipped(plans)
        densified: list[tuple[_Plan, Tensor]] = []
        restores: list[tuple[Tensor, tuple[Tensor, ...], Tensor]] = []
        undo: list[tuple[Tensor, tuple[Tensor, ...], Tensor]] = []
        masks: dict[Tensor, tuple[Tensor | None, Tensor | None]] = {}
        try:
            for plan in plans:
                if plan.dense is not None:
                    densified.append((plan, plan.p.grad))  # type: ignore[arg-type]
                    plan.p.grad = plan.dense
                masks[plan.p] = self._prepare(plan, restores, undo)
            self.optimizer.step()
        except BaseException:
            for target, rows, saved in reversed(undo):
                target.index_put_(rows, saved)
            self._put_back(densified)
            raise
        for target, rows, saved in restores:
            target.index_put_(rows, saved)
        for p, (window, pending) in masks.items():
            for store, mask in ((self._window, window), (self._pending, pending)):
                if mask is None:
                    store.pop(p, None)
                else:
                    store[p] = mask
        self._put_back(densified)
        return loss

    def _prepare(
        self,
        plan: _Plan,
        restores: list[tuple[Tensor, tuple[Tensor, ...], Tensor]],
        undo: list[tuple[Tensor, tuple[Tensor, ...], Tensor]],
    ) -> tuple[Tensor | None, Tensor | None]:
        """Save what the inner step must not change for ``plan.p``, apply the decay it will not
        apply, and return the table's masks (window, pending) for after the step."""
        p, route = plan.p, plan.route
        earlier = self._window.get(p)
        this_call = _union(self._pending.get(p), plan.rows)  # rows of the gradient stepped on
        # ... none if a guard skips that gradient: it adds nothing to the window
        step_rows = None if plan.skipped else this_call
        if not route.reaches:
            return earlier, step_rows
        seen = _union(earlier, step_rows)
        after = (None if route.closes else seen), None
        # The table is stepped with a gradient, or carried into the update at the end of the
        # window (with a zero gradient: it moves on what it accumulated), or shrunk by a guard.
        carried = route.carries and route.closes and earlier is not None
        # a guard's "shrink" pulls the rows of the skipped gradient too (not the absent ones)
        touched = _union(seen, this_call) if plan.shrinks else seen
        if touched is None or (step_rows is None and not carried and not plan.shrinks):
            return after
        absent = torch.logical_not(touched).nonzero(as_tuple=True)
        if absent[0].numel():
            piece = local(p).detach()
            restores.append((piece, absent, piece[absent]))
        if self.lazy_moments and seen is not None:
            # the moments of rows not in the window (a guard's shrink leaves moments alone)
            outside = torch.logical_not(seen).nonzero(as_tuple=True)
            if outside[0].numel():
                for moment in self._moments(p):
                    restores.append((moment, outside, moment[outside]))
        if (
            self.lazy_moments
            and route.windowed is not None
            and not route.opens
            and step_rows is not None
        ):
            # The optimizer decays a tensor once per window, on its first micro-step with a
            # gradient, and this table's absent rows were restored then: a row first seen
            # now takes that decay here (then the step adds its share of the gradient).
            newly = step_rows if earlier is None else step_rows & torch.logical_not(earlier)
            rows = newly.nonzero(as_tuple=True)
            if rows[0].numel():
                state = self.state.get(p, {})
                for key, factor in route.windowed._window_decays(p).items():
                    value = state.get(key)
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        moment = local(value)
                        saved = moment[rows]
                        undo.append((moment, rows, saved))
                        moment.index_put_(rows, saved.clone().mul_(factor))
        return after

    def _moments(self, p: Tensor) -> list[Tensor]:
        return [
            local(value)
            for value in self.state.get(p, {}).values()
            if isinstance(value, Tensor) and value.shape == p.shape
        ]

    @staticmethod
    def _put_back(densified: list[tuple[_Plan, Tensor]]) -> None:
        """The user's sparse gradients back in ``.grad``, except where a GradientAccumulation
        now holds the densified one as its running sum (the next micro-batch adds into it)."""
        for plan, sparse in densified:
            if not any(acc._holds_gradient(plan.p) for acc in plan.route.holders):
                plan.p.grad = sparse

    # -- phase 1 ----------------------------------------------------------------------------
    def _plan(self, index: int, p: Tensor) -> _Plan:
        route = self._route(p)
        grad = p.grad
        if grad is None:
            return _Plan(p, route, None, None)
        label = f"params[{index}] (shape {tuple(p.shape)})"
        if grad.is_sparse:
            self._check_sparse(label, p, grad)
            grad = grad.coalesce()
            present = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            present[grad.indices()[0]] = True
            if p.dim() > 2:  # a listed index covers every row of its slice
                shape = (p.shape[0],) + (1,) * (p.dim() - 2)
                present = present.view(shape).expand(_row_shape(p)).clone()
            return _Plan(p, route, present, grad.to_dense())
        self._check_dense(label, p, grad)
        piece = local(grad)
        if p.dim() == 1:
            return _Plan(p, route, piece != 0, None)
        # FSDP2: a row split over ranks is present when any part of it has a non-zero gradient
        present = any_over_shards((piece != 0).any(dim=-1), p, -1)
        return _Plan(p, route, present, None)

    @staticmethod
    def _mark_skipped(plans: list[_Plan]) -> None:
        """Mark the tables whose gradient a NonFiniteGuard inside will skip in this call (what
        the guard sees: the gradient, or a GradientAccumulation's sum of the window)."""
        found: dict[tuple[int, ...], tuple[set[int], bool]] = {}
        for plan in plans:
            for guard, outside in plan.route.guards:
                key = (id(guard), *(id(acc) for acc in outside))
                if key not in found:

                    def gradient(
                        q: Tensor, outside: Iterable[WrapperBase] = outside
                    ) -> Tensor | None:
                        grad = q.grad
                        for acc in outside:
                            grad = acc._coming_gradient(q, grad)
                        return grad

                    found[key] = guard._withheld(gradient, [q.p for q in plans])
                withheld, shrinks = found[key]
                if id(plan.p) in withheld:
                    plan.skipped = True
                    plan.shrinks = plan.shrinks or shrinks

    def _route(self, p: Tensor) -> _Route:
        route = _Route()
        opt: Optimizer = self.optimizer
        # what each wrapper on the way to p's optimizer declares
        while isinstance(opt, WrapperBase):
            if opt.withholds_gradients:
                route.guards.append((opt, tuple(route.holders)))
            if opt.holds_gradients:
                route.holders.append(opt)
                if not opt.ends_window():
                    route.reaches = route.closes = False
                    return route
            elif opt.carries_window:
                route.closes = route.closes and opt.ends_window()
                route.carries = route.closes
            if not opt.holds_several:
                (opt,) = opt.parts().values()
            elif (owner := opt.owner(p)) is not None:
                opt = owner
            else:
                break
        if isinstance(opt, WindowedOptimizer):
            k = opt._group_of(p)["grad_accum_steps"]
            if k > 1:
                # the window is the optimizer's own: it decays and moves the table
                t = opt._counter()
                route.windowed = opt
                route.closes = route.carries = (t + 1) % k == 0
                route.opens = opt._last_seen(p) <= t - t % k
        return route

    @staticmethod
    def _check_dense(label: str, p: Tensor, grad: Tensor) -> None:
        if (grad.dtype, grad.shape, grad.device) != (p.dtype, p.shape, p.device):
            raise ValueError(
                f"danlu.Lazy: the gradient of {label} has dtype {grad.dtype}, shape "
                f"{tuple(grad.shape)} on {grad.device}; it must have the table's "
                f"({p.dtype}, {tuple(p.shape)} on {p.device})"
            )

    @classmethod
    def _check_sparse(cls, label: str, p: Tensor, grad: Tensor) -> None:
        """A sparse gradient must fit its table and list rows in range (torch builds sparse
        tensors without checking their indices; densifying one beyond its size writes out of
        bounds)."""
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"danlu.Lazy: sparse gradients must be sparse over rows only "
                f"(sparse_dim 1), got sparse_dim {grad.sparse_dim()} for {label}"
            )
        cls._check_dense(label, p, grad)
        indices = grad._indices()[0]
        if indices.numel():
            low, high = (int(v) for v in torch.stack(torch.aminmax(indices)).tolist())
            rows = p.shape[0]
            if low < 0 or high >= rows:
                raise ValueError(
                    f"danlu.Lazy: the sparse gradient of {label} lists row "
                    f"{low if low < 0 else high}; its row indices must be in [0, {rows})"
                )

    @contextmanager
    def _checking(self) -> Iterator[None]:
        # The optimizers inside refuse sparse gradients; this wrapper densifies its tables'.
        stepped = {id(p) for _, p in iter_params(self)}
        swapped: list[tuple[Tensor, Tensor]] = []
        try:
            for index, p in enumerate(self.lazy_params):
                grad = p.grad
                if grad is None or id(p) not in stepped or not grad.is_sparse:
                    continue
                self._check_sparse(f"params[{index}] (shape {tuple(p.shape)})", p, grad)
                swapped.append((p, grad))
                p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
            yield
        finally:
            for p, grad in swapped:
                p.grad = grad

    # -- checkpoints ------------------------------------------------------------------------
    def _wrapper_state(self) -> dict[str, Any]:
        index = self._param_index()
        rows: dict[int, dict[str, Tensor]] = {}
        for name, store in zip(MASKS, (self._window, self._pending), strict=True):
            for p, mask in store.items():
                if id(p) in index:
                    rows.setdefault(index[id(p)][0], {})[name] = mask
        return {"lazy_moments": self.lazy_moments, "rows": rows}

    def _distributed_state(self) -> dict[str, Any]:
        record = self._wrapper_state()
        if record["rows"]:
            raise ValueError(
                f"danlu.{type(self).__name__} holds the rows of an accumulation window in "
                "progress; save a distributed checkpoint at the end of a window"
            )
        return {"lazy_moments": record["lazy_moments"]}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        rows = record.get("rows", {})
        if not isinstance(rows, dict):
            raise ValueError(
                f"state_dict: the Lazy record's rows must be a dict, got {type(rows).__name__}"
            )
        tables = self._tables_by_index()
        for key, masks in rows.items():
            i = int(key) if isinstance(key, str) and key.isdigit() else key  # after a DCP trip
            if not _is_count(i) or i not in tables:
                raise ValueError(
                    f"state_dict: the Lazy record has rows for parameter {key!r}, which is not "
                    f"one of this wrapper's tables (parameters {sorted(tables)})"
                )
            if not isinstance(masks, dict) or not set(masks) <= set(MASKS):
                raise ValueError(
                    f"state_dict: the Lazy record's rows[{i}] must be a dict with keys among "
                    f"{MASKS}, got {masks!r}"
                )
            p = tables[i]
            shape = _row_shape(p)
            for name, mask in masks.items():
                if (
                    not isinstance(mask, Tensor)
                    or mask.dtype != torch.bool
                    or tuple(mask.shape) != shape
                ):
                    found = (
                        f"a {mask.dtype} tensor of shape {tuple(mask.shape)}"
                        if isinstance(mask, Tensor)
                        else repr(mask)
                    )
                    raise ValueError(
                        f"state_dict: the Lazy record's rows[{i}][{name!r}] (parameter {i}, "
                        f"shape {tuple(p.shape)}) must be a bool tensor of shape {shape}, "
                        f"got {found}"
                    )

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        tables = self._tables_by_index()
        self._window, self._pending = {}, {}
        for key, masks in record.get("rows", {}).items():
            p = tables[int(key)]
            for name, store in zip(MASKS, (self._window, self._pending), strict=True):
                mask = masks.get(name)
                if mask is not None:
                    store[p] = mask.to(device=local(p).device, copy=True)

    def _tables_by_index(self) -> dict[int, Tensor]:
        """State-dict index → lazy table."""
        lazy = {id(p) for p in self.lazy_params}
        return {i: p for i, (_, p) in enumerate(iter_params(self)) if id(p) in lazy}

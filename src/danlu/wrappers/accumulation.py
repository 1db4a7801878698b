"""Gradient accumulation for any optimizer (docs/reference/algorithms.md#gradient-accumulation) and
the blog's "no-code" recipe (docs/reference/algorithms.md#hidden-accumulation-rule,
#hidden-accumulation-defaults)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from danlu.core.dtensor import check_sync_module, set_gradient_sync
from danlu.core.shell import check_beta, check_int_at_least
from danlu.wrappers._base import (
    OptimizerWrapper,
    check_before_step,
    check_gradients,
    iter_params,
)

__all__ = ["GradientAccumulation", "UpdateEvery", "accumulation_betas"]


#: Why the accumulation wrappers cannot step inside backward (``refuses_per_parameter``).
_NOT_IN_BACKWARD = (
    "{where}: danlu.{name} counts whole steps and keeps the gradient between micro-batches, "
    "so it cannot run inside backward; use the accumulation hidden in the momentum "
    "(danlu.Tiger or danlu.AdamW with grad_accum_steps=k)"
)


def _is_count(value: Any) -> TypeGuard[int]:
    """An integer >= 0 (not a bool), as the wrappers' records hold them."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class GradientAccumulation(OptimizerWrapper):
    """Apply one inner step with the mean of ``steps`` micro-batch gradients
    (docs/reference/algorithms.md#gradient-accumulation).

    Call ``zero_grad()``, ``backward()`` and ``step()`` on every micro-batch as usual. The first
    k − 1 calls of ``step()`` only count; the k-th divides the summed gradients by k and calls the
    inner optimizer's ``step()`` once, so the inner step count (and its bias correction, its
    schedule) counts updates. The result equals one inner step on the mean gradient
    ((g₁ + … + g_k)/k summed left to right) bit for bit, whatever the optimizer.

    **Where the sum lives.** In the ``.grad`` tensors themselves: between micro-steps
    ``zero_grad()`` does nothing (it zeroes after an update), so ``backward()`` adds each
    micro-batch into ``.grad`` as autograd always does. No buffer beyond the gradients is
    allocated. If something else replaces or resets ``.grad`` between micro-steps (assigning
    ``p.grad``, or ``model.zero_grad()`` setting it to ``None``), the wrapper still holds the
    running sum and adds the new gradient to it. Do not zero the gradients in place between
    micro-steps by other means (``model.zero_grad(set_to_none=False)``): that erases the sum.
    On an update step ``.grad`` is divided by k in place.

    **Under DDP or FSDP2** pass the wrapped model as ``module``: the wrapper then switches its
    gradient synchronisation off for the micro-batches that do not end a window and on for the
    one that does (what ``ddp.no_sync()`` does; ``set_requires_gradient_sync`` for FSDP2), so
    gradients cross the network once per update instead of once per micro-batch, and the
    update is still the one on the mean over all ranks and micro-batches. The switch is made
    at construction and after every ``step()`` (and ``load_state_dict``), i.e. before the next
    forward pass, which is when DDP reads it; keep the usual loop and do not add ``no_sync()``
    yourself.

    ``will_update`` says whether the next ``step()`` applies an update (use it to step an lr
    scheduler once per update, or for ``no_sync()`` by hand when no ``module`` is given);
    ``updated`` whether the last one did. ``state_dict()`` includes the micro-step counter and
    the running sums, so a checkpoint taken after ``step()`` mid-window resumes bit for bit
    (``danlu.distributed.get_optimizer_state_dict`` saves at window boundaries only).

    Not for use under AMP's ``GradScaler`` (its ``unscale_`` rewrites ``.grad``, here the running
    sum, and a skipped inf step would leave the window stuck): there, use the scaler's own
    recipe (k backward passes, then ``scaler.step(optimizer)`` on the bare optimizer).

    Put a :class:`NonFiniteGuard` inside (``GradientAccumulation(NonFiniteGuard(opt), k)``): the
    guard then checks the mean gradient once per update.

    Memory: none beyond the ``.grad`` tensors (12 bytes per fp32 parameter with Adam, counting
    the gradient, as in the docs/reference/algorithms.md#optimizer-state-memory). For Tiger or
    SGD-momentum use the accumulation hidden in the momentum instead
    (``danlu.Tiger(grad_accum_steps=k)``), which needs no gradient kept between micro-steps; for
    Adam, ``danlu.AdamW(grad_accum_steps=k)`` does the same with the blog's approximation of v.
    """

    holds_gradients = True

    def __init__(self, optimizer: Optimizer, steps: int, module: nn.Module | None = None) -> None:
        super().__init__(optimizer)
        check_int_at_least("steps", steps, 1)
        check_sync_module("module", module)
        self.steps = int(steps)
        self.module = module
        self.micro_step = 0
        self.updated = False
        self._sums: dict[Tensor, Tensor] = {}
        self._set_sync()

    def _set_sync(self) -> None:
        """Gradient sync of ``module`` on for the micro-batch that ends a window, off otherwise."""
        if self.module is not None:
            set_gradient_sync(self.module, self.will_update)

    @property
    def will_update(self) -> bool:
        """Whether the next ``step()`` applies an update."""
        return self.micro_step + 1 >= self.steps

    # -- capabilities -----------------------------------------------------------------------------
    def keeps_window(self) -> bool:
        return self.steps > 1

    def ends_window(self) -> bool:
        return self.will_update

    def refuses_per_parameter(self, where: str) -> str | None:
        return _NOT_IN_BACKWARD.format(where=where, name=type(self).__name__)

    def _holds_gradient(self, p: Tensor) -> bool:
        return p in self._sums

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.micro_step == 0:
            self.optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        check_gradients(self, "danlu.GradientAccumulation")
        params = [p for _, p in iter_params(self)]
        for p in params:
            running = self._sums.get(p)
            if running is not None and p.grad is not running:
                if p.grad is not None:
                    running.add_(p.grad)
                p.grad = running
        if self.micro_step + 1 < self.steps:
            self.micro_step += 1
            self._sums = {p: p.grad for p in params if p.grad is not None}
            self.updated = False
            self._set_sync()
            return loss
        # Everything the inner step checks, before the gradients are divided: a failed step
        # leaves the window as it was, bit for bit.
        check_before_step(self.optimizer, "danlu.GradientAccumulation")
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.div_(self.steps)
        try:
            self.optimizer.step()
        except BaseException:
            # A later failure (a non-finite gradient under nonfinite="raise"): leave the window
            # as it was, so the step can be retried (exact for k a power of 2).
            for g in grads:
                g.mul_(self.steps)
            self._sums = {p: p.grad for p in params if p.grad is not None}
            raise
        self.micro_step = 0
        self._sums = {}
        self.updated = True
        self._set_sync()
        return loss

    def _coming_gradient(self, p: Tensor, grad: Tensor | None) -> Tensor | None:
        """The (undivided) sum this wrapper's next ``step()`` makes of ``p``'s running sum and
        ``grad``, ``p``'s gradient now; computed, nothing written (for ``danlu.Lazy``)."""
        running = self._sums.get(p)
        if running is None or grad is running:
            return grad
        return running if grad is None else running + grad

    def _wrapper_state(self) -> dict[str, Any]:
        index = self._param_index()
        sums = {index[id(p)][0]: s for p, s in self._sums.items() if id(p) in index}
        return {"steps": self.steps, "micro_step": self.micro_step, "sums": sums}

    def _distributed_state(self) -> dict[str, Any]:
        # the running sums are gradients, which distributed checkpoints do not hold
        if self.micro_step:
            raise ValueError(
                f"danlu.{type(self).__name__} is {self.micro_step} micro-steps into a window; "
                "save a distributed checkpoint after an update (micro_step == 0)"
            )
        return {"steps": self.steps, "micro_step": self.micro_step}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        micro = record.get("micro_step")
        if not _is_count(micro):
            raise ValueError(f"state_dict: bad GradientAccumulation micro_step {micro!r}")
        if micro > 0 and record.get("steps") != self.steps:
            raise ValueError(
                f"state_dict was saved mid-window with steps={record.get('steps')!r}; "
                f"this wrapper has steps={self.steps}"
            )
        if micro >= self.steps:
            raise ValueError(
                f"state_dict: GradientAccumulation micro_step {micro!r} is not in [0, {self.steps})"
            )
        sums = record.get("sums", {})
        if not isinstance(sums, dict):
            raise ValueError(f"state_dict: GradientAccumulation sums must be a dict, got {sums!r}")
        params = [p for _, p in iter_params(self)]
        for key, saved in sums.items():
            i = int(key) if isinstance(key, str) and key.isdigit() else key  # after a DCP trip
            if not _is_count(i) or i >= len(params):
                raise ValueError(
                    f"state_dict: GradientAccumulation sums has a gradient for parameter {i!r}; "
                    f"the optimizer has {len(params)} parameters"
                )
            p = params[i]
            if (
                not isinstance(saved, Tensor)
                or not saved.is_floating_point()
                or saved.shape != p.shape
            ):
                found = (
                    f"a {saved.dtype} tensor of shape {tuple(saved.shape)}"
                    if isinstance(saved, Tensor)
                    else repr(saved)
                )
                raise ValueError(
                    f"state_dict: GradientAccumulation's running sum for parameter {i} must be "
                    f"a floating tensor of shape {tuple(p.shape)}, got {found}"
                )

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        self.micro_step = record["micro_step"]
        self.updated = False
        index = {i: p for i, (_, p) in enumerate(iter_params(self))}
        self._sums = {}
        for i, saved in record.get("sums", {}).items():
            p = index[int(i)]
            running = saved.to(device=p.device, dtype=p.dtype, copy=True)
            p.grad = running
            self._sums[p] = running
        self._set_sync()


class UpdateEvery(OptimizerWrapper):
    """Step the inner optimizer on every micro-step, but with lr = 0 except on every
    ``steps``-th one: the lr multiplied by χ_{t/k} of
    docs/reference/algorithms.md#hidden-accumulation-defaults.

    With the betas from :func:`accumulation_betas` this is the blog's "no-code" approximation
    of gradient accumulation: the moments keep an EMA of every micro-gradient with
    β̃ = 1 − (1 − β)/k, and the parameters move once per k micro-steps. Alone (betas unchanged)
    it is the blog's surprising finding that updating less often can train better. Decoupled
    weight decay is multiplied by the lr and is gated too. Bias correction in the inner optimizer
    counts micro-steps, which β̃ already accounts for (β̃^k ≈ β).

    The window is the wrapper's, as for the optimizers' own ``grad_accum_steps``: a parameter
    without a gradient on a micro-step adds nothing to the moments, and one with a gradient
    earlier in the window but none on its last micro-step is stepped there with a zero
    gradient (that micro-batch counts as zero in the window's mean, as in exact accumulation),
    so it moves with the others instead of waiting for the next window with a gradient on its
    last call. A sparse parameter gets an empty sparse gradient. Which parameters had a
    gradient in the window so far is saved in ``state_dict()``. A parameter added with
    ``add_param_group`` joins the window in progress.

    The lr is zeroed only during the inner ``step()`` and restored afterwards, so schedulers see
    and set the real lr.

    The parameters stay put between updates only if lr = 0 stops the inner optimizer: not so
    for a momentum applied after the lr (``danlu.Amos(momentum>0)``, ``danlu.AdaFactor(beta1>0,
    momentum_mode="scaled")``), which keeps moving them on the zero-lr micro-steps.
    """

    carries_window = True

    def __init__(self, optimizer: Optimizer, steps: int) -> None:
        super().__init__(optimizer)
        check_int_at_least("steps", steps, 1)
        self.steps = int(steps)
        self.micro_step = 0
        # the parameters with a gradient in the window so far → whether it was sparse
        self._seen: dict[Tensor, bool] = {}

    # -- capabilities -----------------------------------------------------------------------------
    def keeps_window(self) -> bool:
        return self.steps > 1

    def ends_window(self) -> bool:
        return self.micro_step + 1 >= self.steps

    def refuses_per_parameter(self, where: str) -> str | None:
        return _NOT_IN_BACKWARD.format(where=where, name=type(self).__name__)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = self._call_closure(closure)
        check_before_step(self.optimizer, "danlu.UpdateEvery")  # the real lr, too
        params = [p for _, p in iter_params(self)]
        if self.micro_step + 1 >= self.steps:
            carried = [p for p in params if p.grad is None and p in self._seen]
            try:
                for p in carried:
                    p.grad = _zero_gradient(p, sparse=self._seen[p])
                self.optimizer.step()
            finally:
                for p in carried:
                    p.grad = None
            self._seen = {}
        else:
            saved = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                lr = group["lr"]
                group["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
            try:
                self.optimizer.step()
            finally:
                for group, lr in zip(self.param_groups, saved, strict=True):
                    group["lr"] = lr
            for p in params:
                if p.grad is not None:
                    self._seen[p] = p.grad.is_sparse
        self.micro_step = (self.micro_step + 1) % self.steps
        return loss

    def _wrapper_state(self) -> dict[str, Any]:
        index = self._param_index()
        seen = sorted(index[id(p)][0] for p in self._seen if id(p) in index)
        sparse = sorted(index[id(p)][0] for p, is_sparse in self._seen.items() if is_sparse)
        return {"steps": self.steps, "micro_step": self.micro_step, "seen": seen, "sparse": sparse}

    def _check_wrapper_state(self, record: dict[str, Any]) -> None:
        micro = record.get("micro_step")
        if not _is_count(micro) or micro >= self.steps:
            raise ValueError(
                f"state_dict: UpdateEvery micro_step {micro!r} is not in [0, {self.steps})"
            )
        count = sum(1 for _ in iter_params(self))
        for key in ("seen", "sparse"):
            indices = record.get(key, [])
            if (
                not isinstance(indices, list | tuple)
                or not all(_is_count(i) and i < count for i in indices)
                or len(set(indices)) != len(indices)
            ):
                raise ValueError(
                    f"state_dict: UpdateEvery {key!r} must list distinct parameter indices in "
                    f"[0, {count}), got {indices!r}"
                )
        if not set(record.get("sparse", [])) <= set(record.get("seen", [])):
            raise ValueError(
                "state_dict: UpdateEvery 'sparse' lists a parameter that 'seen' does not"
            )

    def _load_wrapper_state(self, record: dict[str, Any]) -> None:
        self.micro_step = record["micro_step"]
        params = [p for _, p in iter_params(self)]
        sparse = set(record.get("sparse", []))
        # a record of danlu 0.1.0 has no "seen": no parameter seen in the window so far
        self._seen = {params[i]: i in sparse for i in record.get("seen", [])}


def _zero_gradient(p: Tensor, *, sparse: bool) -> Tensor:
    """A zero gradient for ``p``: dense, or sparse over rows with no row listed."""
    if not sparse:
        return torch.zeros_like(p, memory_format=torch.preserve_format)
    indices = torch.empty((1, 0), dtype=torch.long, device=p.device)
    values = torch.empty((0, *p.shape[1:]), dtype=p.dtype, device=p.device)
    return torch.sparse_coo_tensor(indices, values, p.shape, check_invariants=True)


@overload
def accumulation_betas(betas: float, steps: int) -> float: ...
@overload
def accumulation_betas(betas: Sequence[float], steps: int) -> tuple[float, ...]: ...


def accumulation_betas(betas: float | Sequence[float], steps: int) -> float | tuple[float, ...]:
    """β̃ = 1 − (1 − β)/k for each β: the betas of the blog's "no-code" accumulation recipe
    (docs/reference/algorithms.md#hidden-accumulation-rule); pair them with :class:`UpdateEvery`
    (``steps=k``).

    ``accumulation_betas((0.9, 0.999), 4) == (0.975, 0.99975)``; a single float gives a float.
    """
    check_int_at_least("steps", steps, 1)
    if isinstance(betas, Sequence):
        for i, beta in enumerate(betas):
            check_beta(f"betas[{i}]", beta)
        return tuple(1 - (1 - float(beta)) / steps for beta in betas)
    check_beta("betas", betas)
    return 1 - (1 - float(betas)) / steps

"""LoRA-GA: initialise LoRA from the SVD of the full-weight gradient,
docs/reference/algorithms.md#lora-ga.

kexue 10226; paper arXiv 2407.05000; reference code Outsider565/LoRA-GA
(peft/src/peft/tuners/lora/layer.py). PEFT naming (docs/reference/algorithms.md#conventions):
``W = W0 + s · lora_B @ lora_A``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from danlu.core.dtensor import any_dtensor
from danlu.lora.layers import LoRAAdapter, find_lora_adapters

__all__ = [
    "DIRECTIONS",
    "SCALES",
    "SVD_METHODS",
    "LoRADelta",
    "LoRAGAInfo",
    "average_gradients",
    "export_lora_delta",
    "lora_ga_init_",
]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit", "peft_stable", "peft_gd", "peft_unit")
SVD_METHODS = ("randomized", "full")

LossFn = Callable[[nn.Module, Any], Tensor]

#: Attribute on a LoRA module holding {adapter key: :class:`_GAInit`}. It lives in the module's
#: ``__dict__`` (not its ``state_dict``): it follows ``copy.deepcopy`` and pickling of the module,
#: not ``model.to(...)`` (readers move it to the adapter's device).
_INIT_ATTR = "_danlu_lora_ga_init"


@dataclass(frozen=True)
class _GAInit:
    """What :func:`lora_ga_init_` did to one adapter.

    ``lora_A``, ``lora_B``, ``scale``: the factors it set (in the adapter's dtype) and the
    adapter's scale s0 then, so the change against the function before the call is
    s·BA − s0·B0A0. ``offset_A``, ``offset_B`` (fp32 or wider, out×k and k×in in PEFT naming,
    (out, in) orientation) give the total shift of the base weight by every LoRA-GA call so far,
    W_now = W_before_any_call − scale · offset_B @ offset_A (k = r for one call on a fresh
    adapter; the shift is exact up to the rounding of W to its dtype)."""

    lora_A: Tensor
    lora_B: Tensor
    scale: float
    offset_A: Tensor
    offset_B: Tensor


def _ga_init(module: nn.Module, key: str) -> _GAInit | None:
    record = module.__dict__.get(_INIT_ATTR, {}).get(key)
    return record if isinstance(record, _GAInit) else None


@dataclass(frozen=True)
class LoRAGAInfo:
    """What LoRA-GA saw for one adapter.

    ``singular_values``: the top-2r singular values of the averaged gradient (fp32, CPU);
    ``captured``: Σ_{i≤2r} σ_i² / ‖G‖_F², the share of the gradient the rank-2r update can
    follow (the best residual, docs/reference/algorithms.md#lora-ga-rule, is the rest).
    """

    singular_values: Tensor
    captured: float


@dataclass(frozen=True)
class LoRADelta:
    """A weight change in LoRA form: ``delta = scale · lora_B @ lora_A`` (out×in)."""

    lora_A: Tensor
    lora_B: Tensor
    scale: float

    def weight(self) -> Tensor:
        """The dense (out×in) change, in fp32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())


def _modules_and_weights(adapters: list[LoRAAdapter]) -> dict[str, tuple[Tensor, bool]]:
    out: dict[str, tuple[Tensor, bool]] = {}
    for a in adapters:
        out.setdefault(a.name, (a.base_weight, a.fan_in_fan_out))
    return out


def _distributed(sync_ranks: bool) -> bool:
    return (
        sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def average_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    grad_device: torch.device | str | None = None,
    sync_ranks: bool = True,
) -> dict[str, Tensor]:
    """The gradient of each LoRA layer's frozen base weight, averaged over ``batches``.

    For every batch, ``loss_fn(model, batch)`` must return a scalar loss; its backward pass
    runs with gradients switched on for the target base weights only. A post-accumulate-grad
    hook on each weight adds its ``.grad`` (in fp32) to a running sum and frees it at once, so
    besides the sums at most one weight gradient is alive at a time
    (docs/reference/algorithms.md#lora-ga "memory trick"). ``grad_device="cpu"`` keeps the sums in
    host memory, as the reference code does. The model runs in training mode (as in PEFT); modes,
    ``requires_grad`` flags and existing ``.grad`` of the base weights are restored afterwards, also
    on error.

    Under ``torch.distributed`` (initialised, more than one rank) and with ``sync_ranks``, the
    sums and batch counts are all-reduced over the default process group, so every rank gets
    the average over all ranks' batches (the sums must live on a device the backend supports).

    Returns {module name: averaged gradient} in fp32, shaped (out, in) (transposed for PEFT's
    ``fan_in_fan_out`` layers). Raises ``ValueError`` when there are no batches, no LoRA layers,
    or some layer got no gradient.
    """
    adapters = find_lora_adapters(model)
    if not adapters:
        raise ValueError(
            "the model has no LoRA layers: call danlu.lora.inject(...) or peft.get_peft_model(...) "
            "first"
        )
    targets = _modules_and_weights(adapters)
    return _average_gradients(model, targets, batches, loss_fn, grad_device, sync_ranks)


def _average_gradients(
    model: nn.Module,
    targets: dict[str, tuple[Tensor, bool]],
    batches: Iterable[Any],
    loss_fn: LossFn,
    grad_device: torch.device | str | None,
    sync_ranks: bool,
) -> dict[str, Tensor]:
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable (model, batch) -> loss, got {loss_fn!r}")
    weights: dict[int, Tensor] = {}
    for weight, _ in targets.values():
        weights.setdefault(id(weight), weight)
    sums: dict[int, Tensor] = {}

    def make_hook(key: int) -> Callable[[Tensor], None]:
        def hook(weight: Tensor) -> None:
            grad = weight.grad
            weight.grad = None  # release the full-size gradient as soon as it is produced
            if grad is None:
                return
            device = grad.device if grad_device is None else grad_device
            running = sums.get(key)
            if running is None:
                sums[key] = grad.to(device=device, dtype=torch.float32, copy=True)
            else:
                running.add_(grad.to(device=running.device, dtype=torch.float32))

        return hook

    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = {key: w.grad for key, w in weights.items()}
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    count = 0
    try:
        for p in params:
            p.requires_grad_(False)
        for key, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(make_hook(key)))
        model.train()
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1 or loss.grad_fn is None:
                    raise ValueError(
                        "loss_fn(model, batch) must return a scalar tensor computed from the "
                        f"model, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                    )
                loss.reshape(()).backward()
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        for key, w in weights.items():
            w.grad = saved_grads[key]
        _restore_modes(modes)
    missing = [name for name, (w, _) in targets.items() if id(w) not in sums]
    if _distributed(sync_ranks):
        # Every rank must raise together (or none), or the others would hang in all_reduce.
        status = torch.tensor([int(count == 0), int(bool(missing))], dtype=torch.int64)
        device = next(iter(sums.values())).device if sums else torch.device("cpu")
        status = status.to(device)
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        if int(status[0]) and count:
            raise ValueError("batches is empty on another rank: LoRA-GA needs a batch per rank")
        if int(status[1]) and not missing:
            raise ValueError("a LoRA layer got no gradient on another rank")
    if count == 0:
        raise ValueError("batches is empty: LoRA-GA needs at least one batch")
    if missing:
        raise ValueError(
            "no gradient reached the base weight of "
            + ", ".join(repr(n) for n in missing)
            + " (is the layer used by loss_fn?)"
        )
    if _distributed(sync_ranks):  # the average over every rank's batches
        total_count = torch.tensor([float(count)], device=next(iter(sums.values())).device)
        dist.all_reduce(total_count)
        for key in weights:  # the same order on every rank
            dist.all_reduce(sums[key])
        count = int(total_count.item())
    for total in sums.values():
        total.div_(count)
    return {
        name: sums[id(w)].mT if fan_in_fan_out else sums[id(w)]
        for name, (w, fan_in_fan_out) in targets.items()
    }


# ----------------------------------------------------------------------------------------------
# SVD and the split.


def _randomized_svd(
    grad: Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Halko–Martinsson–Tropp range finder with ``niter`` power iterations. The test matrix is
    drawn on the CPU from ``generator``, so the result does not depend on the device."""
    omega = torch.randn(grad.shape[1], q, generator=generator, dtype=torch.float32)
    basis = torch.linalg.qr(grad @ omega.to(grad.device)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(grad.mT @ basis).Q
        basis = torch.linalg.qr(grad @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ grad, full_matrices=False)
    return basis @ u_small, s, vh


def _top_singular(
    grad: Tensor, k: int, method: str, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of ``grad``, signs fixed so that the largest-magnitude entry of
    each left singular vector is positive (SVD signs are otherwise arbitrary,
    docs/reference/algorithms.md#lora-ga-edge-cases)."""
    if method == "full":
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    else:
        q = min(2 * k, min(grad.shape))  # q = min(4r, ·) as in the reference code
        u, s, vh = _randomized_svd(grad, q, niter, generator)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(u.shape[1], device=u.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, s, vh * signs[:, None]


def _split(
    u: Tensor, s: Tensor, vh: Tensor, r: int, direction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(lora_A, lora_B, singular values of lora_B's directions),
    docs/reference/algorithms.md#lora-ga-code."""
    if direction == "ArB2r":  # reference default: A ← Vh[:r], B ← U[:, r:2r]
        return vh[:r], u[:, r : 2 * r], s[r : 2 * r]
    if direction == "A2rBr":  # the blog's split: B ← U[:, :r], A ← Vh[r:2r]
        return vh[r : 2 * r], u[:, :r], s[:r]
    return vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]  # "ArBr", interleaved


def _scaled(
    lora_A: Tensor,
    lora_B: Tensor,
    s_b: Tensor,
    *,
    scale: str,
    lora_scale: float,
    out_features: int,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    stable = out_features**0.25 / gamma**0.5
    if scale.startswith("peft_"):
        # PEFT's variant: lora_B also carries the singular values of its directions, and
        # "stable" scales lora_B only.
        lora_B = lora_B * s_b
        scale = scale.removeprefix("peft_")
        if scale == "stable":
            return lora_A, lora_B * stable
    if scale == "stable":  # reference: both factors times m^{1/4}/√γ, m = out_features
        return lora_A * stable, lora_B * stable
    if scale == "gd":
        return lora_A / lora_scale, lora_B / lora_scale
    return lora_A, lora_B  # "unit"


def _check_options(
    direction: Any, scale: Any, stable_gamma: Any, svd: Any, niter: Any, seed: Any
) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    gamma_ok = isinstance(stable_gamma, int | float) and not isinstance(stable_gamma, bool)
    if not gamma_ok or not 0 < stable_gamma < float("inf"):
        raise ValueError(f"stable_gamma must be a finite number > 0, got {stable_gamma!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be an integer >= 0, got {niter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def lora_ga_init_(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    *,
    gradients: dict[str, Tensor] | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    svd: str = "randomized",
    niter: int = 4,
    seed: int = 0,
    grad_device: torch.device | str | None = None,
    sync_ranks: bool = True,
) -> dict[str, LoRAGAInfo]:
    r"""Initialise every LoRA adapter of ``model`` with LoRA-GA, in place
    (docs/reference/algorithms.md#lora-ga).

    1. Average the gradient G of each frozen base weight over ``batches``
       (:func:`average_gradients`: one layer's gradient alive at a time; over all ranks under
       ``torch.distributed`` with ``sync_ranks``), or take ``gradients`` ({module name: G})
       computed earlier.
    2. SVD G = U Σ Vh (``svd="full"``, or ``"randomized"`` with q = min(4r, ·) and ``niter``
       power iterations from a test matrix seeded by ``seed``: deterministic).
    3. Split the top 2r directions (``direction``):

       * ``"ArB2r"`` (reference default): lora_A = Vh[:r], lora_B = U[:, r:2r];
       * ``"A2rBr"`` (the blog's split): lora_B = U[:, :r], lora_A = Vh[r:2r];
       * ``"ArBr"``: interleaved, lora_B = U[:, 0:2r:2], lora_A = Vh[1:2r:2].

    4. Scale (``scale``), with s the LoRA scale and m = out_features:

       * ``"stable"`` (reference default): both factors times m^{1/4}/√γ (γ = ``stable_gamma``);
       * ``"gd"``: both divided by s; ``"unit"``: unchanged;
       * ``"peft_stable"``, ``"peft_gd"``, ``"peft_unit"``: PEFT's ``LoraGAConfig`` variant,
         which first multiplies lora_B by the singular values of its directions and, for
         "stable", scales lora_B only.

    5. In fp32: W0 ← W0 + s·B A − s·B0 A0, where B A is the adapter before the call (zero for
       a fresh adapter) and B0, A0 the new factors rounded to the adapter's dtype, so the
       model computes the same function as before. B0, A0, s and the base weight's total shift
       are kept on the layer object (not in its ``state_dict``), so :func:`export_lora_delta`
       can give the fine-tuned change against that function and
       :func:`save_lora_ga_adapter` can save a PEFT adapter for the original base model
       (``save_pretrained`` alone saves one that is wrong there).

    Every check (options, 2r ≤ min(in, out) for each layer, a base weight that no other module
    shares, e.g. no tied embedding, a finite gradient for each layer) runs before anything is
    written: on error the model is unchanged.

    Deviations from the reference: the SVD is seeded (the reference's ``svd_lowrank`` uses the
    global RNG) and its signs are fixed; the offset uses the factors after rounding to the
    adapter's dtype (as PEFT does), so bf16 adapters reproduce W0 as closely as bf16 allows.

    Returns {adapter label: :class:`LoRAGAInfo`}.
    """
    _check_options(direction, scale, stable_gamma, svd, niter, seed)
    adapters = find_lora_adapters(model)
    if not adapters:
        raise ValueError(
            "the model has no LoRA layers: call danlu.lora.inject(...) or peft.get_peft_model(...) "
            "first"
        )
    for a in adapters:
        if any_dtensor((a.base_weight, a.lora_A, a.lora_B)):
            raise ValueError(
                f"{a.label!r} is sharded (DTensor, FSDP2): run lora_ga_init_ on the whole model "
                "before fully_shard (it averages its gradient estimate over the ranks itself)"
            )
        if 2 * a.rank > min(a.in_features, a.out_features):
            raise ValueError(
                f"{a.label!r}: LoRA-GA needs 2·rank <= min(in_features, out_features) = "
                f"min({a.in_features}, {a.out_features}), got rank {a.rank}"
            )
    targets = _modules_and_weights(adapters)
    _check_not_shared(model, targets)
    if gradients is None:
        if batches is None or loss_fn is None:
            raise ValueError("pass batches and loss_fn, or gradients")
        grads = _average_gradients(model, targets, batches, loss_fn, grad_device, sync_ranks)
    else:
        if batches is not None or loss_fn is not None:
            raise ValueError("pass either gradients or (batches, loss_fn), not both")
        grads = _checked_gradients(gradients, targets)
    for name, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"the averaged gradient of {name!r} is not finite")

    generator = torch.Generator().manual_seed(seed)
    plans: list[tuple[LoRAAdapter, Tensor, Tensor]] = []
    infos: dict[str, LoRAGAInfo] = {}
    remaining = {name: sum(a.name == name for a in adapters) for name in targets}
    svds: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = {}
    for a in adapters:
        g = grads[a.name]
        k = 2 * a.rank
        if (a.name, k) not in svds:
            svds[(a.name, k)] = _top_singular(g, k, svd, niter, generator)
        u, s, vh = svds[(a.name, k)]
        lora_A, lora_B, s_b = _split(u, s, vh, a.rank, direction)
        lora_A, lora_B = _scaled(
            lora_A,
            lora_B,
            s_b,
            scale=scale,
            lora_scale=a.scale,
            out_features=a.out_features,
            gamma=float(stable_gamma),
        )
        device, dtype = a.lora_A.device, a.lora_A.dtype
        plans.append(
            (a, lora_A.to(device=device, dtype=dtype), lora_B.to(device=device, dtype=dtype))
        )
        total = float(g.square().sum())
        infos[a.label] = LoRAGAInfo(
            singular_values=s.detach().cpu(),
            captured=float(s.square().sum()) / total if total > 0 else 0.0,
        )
        remaining[a.name] -= 1
        if remaining[a.name] == 0:  # free this layer's gradient before the next SVD
            del grads[a.name]
            svds = {key: val for key, val in svds.items() if key[0] != a.name}

    with torch.no_grad():
        for a, lora_A, lora_B in plans:
            _apply(a, lora_A, lora_B)
    return infos


def _check_not_shared(model: nn.Module, targets: dict[str, tuple[Tensor, bool]]) -> None:
    """LoRA-GA shifts each base weight; a weight that some other module also uses (tied input
    and output embeddings, say) would change that module's output, so refuse it."""
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    for name, (w, _) in targets.items():
        prefix = f"{name}." if name else ""
        others = [n for n in names.get(id(w), []) if not n.startswith(prefix)]
        if others:
            raise ValueError(
                f"{name!r}: its base weight is shared with {', '.join(map(repr, others))} (tied "
                "weights); LoRA-GA shifts the base weight, which would change the other use too: "
                "untie it (give the layer its own copy of the weight) or leave this layer out"
            )


def _checked_gradients(
    gradients: dict[str, Tensor], targets: dict[str, tuple[Tensor, bool]]
) -> dict[str, Tensor]:
    out = {}
    for name, (w, fan_in_fan_out) in targets.items():
        if name not in gradients:
            raise ValueError(f"gradients has no entry for LoRA layer {name!r}")
        g = gradients[name]
        shape = tuple(w.shape[::-1]) if fan_in_fan_out else tuple(w.shape)
        if not isinstance(g, Tensor) or tuple(g.shape) != shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"gradients[{name!r}] must have shape {shape} (out, in), got {got}")
        out[name] = g.detach().to(device=w.device, dtype=torch.float32)
    return out


def _apply(a: LoRAAdapter, lora_A: Tensor, lora_B: Tensor) -> None:
    weight = a.base_weight
    w = weight.float()
    if a.fan_in_fan_out:
        w = w.mT
    current_A, current_B = a.lora_A.detach().clone(), a.lora_B.detach().clone()
    folded = bool(current_B.any()) and bool(current_A.any())
    if folded:  # fold the adapter's current value in
        w = w + a.scale * (current_B.float() @ current_A.float())
    w = w - a.scale * (lora_B.float() @ lora_A.float())
    weight.copy_(w.mT if a.fan_in_fan_out else w)
    a.lora_A.copy_(lora_A)
    a.lora_B.copy_(lora_B)
    store = a.module.__dict__.setdefault(_INIT_ATTR, {})
    store[a.key] = _record(_ga_init(a.module, a.key), a, lora_A, lora_B, current_A, current_B)


def _record(
    old: _GAInit | None,
    a: LoRAAdapter,
    lora_A: Tensor,
    lora_B: Tensor,
    current_A: Tensor,
    current_B: Tensor,
) -> _GAInit:
    """The record after W ← W + s·(current B)(current A) − s·B0A0: the base shift so far is
    old shift − s·(current B)(current A) + s·B0A0, kept as a low-rank factor pair."""
    wide = torch.promote_types(lora_A.dtype, torch.float32)
    folded = bool(current_B.any()) and bool(current_A.any())
    # A second call right after the first (no training between) folds in exactly the adapter
    # the first one recorded: the two terms cancel and the shift keeps rank r.
    cancels = (
        folded
        and old is not None
        and old.scale == a.scale
        and torch.equal(old.offset_A, current_A.to(wide))
        and torch.equal(old.offset_B, current_B.to(wide))
    )
    parts_A: list[Tensor] = []
    parts_B: list[Tensor] = []
    if old is not None and not cancels:
        parts_A.append(old.offset_A.to(lora_A.device))
        parts_B.append(old.offset_B.to(lora_A.device) * (old.scale / a.scale))
    if folded and not cancels:
        parts_A.append(current_A.to(wide))
        parts_B.append(-current_B.to(wide))
    parts_A.append(lora_A.detach().to(wide))
    parts_B.append(lora_B.detach().to(wide))
    return _GAInit(
        lora_A=lora_A.detach().clone(),
        lora_B=lora_B.detach().clone(),
        scale=a.scale,
        offset_A=torch.cat(parts_A, dim=0) if len(parts_A) > 1 else parts_A[0].clone(),
        offset_B=torch.cat(parts_B, dim=1) if len(parts_B) > 1 else parts_B[0].clone(),
    )


def export_lora_delta(model: nn.Module) -> dict[str, LoRADelta]:
    r"""The change each adapter makes to its layer, as a LoRA delta
    (docs/reference/algorithms.md#lora-ga-code).

    For an adapter initialised by :func:`lora_ga_init_` the base weight was shifted by
    −s·B0A0, so the change against the function the model computed before LoRA-GA is
    s(BA − B0A0): returned as a rank-2r pair ``lora_A = [A; A0]``, ``lora_B = [B, −B0]`` with
    the same scale (the form PEFT's ``path_initial_model_for_weight_conversion`` writes). For
    other adapters it is s·BA. ``LoRADelta.weight()`` gives the dense (out×in) matrix.
    """
    out = {}
    for a in find_lora_adapters(model):
        lora_A, lora_B = a.lora_A.detach(), a.lora_B.detach()
        init = _ga_init(a.module, a.key)
        if init is not None:
            lora_A0 = init.lora_A.to(device=lora_A.device, dtype=lora_A.dtype)
            lora_B0 = init.lora_B.to(device=lora_B.device)
            if init.scale != a.scale:  # the adapter's scale was changed since lora_ga_init_
                lora_B0 = lora_B0.float() * (init.scale / a.scale)
            lora_A = torch.cat([lora_A, lora_A0], dim=0)
            lora_B = torch.cat([lora_B, -lora_B0.to(lora_B.dtype)], dim=1)
        out[a.label] = LoRADelta(lora_A.clone(), lora_B.clone(), a.scale)
    return out

"""Every Triton kernel against the single-tensor path at LLM sizes (part 2 of gpu_check.py).

For each variant (an optimizer and the options that choose a kernel variant: parameter dtype,
momentum dtype, stochastic rounding, maximize, weight decay, accumulation micro-steps, ...)
two optimizers are built through the public API over the same values: ``fused=True`` (the
Triton kernels on CUDA) on the parameters, and ``fused=False, foreach=False`` (the
single-tensor loop, the reference) on fp32 copies of them (on copies in the parameters' own
low precision for AdaX and AdaFactor rounding to nearest, whose momentum follows the
parameter's dtype: the reference then rounds it as the kernel does). Both take one warm-up
step (which compiles the kernels); then each compared step starts both from the same state
(the reference's parameters and state are set from the kernel side's, cast to the
reference's dtypes), gives both the same gradient, and compares every output, the parameters
and each state tensor (fp32 rounding errors are scaled by the larger of the new and the old
value, as an update that cancels keeps the errors of its operands):

* fp32 parameters: ``|Δ| ≤ 4 ulp + 1e-3·|step|`` elementwise (a few roundings plus 0.1 % of
  that element's own update);
* fp32 state: ``|Δ| ≤ 1e-5·max(|ref|, |old|, 1e-3·max|ref|)``;
* bf16/fp16 outputs against an fp32 reference, rounded to nearest: a grid neighbour of the
  fp32 result, and at most 0.1 % of them not its nearest;
* bf16/fp16 outputs against a reference in the same dtype (its own roundings): at most one
  spacing (and 2^-7 of the step) apart, at most 1 % differing;
* stochastically rounded parameters (statistically): a grid neighbour of the fp32 reference,
  unbiased (the summed rounding error within 6 standard deviations of 0) and as spread as
  stochastic rounding is (Σ error² within 20 % of its expectation; rounding to nearest
  gives about half of it).

Lion's and Tiger's updates are signs: where the sign's argument is 0 to within 1e-6 of its
terms (a tie that fp32 rounding decides either way) the parameter is left out, and counted.

    python benchmarks/gpu_kernels.py --records out.jsonl     # what gpu_check.py runs
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import danlu

# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ShapeSet:
    """Named parameter shapes with their Tiger kinds; ``adafactor_min_dim`` is AdaFactor's
    ``min_dim_size_to_factor`` (its default, 128, for real sizes; smaller for tiny ones so
    that their matrices are factored too)."""

    name: str
    shapes: tuple[tuple[str, tuple[int, ...], str], ...]
    adafactor_min_dim: int = 128

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.shapes)


def llama_shapes(
    *, vocab: int, dim: int, hidden: int, layers: int
) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """Every parameter of a LLaMA-style decoder: token embedding, per layer the attention
    projections q, k, v, o (dim × dim), the gated MLP (gate and up hidden × dim, down
    dim × hidden) and two RMSNorm gains, then the final norm and an untied LM head."""
    shapes: list[tuple[str, tuple[int, ...], str]] = [("embed_tokens", (vocab, dim), "embedding")]
    for i in range(layers):
        shapes.append((f"layers.{i}.input_norm", (dim,), "elementwise"))
        shapes += [(f"layers.{i}.attn.{n}_proj", (dim, dim), "matrix") for n in "qkvo"]
        shapes.append((f"layers.{i}.post_attention_norm", (dim,), "elementwise"))
        shapes.append((f"layers.{i}.mlp.gate_proj", (hidden, dim), "matrix"))
        shapes.append((f"layers.{i}.mlp.up_proj", (hidden, dim), "matrix"))
        shapes.append((f"layers.{i}.mlp.down_proj", (dim, hidden), "matrix"))
    shapes.append(("norm", (dim,), "elementwise"))
    shapes.append(("lm_head", (vocab, dim), "matrix"))
    return tuple(shapes)


LLAMA_1B = {"vocab": 32000, "dim": 2048, "hidden": 5632, "layers": 16}
TINY = {"vocab": 96, "dim": 16, "hidden": 40, "layers": 1}

SHAPE_SETS = {
    # the whole model (0.95B parameters): the step benchmark
    "llama1b": ShapeSet("llama1b", llama_shapes(**LLAMA_1B)),
    # one of each distinct tensor (one layer, the embedding, the head, the final norm:
    # 182M elements): the kernel comparison, which needs no repeats of a shape
    "llama1b-distinct": ShapeSet("llama1b-distinct", llama_shapes(**{**LLAMA_1B, "layers": 1})),
    # CPU tests (Triton's interpreter)
    "tiny": ShapeSet("tiny", llama_shapes(**TINY), adafactor_min_dim=8),
}


def make_params(shape_set: ShapeSet, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Parameters with LLaMA-like values (weights 0.02·N(0, 1), norm gains 1 + 0.1·N(0, 1):
    random, so that no rounding boundary is shared by many elements), drawn on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape, kind in shape_set.shapes:
        values = torch.randn(shape, generator=gen, device=device)
        values = values.mul_(0.1).add_(1.0) if kind == "elementwise" else values.mul_(0.02)
        params.append(nn.Parameter(values.to(dtype)))
    return params


def make_grads(params: Sequence[Tensor], seed: int, scale: float = 1e-2) -> list[Tensor]:
    """One gradient per parameter, ``scale``·N(0, 1) in the parameter's dtype."""
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(p.shape, generator=gen, device=device).mul_(scale).to(p.dtype) for p in params
    ]


def kind_groups(params: Sequence[Tensor], shape_set: ShapeSet) -> list[dict[str, Any]]:
    """Tiger-style groups: one per kind; norm gains shrink toward 1 and are not decayed."""
    by_kind: dict[str, list[Tensor]] = {}
    for p, (_, _, kind) in zip(params, shape_set.shapes, strict=True):
        by_kind.setdefault(kind, []).append(p)
    groups: list[dict[str, Any]] = []
    for kind, ps in by_kind.items():
        group: dict[str, Any] = {"params": ps, "kind": kind}
        if kind == "elementwise":
            group.update(center=1.0, weight_decay=0.0)
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """One kernel variant: an optimizer with options, the parameter dtype, and whether the
    kernel side rounds parameters stochastically. ``steps`` compared steps follow a warm-up."""

    key: str
    algorithm: str  # the registry name: lion, tiger, adax, adafactor
    label: str
    dtype: torch.dtype
    options: Mapping[str, Any]
    stochastic: bool = False
    steps: int = 2
    tensor_lr: bool = False
    nonfinite: bool = False  # a NaN and an inf gradient on the compared steps


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LION = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
TIGER = {"lr": 1e-3, "beta": 0.965, "weight_decay": 0.01}
ADAX = {"lr": 1e-3, "betas": (0.9, 1e-4), "eps": 1e-6}
ADAFACTOR = {"lr": 1e-3}


def _variants_by_algorithm() -> list[list[Variant]]:
    lion = [
        Variant("lion-fp32", "lion", "fp32, decay", F32, LION),
        Variant(
            "lion-fp32-max",
            "lion",
            "fp32, maximize, tensor lr, no decay",
            F32,
            {**LION, "weight_decay": 0.0, "maximize": True},
            tensor_lr=True,
        ),
        Variant(
            "lion-fp32-bf16m",
            "lion",
            "fp32, bf16 momentum",
            F32,
            {**LION, "state_dtype": BF16},
        ),
        Variant("lion-bf16", "lion", "bf16, round to nearest", BF16, LION),
        Variant("lion-bf16-sr", "lion", "bf16, stochastic rounding", BF16, LION, stochastic=True),
        Variant(
            "lion-fp16-sr",
            "lion",
            "fp16, fp32 momentum, stochastic rounding",
            F16,
            {**LION, "state_dtype": F32},
            stochastic=True,
        ),
    ]
    tiger = [
        Variant("tiger-fp32", "tiger", "fp32, decay", F32, TIGER),
        Variant(
            "tiger-fp32-accum",
            "tiger",
            "fp32, 3 accumulation micro-steps, maximize",
            F32,
            {**TIGER, "grad_accum_steps": 3, "maximize": True},
            steps=3,
        ),
        Variant(
            "tiger-fp32-bf16m", "tiger", "fp32, bf16 momentum", F32, {**TIGER, "state_dtype": BF16}
        ),
        Variant("tiger-bf16", "tiger", "bf16, round to nearest", BF16, TIGER),
        Variant(
            "tiger-bf16-sr",
            "tiger",
            "bf16, stochastic rounding, 2 micro-steps",
            BF16,
            {**TIGER, "grad_accum_steps": 2},
            stochastic=True,
            steps=3,
        ),
        Variant(
            "tiger-fp32-nonfinite",
            "tiger",
            "fp32, NaN and inf gradients (shrink)",
            F32,
            {**TIGER, "nonfinite": "shrink"},
            nonfinite=True,
        ),
    ]
    adax = [
        Variant("adax-fp32", "adax", "fp32", F32, ADAX),
        Variant(
            "adax-fp32-opts",
            "adax",
            "fp32, ε inside √, maximize, decay, tensor lr",
            F32,
            {**ADAX, "eps_inside_sqrt": True, "maximize": True, "weight_decay": 0.1},
            tensor_lr=True,
        ),
        Variant("adax-bf16", "adax", "bf16, round to nearest", BF16, ADAX),
        Variant("adax-bf16-sr", "adax", "bf16, stochastic rounding", BF16, ADAX, stochastic=True),
    ]
    adafactor = [
        Variant("adafactor-fp32", "adafactor", "fp32, β1 = 0, clipping, scale", F32, ADAFACTOR),
        Variant(
            "adafactor-fp32-unit",
            "adafactor",
            "fp32, β1 = 0.9 (unit), decay, maximize, last two dims",
            F32,
            {
                **ADAFACTOR,
                "beta1": 0.9,
                "weight_decay": 0.1,
                "maximize": True,
                "factored_dims": "last_two",
            },
        ),
        Variant(
            "adafactor-fp32-scaled",
            "adafactor",
            "fp32, β1 = 0.9 (scaled), no clipping, no scale",
            F32,
            {
                **ADAFACTOR,
                "beta1": 0.9,
                "momentum_mode": "scaled",
                "clip_threshold": None,
                "multiply_by_parameter_scale": False,
            },
        ),
        Variant(
            "adafactor-bf16",
            "adafactor",
            "bf16, β1 = 0.9, round to nearest",
            BF16,
            {**ADAFACTOR, "beta1": 0.9},
        ),
        Variant(
            "adafactor-bf16-sr",
            "adafactor",
            "bf16, stochastic rounding",
            BF16,
            ADAFACTOR,
            stochastic=True,
        ),
    ]
    return [lion, tiger, adax, adafactor]


def variants() -> list[Variant]:
    """Every variant, interleaved across the kernels (each kernel's plain fp32 case first), so
    that a run cut short has covered every kernel."""
    lists = _variants_by_algorithm()
    out = []
    for i in range(max(len(lst) for lst in lists)):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


def _accepts(variant: Variant, name: str) -> bool:
    return name in inspect.signature(danlu.REGISTRY[variant.algorithm].cls).parameters


def reference_dtype(variant: Variant) -> torch.dtype:
    """The reference's parameter dtype: fp32 copies (the exact result that rounding to nearest
    or stochastic rounding starts from), except for bf16/fp16 parameters rounded to nearest
    whose momentum follows the parameter's dtype (AdaX, AdaFactor: no ``state_dtype``): the
    reference then runs on the same dtypes, so its momentum is rounded as the kernel's is."""
    if variant.dtype == torch.float32 or variant.stochastic or _accepts(variant, "state_dtype"):
        return torch.float32
    return variant.dtype


def build_optimizer(
    variant: Variant, params: Sequence[Tensor], shape_set: ShapeSet, *, reference: bool
) -> torch.optim.Optimizer:
    """The kernel side (``fused=True``) or the reference (the single-tensor loop, rounding to
    nearest; with the kernel side's momentum dtype where the optimizer has ``state_dtype``)."""
    options = dict(variant.options)
    if variant.algorithm == "adafactor":
        options.setdefault("min_dim_size_to_factor", shape_set.adafactor_min_dim)
    if variant.tensor_lr:
        options["lr"] = torch.tensor(options["lr"], device=params[0].device)
    if reference:
        options.update(fused=False, foreach=False, stochastic_rounding=False)
        if _accepts(variant, "state_dtype"):
            options["state_dtype"] = options.get("state_dtype") or variant.dtype
    else:
        options.update(fused=True, stochastic_rounding=variant.stochastic)
    groups: Any = kind_groups(params, shape_set) if variant.algorithm == "tiger" else list(params)
    return danlu.REGISTRY[variant.algorithm].cls(groups, **options)


# ---------------------------------------------------------------------------------------------
# Comparisons (float64, on the tensors' device)

#: (explicit mantissa bits, smallest normal exponent) of the float formats
_GRID = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}

STATE_RTOL = 1e-5  # fp32 state, relative to max(|ref|, 1e-3·max|ref|)
PARAM_ULPS = 4  # fp32 parameters: roundings allowed ...
PARAM_STEP_RTOL = 1e-3  # ... plus this fraction of the element's own step
MAX_DIFFER = 1e-3  # low-precision outputs: at most this fraction off the nearest value ...
MAX_DIFFER_ADJACENT = 1e-2  # ... or off the reference's own low-precision result
MAX_EXCLUDED = 1e-3  # at most this fraction of sign ties left out
TIE = 1e-6  # a sign's argument within TIE of its terms is a tie
SR_MAX_Z = 6.0
SR_SPREAD = (0.8, 1.2)

TOLERANCES = {
    "fp32-param": f"|Δ| ≤ {PARAM_ULPS} ulp + {PARAM_STEP_RTOL:g}·|step|",
    "fp-state": f"|Δ| ≤ {STATE_RTOL:g}·max(|ref|, |old|, 1e-3·max|ref|)",
    "nearest": f"grid neighbour of the fp32 result; ≤ {MAX_DIFFER:.1%} not nearest",
    "adjacent": f"≤ 1 spacing + 2^-7·|step|; ≤ {MAX_DIFFER_ADJACENT:.0%} differ",
    "stochastic": (
        f"grid neighbour; |bias| ≤ {SR_MAX_Z:g} σ; Σerr²/E ∈ [{SR_SPREAD[0]:g}, {SR_SPREAD[1]:g}]"
    ),
    "exact": "equal",
}


def spacing(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The distance between consecutive ``dtype`` values at float64 ``x`` (the larger one at a
    power of two; the subnormal spacing below the smallest normal number)."""
    mantissa, emin = _GRID[dtype]
    _, exponent = torch.frexp(x)  # |x| = m·2^e with m in [0.5, 1): floor(log2|x|) = e − 1
    exponent = torch.where(x == 0, torch.full_like(exponent, emin), exponent - 1)
    return torch.ldexp(torch.ones_like(x), exponent.clamp_min(emin) - mantissa)


def neighbours(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ``dtype`` values just below and just above float64 ``x`` (both x when it is one)."""
    s = spacing(x, dtype)
    return torch.floor(x / s) * s, torch.ceil(x / s) * s


@dataclass
class OutputStats:
    """One output (the parameters, or one state entry) of one variant, over all its tensors
    and compared steps."""

    output: str
    dtype: str
    mode: str
    numel: int = 0  # elements compared
    excluded: int = 0  # sign ties left out
    beyond: int = 0  # elements outside the tolerance
    differ: int = 0  # elements not equal to the reference (low precision: to its nearest)
    max_abs: float = 0.0
    max_rel: float = 0.0
    # stochastic rounding, in units of each element's spacing (up − down):
    sr_bias: float = 0.0  # Σ (rounded − exact)
    sr_var: float = 0.0  # Σ (up − exact)(exact − down): its variance under stochastic rounding
    sr_sq: float = 0.0  # Σ (rounded − exact)²

    def verdict(self) -> tuple[bool, str]:
        """(passed, what is wrong)."""
        problems = []
        if self.beyond:
            problems.append(f"{self.beyond} of {self.numel} beyond tolerance")
        if self.excluded > MAX_EXCLUDED * (self.numel + self.excluded):
            problems.append(f"{self.excluded} sign ties left out (too many)")
        limit = {"nearest": MAX_DIFFER, "adjacent": MAX_DIFFER_ADJACENT}.get(self.mode)
        if limit is not None and self.differ > limit * self.numel:
            problems.append(f"{self.differ / max(self.numel, 1):.2%} differ")
        if self.mode == "stochastic":
            if self.sr_var <= 0:
                problems.append("no element needed rounding: stochastic rounding not exercised")
            else:
                z, spread = self.sr_z, self.sr_spread
                if abs(z) > SR_MAX_Z:
                    problems.append(f"biased rounding (z = {z:.1f})")
                if not SR_SPREAD[0] <= spread <= SR_SPREAD[1]:
                    problems.append(f"Σerr²/E = {spread:.2f}: not stochastic rounding")
        return not problems, "; ".join(problems)

    @property
    def sr_z(self) -> float:
        return self.sr_bias / math.sqrt(self.sr_var) if self.sr_var > 0 else 0.0

    @property
    def sr_spread(self) -> float:
        return self.sr_sq / self.sr_var if self.sr_var > 0 else float("nan")

    def record(self) -> dict[str, Any]:
        passed, problem = self.verdict()
        out = asdict(self)
        out.update(passed=passed, problem=problem, tolerance=TOLERANCES[self.mode])
        if self.mode == "stochastic":
            out.update(sr_z=self.sr_z, sr_spread=self.sr_spread)
        return out


def _special(a: Tensor, b: Tensor) -> Tensor:
    """Both NaN, or the same infinity: equal."""
    return (a.isnan() & b.isnan()) | (a.isinf() & (a == b))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def comparison_mode(got: torch.dtype, want: torch.dtype, *, param: bool, stochastic: bool) -> str:
    """How an output of dtype ``got`` (kernel) is compared with the reference's ``want``."""
    if got in LOW_PRECISION:
        if want == got:
            return "adjacent"
        if want in (torch.float32, torch.float64):
            return "stochastic" if param and stochastic else "nearest"
    elif got == want and got.is_floating_point:
        return "fp32-param" if param else "fp-state"
    return "exact"


def accumulate(
    stats: OutputStats,
    got: Tensor,
    want: Tensor,
    *,
    old: Tensor | None = None,
    exclude: Tensor | None = None,
    step_rounding: float = 0.0,
) -> None:
    """Compare ``got`` (the kernel's output) with ``want`` (the reference's) by ``stats.mode``
    and add to ``stats``. ``old`` is the value before the step (the step's size enters the
    tolerance of parameters). ``step_rounding``: the relative error of the kernel's step that
    the reference does not reproduce (a low-precision momentum it keeps in fp32)."""
    a, b = got.detach().double().reshape(-1), want.detach().double().reshape(-1)
    before = None if old is None else old.detach().double().reshape(-1)
    keep = torch.ones_like(a, dtype=torch.bool) if exclude is None else ~exclude.reshape(-1)
    stats.excluded += int(a.numel() - keep.sum())
    stats.numel += int(keep.sum())
    if not a.numel():
        return
    special = _special(a, b)
    diff = torch.where(special, torch.zeros_like(a), (a - b).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)  # NaN against a number
    finite_b = b[b.isfinite()]
    floor = 1e-3 * float(finite_b.abs().max()) if finite_b.numel() else 0.0
    rel = diff / b.abs().clamp_min(max(floor, 1e-300))
    step = torch.zeros_like(b) if before is None else torch.nan_to_num((b - before).abs())
    # the scale of fp32 rounding errors: the larger of the new and the old value (an update
    # that cancels to nearly 0 keeps the rounding error of its operands)
    magnitude = b.abs() if before is None else torch.maximum(b.abs(), before.abs())
    mode = stats.mode
    if mode == "exact":
        bad = diff > 0
    elif mode == "fp-state":
        bad = diff > STATE_RTOL * torch.nan_to_num(magnitude.clamp_min(floor), nan=math.inf)
    elif mode == "fp32-param":
        tol = PARAM_ULPS * spacing(magnitude, torch.float32) + PARAM_STEP_RTOL * step
        bad = diff > torch.nan_to_num(tol, nan=0.0)
    elif mode == "adjacent":
        # one spacing, plus the fp32 roundings of the operands where the update cancels, plus
        # 2^-7 of the step: the reference rounds some coefficients to the low precision
        # (torch computes bf16 ⊙ 0-d fp32 tensor in bf16)
        tol = spacing(torch.maximum(a.abs(), b.abs()), got.dtype)
        tol = tol + PARAM_ULPS * spacing(magnitude, torch.float32) + 2.0**-7 * step
        bad = diff > tol
    elif mode in ("nearest", "stochastic"):
        # the kernel's own fp32 result x' may differ from the reference's x by a few fp32
        # roundings (and ``step_rounding`` of the step): it must be a neighbour of x ± δ
        delta = PARAM_ULPS * spacing(magnitude, torch.float32) + step_rounding * step
        lo, _ = neighbours(b - delta, got.dtype)
        _, hi = neighbours(b + delta, got.dtype)
        bad = ((a < lo) | (a > hi) | a.isnan()) & ~special
        if mode == "nearest":
            nearest = want.detach().reshape(-1).to(got.dtype).double()
            stats.differ += int(((a != nearest) & ~_special(a, nearest) & keep).sum())
        else:
            # in units of each element's spacing, so that every element weighs the same; only
            # where x' is known to within 1 % of the spacing (not near 0, where the step
            # dwarfs the spacing and the momentum's rounding moves x' by a good part of it)
            down, up = neighbours(b, got.dtype)
            gap = up - down
            use = keep & b.isfinite() & a.isfinite() & ~bad & (gap > 0) & (delta <= 0.01 * gap)
            gap = torch.where(use, gap, torch.ones_like(gap))
            err = torch.where(use, (a - b) / gap, torch.zeros_like(a))
            var = torch.where(use, (up - b) * (b - down) / (gap * gap), torch.zeros_like(a))
            stats.sr_bias += float(err.sum())
            stats.sr_sq += float((err * err).sum())
            stats.sr_var += float(var.sum())
    else:
        raise ValueError(f"unknown comparison mode {mode!r}")
    if mode not in ("nearest", "stochastic"):
        stats.differ += int(((diff > 0) & keep).sum())
    stats.beyond += int((bad & keep).sum())
    if keep.any():
        stats.max_abs = max(stats.max_abs, float(diff[keep].max()))
        stats.max_rel = max(stats.max_rel, float(rel[keep].max()))


def sign_ties(
    variant: Variant, grad: Tensor, old_state: Mapping[str, Any], new_ref_state: Mapping[str, Any]
) -> Tensor | None:
    """Elements whose update sign is a tie (Lion: c = lerp(m, g, 1 − β1); Tiger: the new
    momentum), to within ``TIE`` of the terms; None for the other algorithms."""
    if variant.algorithm not in ("lion", "tiger") or "exp_avg" not in old_state:
        return None
    g = grad.detach().double()
    m_old = old_state["exp_avg"].detach().double()
    if variant.algorithm == "lion":
        if variant.options.get("maximize", False):
            g = -g
        c = m_old + (1 - variant.options["betas"][0]) * (g - m_old)
    else:
        c = new_ref_state["exp_avg"].detach().double()
    return c.abs() <= TIE * (m_old.abs() + g.abs())


def clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# One variant


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_names(fn: Callable[[], None], device: torch.device) -> set[str] | None:
    """Run ``fn`` under torch's profiler and return the names of the CUDA kernels it launched
    (None where the profiler is not available: ``fn`` still runs once)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CUDA])
        profiler.start()
    except Exception:
        fn()
        return None
    try:
        fn()
        _synchronize(device)
    finally:
        try:
            profiler.stop()
            names: set[str] | None = {e.name for e in profiler.events()}
        except Exception:
            names = None
    return names


def compare_variant(
    variant: Variant, shape_set: ShapeSet, device: torch.device, *, check_kernels: bool
) -> dict[str, Any]:
    """Run one variant (warm-up, then ``variant.steps`` compared steps) and return its record."""
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    params = make_params(shape_set, variant.dtype, device)
    ref_dtype = reference_dtype(variant)
    with torch.no_grad():
        ref_params = [nn.Parameter(p.detach().to(ref_dtype, copy=True)) for p in params]
    kernel = build_optimizer(variant, params, shape_set, reference=False)
    ref = build_optimizer(variant, ref_params, shape_set, reference=True)

    def set_grads(grads: Sequence[Tensor]) -> None:
        for p, r, g in zip(params, ref_params, grads, strict=True):
            p.grad = g
            r.grad = g.to(ref_dtype)

    # warm-up: both take the same step (it creates the state and compiles the kernels)
    set_grads(make_grads(params, seed=1000))
    names = None
    if check_kernels:
        names = kernel_names(kernel.step, device)
    else:
        kernel.step()
    ref.step()
    _synchronize(device)
    warmup = time.perf_counter() - start
    kernel_seen = None if names is None else any(variant.algorithm in n.lower() for n in names)
    # the dtypes the reference keeps its state in (the kernel side's state is cast to them)
    ref_dtypes = [
        {k: v.dtype for k, v in ref.state[r].items() if isinstance(v, Tensor)} for r in ref_params
    ]

    # where the reference keeps a low-precision momentum in fp32 (AdaX's with stochastic
    # rounding), the kernel's update reads it rounded: up to 2^-9 of the step
    momentum_cast = any(
        isinstance(v, Tensor) and ref_dtypes[i].get(k, v.dtype) != v.dtype
        for i, p in enumerate(params)
        for k, v in kernel.state[p].items()
    )
    stats: dict[str, OutputStats] = {}

    def compare(name: str, got: Tensor, want: Tensor, param: bool, **kw: Any) -> None:
        mode = comparison_mode(got.dtype, want.dtype, param=param, stochastic=variant.stochastic)
        key = f"{name}|{got.dtype}|{mode}"
        if key not in stats:
            stats[key] = OutputStats(name, str(got.dtype).replace("torch.", ""), mode)
        if got.shape != want.shape:
            stats[key].beyond += max(got.numel(), 1)
            return
        accumulate(stats[key], got, want, **kw)

    for step in range(1, variant.steps + 1):
        with torch.no_grad():
            for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
                r.copy_(p)
                ref.state[r] = {
                    k: v.detach().to(ref_dtypes[i].get(k, v.dtype), copy=True)
                    if isinstance(v, Tensor)
                    else v
                    for k, v in kernel.state[p].items()
                }
        old = [p.detach().clone() for p in params]
        old_states = [clone_state(kernel.state[p]) for p in params]
        grads = make_grads(params, seed=step)
        if variant.nonfinite:  # a NaN in a matrix's gradient, an inf in a norm gain's
            matrix = next(i for i, s in enumerate(shape_set.shapes) if s[2] == "matrix")
            norm = next(i for i, s in enumerate(shape_set.shapes) if s[2] == "elementwise")
            bad = matrix if step % 2 else norm
            grads[bad].view(-1)[3] = float("nan") if step % 2 else float("inf")
        set_grads(grads)
        kernel.step()
        ref.step()
        for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
            exclude = sign_ties(variant, grads[i], old_states[i], ref.state[r])
            compare(
                "param",
                p,
                r,
                True,
                old=old[i],
                exclude=exclude,
                step_rounding=2.0**-7 if momentum_cast else 0.0,
            )
            ref_state = ref.state[r]
            for key, value in kernel.state[p].items():
                want = ref_state.get(key)
                if isinstance(value, Tensor) and isinstance(want, Tensor):
                    before = old_states[i].get(key)
                    compare(key, value, want, False, old=before if value.dim() else None)
                else:
                    s = stats.setdefault(key, OutputStats(key, type(value).__name__, "exact"))
                    s.numel += 1
                    s.beyond += int(value != want)
        del old, old_states, grads
    _synchronize(device)
    outputs = [s.record() for s in stats.values()]
    passed = all(o["passed"] for o in outputs) and kernel_seen is not False
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "kind": "variant",
        "variant": variant.key,
        "algorithm": variant.algorithm,
        "label": variant.label,
        "dtype": str(variant.dtype).replace("torch.", ""),
        "reference": str(ref_dtype).replace("torch.", ""),
        "steps": variant.steps,
        "passed": passed,
        "kernel_seen": kernel_seen,
        "warmup_seconds": warmup,
        "seconds": time.perf_counter() - start,
        "peak_gib": peak,
        "outputs": outputs,
        "error": None,
    }


# ---------------------------------------------------------------------------------------------
# The worker


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    chosen: Iterable[Variant],
    shape_set: ShapeSet,
    device: torch.device,
    *,
    seconds: float,
    emit: Callable[[dict[str, Any]], None],
    check_kernels: bool | None = None,
    min_seconds_left: float = 8.0,
) -> bool:
    """Compare each variant, emitting a "start" record before and a "variant" record after
    it, or a "skipped" one when less time is left of ``seconds`` than ``min_seconds_left``
    or 1.5 times the longest variant so far (so that the part ends by itself rather than
    being stopped in the middle of one). Returns whether every variant ran and passed."""
    deadline = time.monotonic() + seconds
    longest = 0.0
    if check_kernels is None:
        check_kernels = device.type == "cuda"
    emit(
        {
            "kind": "meta",
            "shapes": shape_set.name,
            "numel": shape_set.numel,
            "tensors": len(shape_set.shapes),
            "distinct": sorted({str(s) for _, s, _ in shape_set.shapes}),
        }
    )
    ok = True
    for variant in chosen:
        if time.monotonic() > deadline - max(min_seconds_left, 1.5 * longest):
            emit({"kind": "skipped", "variant": variant.key, "reason": "out of time"})
            ok = False
            continue
        emit({"kind": "start", "variant": variant.key, "label": variant.label})
        began = time.monotonic()
        try:
            record = compare_variant(variant, shape_set, device, check_kernels=check_kernels)
        except Exception as exc:  # reported, and the next variant runs
            record = {
                "kind": "variant",
                "variant": variant.key,
                "algorithm": variant.algorithm,
                "label": variant.label,
                "dtype": str(variant.dtype).replace("torch.", ""),
                "passed": False,
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "outputs": [],
            }
        emit(record)
        ok = ok and record["passed"]
        _free(device)
        longest = max(longest, time.monotonic() - began)
        status = "ok" if record["passed"] else f"FAILED {record.get('error') or ''}"
        print(
            f"  {variant.key:<24} {record.get('seconds', 0.0):6.1f} s  {status}",
            file=sys.stderr,
            flush=True,
        )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", required=True, help="JSON lines are appended here")
    parser.add_argument("--seconds", type=float, default=170.0, help="time box")
    parser.add_argument("--shapes", default="llama1b-distinct", choices=sorted(SHAPE_SETS))
    parser.add_argument("--only", default="", help="only variants whose key contains this")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chosen = [v for v in variants() if args.only in v.key]

    def emit(record: dict[str, Any]) -> None:
        with open(args.records, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    ok = run(chosen, SHAPE_SETS[args.shapes], device, seconds=args.seconds, emit=emit)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

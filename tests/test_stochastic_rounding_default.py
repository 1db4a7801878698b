"""Stochastic rounding of bf16/fp16 parameters, on by default in every optimizer (issue 15,
item 3: with round-to-nearest, Tiger's updates α·RMS(θ) ≈ 2e-5 fall below bf16's spacing and
only ~29 % of a 256×256 matrix ever moves).

Oracles: exact neighbours and probabilities written out by hand (the rounding helper), and an
fp32 run of the same optimizer from the same values (the trajectories). Statistical bounds are
six standard deviations of the rounding noise, derived in each test.
"""

import itertools
import math

import pytest
import torch
from torch import nn

import danlu
from danlu.core.precision import stochastic_round_

NAMES = sorted(danlu.REGISTRY)
SHAPE = (256, 256)
STEPS = 20


# -- the rounding helper ------------------------------------------------------------------------


def _check_unbiased(dtype, x, lo, hi, n=1 << 16):
    """SR of x (lo < x < hi, the two neighbours in ``dtype``) lands on lo or hi, on hi with
    probability f = (x − lo)/(hi − lo). The mean of n draws has standard deviation
    (hi − lo)·√(f(1 − f)/n); 6σ bounds a false failure at ~2e-9."""
    src = torch.full((n,), x, dtype=torch.float32)
    dst = torch.empty(n, dtype=dtype)
    stochastic_round_(dst, src)
    values = dst.double()
    assert set(values.unique().tolist()) <= {lo, hi}
    f = (x - lo) / (hi - lo)
    sigma = abs(hi - lo) * math.sqrt(f * (1 - f) / n)
    assert abs(values.mean().item() - x) < 6 * sigma


@pytest.mark.parametrize(
    ("dtype", "x", "lo", "hi"),
    [
        # bf16: 8 significant bits, spacing 2^-7 in [1, 2)
        (torch.bfloat16, 1 + 0.3 * 2**-7, 1.0, 1 + 2**-7),
        (torch.bfloat16, -(1 + 0.7 * 2**-7), -1.0, -(1 + 2**-7)),
        (torch.bfloat16, 3.1e-3, None, None),
        (torch.bfloat16, -7.77e-5, None, None),
        # fp16: 11 significant bits, spacing 2^-10 in [1, 2), 2^-24 for subnormals
        (torch.float16, 1 + 0.3 * 2**-10, 1.0, 1 + 2**-10),
        (torch.float16, -(1 + 0.8 * 2**-10), -1.0, -(1 + 2**-10)),
        (torch.float16, 5.7 * 2**-24, 5 * 2**-24, 6 * 2**-24),
        (torch.float16, -0.25 * 2**-24, 0.0, -(2**-24)),
        (torch.float16, (1023 + 0.5) * 2**-24, 1023 * 2**-24, 2**-14),  # subnormal → normal
        (torch.float16, 1000 + 0.2 * 2**-1, 1000.0, 1000.5),
    ],
)
def test_stochastic_round_is_unbiased_and_lands_on_neighbours(dtype, x, lo, hi):
    if lo is None:  # bf16 keeps fp32's top 16 bits: the neighbours by truncation
        bits = torch.tensor([x], dtype=torch.float32).view(torch.int32)
        lo = (bits & -65536).view(torch.float32).item()
        hi = ((bits & -65536) + 65536).view(torch.float32).item()
        x = torch.tensor(x, dtype=torch.float32).item()
    _check_unbiased(dtype, x, lo, hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_exact_values_specials_and_signs(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.125, float("inf"), float("-inf")])
    dst = torch.empty(exact.shape, dtype=dtype)
    stochastic_round_(dst, exact)
    assert torch.equal(dst.float(), exact)
    assert torch.equal(torch.signbit(dst), torch.signbit(exact))  # -0.0 keeps its sign
    nan = torch.empty(3, dtype=dtype)
    stochastic_round_(nan, torch.full((3,), float("nan")))
    assert torch.isnan(nan).all()


def test_fp16_stochastic_round_saturates_instead_of_overflowing():
    # beyond 65504 (fp16's largest finite value) round-to-nearest gives ±inf from 65520 on; a
    # finite value must stay finite: it saturates at ±65504 with any noise
    src = torch.tensor([65504.0, 65519.0, 65535.0, 1e6, 3e38]).repeat(2000)
    src = torch.cat([src, -src])
    dst = torch.empty(src.shape, dtype=torch.float16)
    stochastic_round_(dst, src)
    assert torch.isfinite(dst).all()
    assert torch.equal(dst.float().abs(), torch.full(src.shape, 65504.0))
    assert torch.equal(torch.signbit(dst), torch.signbit(src))


def test_stochastic_round_rejects_other_dtypes():
    with pytest.raises(ValueError, match="bf16 or fp16"):
        stochastic_round_(torch.empty(2), torch.empty(2))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        stochastic_round_(torch.empty(2, dtype=torch.float16), torch.empty(2, dtype=torch.float64))


# -- the optimizers -----------------------------------------------------------------------------


def _init(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(SHAPE, generator=gen) * 0.02).to(dtype)  # the issue's matrix
    direction = torch.randn(SHAPE, generator=gen) * 1e-3
    grads = [(direction + torch.randn(SHAPE, generator=gen) * 1e-4).to(dtype) for _ in range(STEPS)]
    return weight, grads


def _run(name, weight, grads, steps=STEPS, record=False, **kwargs):
    param = nn.Parameter(weight.clone())
    opt = danlu.REGISTRY[name].cls([param], **kwargs)
    trace = [param.detach().clone()]
    for g in grads[:steps]:
        param.grad = g.to(param.dtype)
        opt.step()
        if record:
            trace.append(param.detach().clone())
    return (param.detach(), trace) if record else param.detach()


def _spacing_towards(values, targets, dtype):
    """|next(values toward targets) − values| in ``dtype`` (float64 result)."""
    info = {torch.bfloat16: (8, -133), torch.float16: (11, -24)}[dtype]
    digits, min_exp = info
    v = values.double()
    mag = v.abs()
    moving_down = (targets.double().abs() < mag) & (mag > 0)
    e = torch.floor(torch.log2(mag.clamp_min(1e-300)))
    # just below a power of two the spacing is half the one above it
    at_power = (torch.exp2(e) == mag) & moving_down
    e = torch.where(at_power, e - 1, e)
    return torch.exp2(torch.clamp(e - (digits - 1), min=min_exp))


# AdamW's fp16 case used to fail: its moments were fp16 and (1 − β2)·g² = 1e-9 underflowed
# to 0; they are float32 for fp16 parameters now (tests/test_adamw_fp16_state.py).
@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, torch.bfloat16) for name in NAMES] + [(name, torch.float16) for name in NAMES],
)
def test_low_precision_params_train_by_default_and_track_fp32(name, dtype):
    weight, grads = _init(dtype)
    torch.manual_seed(0)
    rounded = _run(name, weight, grads)
    exact, trace = _run(name, weight.float(), [g.float() for g in grads], record=True)
    n = weight.numel()

    # 1. movement. An entry still at θ0 moves on step t with probability |Δ_t|/s (s: the
    # spacing at θ0 toward the move, Δ_t: the fp32 run's step), so it is unmoved after T
    # steps with probability q = Π(1 − min(1, |Δ_t|/s)); the moved fraction has mean 1 − q̄
    # and standard deviation √(Σq(1 − q))/n.
    spacing = _spacing_towards(weight, exact, dtype).flatten()
    stay = torch.ones(n, dtype=torch.float64)
    for before, after in itertools.pairwise(trace):
        step = (after - before).double().abs().flatten()
        stay *= 1 - torch.clamp(step / spacing, max=1)
    predicted = 1 - stay.mean().item()
    sigma = math.sqrt((stay * (1 - stay)).sum().item()) / n
    moved = (rounded != weight).double().mean().item()
    # ≥ 99 % wherever stochastic rounding can reach it; Tiger and AdaFactor's steps of
    # ~1e-3·RMS(θ) leave ~3 % (Tiger) and more (AdaFactor's first steps) unmoved by chance
    # (+1 % for the model: it takes the fp32 steps for the bf16 ones)
    assert moved >= min(0.99, predicted - 6 * sigma - 0.01), (moved, predicted)
    assert moved > 0.8

    # 2. the trajectory: θ_bf16 − θ_fp32 is a sum of T zero-mean rounding errors, each of
    # variance ≤ s²/4 per entry, so its mean over the entries (signed along the fp32 move)
    # has standard deviation ≤ √(Σ T·s²/4)/n. The state's own rounding (bf16 momentum) and
    # the slightly different θ the update reads add a small relative slack (2 %).
    direction = (exact - weight.float()).sign()
    drift_bf = ((rounded.double() - weight.double()) * direction).mean().item()
    drift_32 = ((exact.double() - weight.double()) * direction).mean().item()
    bound = 6 * math.sqrt((STEPS * spacing**2 / 4).sum().item()) / n
    assert abs(drift_bf - drift_32) <= bound + 0.02 * abs(drift_32), (drift_bf, drift_32, bound)


def test_the_issue_case_fails_with_round_to_nearest():
    # the same check with stochastic_rounding=False: Tiger's drift falls far short of fp32's
    weight, grads = _init(torch.bfloat16)
    nearest = _run("tiger", weight, grads, stochastic_rounding=False)
    exact = _run("tiger", weight.float(), [g.float() for g in grads])
    direction = (exact - weight.float()).sign()
    drift_bf = ((nearest.double() - weight.double()) * direction).mean().item()
    drift_32 = ((exact.double() - weight.double()) * direction).mean().item()
    assert drift_bf < 0.5 * drift_32
    assert (nearest != weight).double().mean().item() < 0.4  # the issue's ~29 %


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_are_reproducible(name):
    weight, grads = _init(torch.bfloat16)
    torch.manual_seed(1)
    first = _run(name, weight, grads, steps=3)
    torch.manual_seed(1)
    again = _run(name, weight, grads, steps=3)
    torch.manual_seed(2)
    other = _run(name, weight, grads, steps=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", NAMES)
def test_false_restores_round_to_nearest(name):
    # one step from the same values: the fp32 step rounded to nearest, except where the fp32
    # result lies so close to a midpoint between two bf16 values that the bf16 path's own
    # intermediate roundings can tip it (bf16 moments, √v̂ + ε and lr·update in bf16: a few
    # roundings of relative 2^-9 each): margin 1 % of the spacing + 2^-5·|Δ|
    weight, grads = _init(torch.bfloat16)
    torch.manual_seed(3)
    nearest = _run(name, weight, grads, steps=1, stochastic_rounding=False)
    torch.manual_seed(4)
    assert torch.equal(nearest, _run(name, weight, grads, steps=1, stochastic_rounding=False))
    exact = _run(name, weight.float(), [g.float() for g in grads], steps=1)
    lower = exact.bfloat16().double()
    upper = lower.clone()
    # the two bf16 neighbours of the fp32 result and their midpoint
    bits = exact.view(torch.int32)
    down = (bits & -65536).view(torch.float32).double()
    up = ((bits & -65536) + 65536).view(torch.float32).double()
    lower, upper = torch.minimum(down, up), torch.maximum(down, up)
    midpoint = (lower + upper) / 2
    step = (exact.double() - weight.double()).abs()
    margin = 0.01 * (upper - lower) + 2**-5 * step
    clear = (exact.double() - midpoint).abs() > margin
    assert clear.double().mean().item() > 0.2
    assert torch.equal(nearest.double()[clear], exact.bfloat16().double()[clear])


@pytest.mark.parametrize("name", NAMES)
def test_fp32_params_are_untouched_by_the_default(name):
    weight, grads = _init(torch.float32)
    state = torch.get_rng_state()
    default = _run(name, weight, grads, steps=3)
    assert torch.equal(torch.get_rng_state(), state)  # no noise drawn for fp32
    assert torch.equal(default, _run(name, weight, grads, steps=3, stochastic_rounding=False))
    assert torch.equal(default, _run(name, weight, grads, steps=3, stochastic_rounding=True))


@pytest.mark.parametrize("name", NAMES)
def test_bad_stochastic_rounding_is_refused(name):
    with pytest.raises(ValueError, match="stochastic_rounding"):
        danlu.REGISTRY[name].cls([nn.Parameter(torch.ones(2))], stochastic_rounding="yes")
    assert danlu.REGISTRY[name].defaults["stochastic_rounding"] is None


# -- every path ---------------------------------------------------------------------------------

# the keywords of each path an optimizer declares in its registration; "chunked" is the CPU
# default (the chunked loop, slices of 2^18 elements, where the optimizer has one)
PATH_CASES = [
    (name, path)
    for name in NAMES
    for path in ("chunked", "foreach", "single")
    if path in ("chunked", "single") or path in danlu.REGISTRY[name].paths
]


@pytest.mark.parametrize(("name", "path"), PATH_CASES, ids=[f"{n}-{p}" for n, p in PATH_CASES])
def test_every_path_rounds_stochastically(name, path):
    kwargs = {} if path == "chunked" else dict(danlu.REGISTRY[name].paths[path])
    # larger than one chunk, so that the chunked loop slices it
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(640, 512, generator=gen) * 0.02).bfloat16()
    direction = torch.randn(640, 512, generator=gen) * 1e-3
    grads = [direction.bfloat16()] * 3
    torch.manual_seed(0)
    rounded = _run(name, weight, grads, steps=3, **kwargs)
    nearest = _run(name, weight, grads, steps=3, stochastic_rounding=False, **kwargs)
    exact = _run(name, weight.float(), [g.float() for g in grads], steps=3, **kwargs)
    sign = (exact - weight.float()).sign()
    drift = ((rounded.double() - weight.double()) * sign).mean().item()
    drift_32 = ((exact.double() - weight.double()) * sign).mean().item()
    spacing = _spacing_towards(weight, exact, torch.bfloat16)
    bound = 6 * math.sqrt((3 * spacing**2 / 4).sum().item()) / weight.numel()
    assert abs(drift - drift_32) <= bound + 0.02 * abs(drift_32)
    assert not torch.equal(rounded, nearest)

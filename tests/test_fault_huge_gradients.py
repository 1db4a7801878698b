"""Fault injection: huge finite gradients (1e19, 1e30, the dtype's largest value, mixed with
ordinary entries or filling a whole tensor) for every registered optimizer and every path it
has. The square of such a gradient overflows; the optimizers must keep their parameters and
state finite and go on training, and where the first step has a closed form (AdamW, AdaX) it
must equal the float64 equations."""

from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import pytest
import torch
from optimizer_cases import CASES

import danlu
from danlu.registry import REGISTRY

FP32_MAX = torch.finfo(torch.float32).max
HUGE = [1e19, 2e19, 1e30, FP32_MAX]
LAYOUTS = ["entries", "tensor"]
SHAPES = [(8, 6), (6,)]


def _accepts(name: str, argument: str) -> bool:
    return argument in inspect.signature(REGISTRY[name].cls).parameters


def _paths(name: str) -> dict[str, dict]:
    """The eager paths an optimizer has on CPU: its default (the chunked loop where it has
    one), the single-tensor loop and foreach."""
    paths: dict[str, dict] = {"default": {}}
    if _accepts(name, "foreach"):
        single = {"foreach": False}
        if _accepts(name, "fused"):
            single["fused"] = False
        paths["single"] = single
        paths["foreach"] = {"foreach": True}
    return paths


CASES_EAGER = [(n, path) for n in sorted(REGISTRY) for path in _paths(n)]


def _huge_grad(shape, value: float, layout: str, dtype, gen) -> torch.Tensor:
    g = torch.randn(shape, generator=gen) * 0.1
    flat = g.view(-1)
    if layout == "entries":  # +huge and -huge next to ordinary entries
        flat[0] = value
        if flat.numel() > 2:
            flat[2] = -value
    else:  # the whole tensor huge, with both signs
        signs = torch.where(torch.arange(flat.numel()) % 3 == 0, -1.0, 1.0)
        flat.copy_(signs * value)
    return g.to(dtype)


def _ordinary_grads(params, gen):
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in params]


def _all_finite(opt, params) -> None:
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"param {i} not finite: {p}"
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), f"state {key!r} not finite: {value}"


def _run_fault(name: str, extra: dict, value: float, layout: str, dtype=torch.float32):
    """One step with the huge gradient, then three ordinary ones: no exception, everything
    finite after each, and the parameters move on every ordinary step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in SHAPES]
    opt = REGISTRY[name].cls(params, **{**CASES[name]["kwargs"], **extra})
    huge = _huge_grad(SHAPES[0], value, layout, dtype, gen)
    for p, g in zip(params, [huge, *_ordinary_grads(params[1:], gen)], strict=True):
        p.grad = g
    opt.step()
    _all_finite(opt, params)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, _ordinary_grads(params, gen), strict=True):
            p.grad = g
        opt.step()
        _all_finite(opt, params)
        for i, (p, b) in enumerate(zip(params, before, strict=True)):
            assert not torch.equal(p.detach(), b), f"param {i} did not move"
    return opt, params


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", HUGE, ids=["1e19", "2e19", "1e30", "fp32max"])
@pytest.mark.parametrize(("name", "path"), CASES_EAGER)
def test_huge_finite_gradient_keeps_training(name, path, value, layout):
    _run_fault(name, _paths(name)[path], value, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "path"), CASES_EAGER)
def test_low_precision_params_with_their_largest_gradient(name, path, dtype, layout):
    _run_fault(name, _paths(name)[path], torch.finfo(dtype).max, layout, dtype=dtype)


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if _accepts(n, "fused")])
def test_huge_finite_gradient_on_the_compiled_path(name):
    _run_fault(name, {"fused": True}, FP32_MAX, "entries")


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if _accepts(n, "fused")])
def test_chunked_slices_of_a_large_tensor(name, monkeypatch):
    """A tensor larger than one slice of the CPU chunked loop (the default path)."""
    for algo in ("adax", "lion", "tiger"):
        fast = importlib.import_module(f"danlu.algorithms.{algo}.fast")
        original = getattr(fast, f"{algo}_chunked")
        monkeypatch.setattr(
            fast, f"{algo}_chunked", lambda *a, _f=original, **k: _f(*a, **{**k, "chunk": 16})
        )
    _run_fault(name, {}, FP32_MAX, "entries")
    _run_fault(name, {}, 1e30, "tensor")


# -- first steps in closed form, from the equations in float64 ------------------------------


@pytest.mark.parametrize("path", ["single", "foreach"])
@pytest.mark.parametrize("value", HUGE, ids=["1e19", "2e19", "1e30", "fp32max"])
def test_adamw_first_step_is_lr_sign_g(path, value):
    """Adam's first step is m̂/(√v̂+ε) = g/(|g|+ε), i.e. lr·sign(g) for a huge g."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
    g = _huge_grad((8, 6), value, "entries", torch.float32, gen)
    lr, wd, eps = 1e-2, 0.1, 1e-8
    theta, grad = p.detach().double().numpy().copy(), g.double().numpy()
    opt = danlu.AdamW([p], lr=lr, weight_decay=wd, eps=eps, foreach=path == "foreach")
    p.grad = g
    opt.step()
    want = theta * (1 - lr * wd) - lr * grad / (np.abs(grad) + eps)
    np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["single", "foreach", "default"])
@pytest.mark.parametrize("value", HUGE, ids=["1e19", "2e19", "1e30", "fp32max"])
def test_adax_first_step_is_lr_times_one_minus_beta1_sign_g(path, value):
    """AdaX's first step: v̂_1 = g², m_1 = (1−β1)·g, so u = (1−β1)·g/(|g|+ε)."""
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
    g = _huge_grad((8, 6), value, "entries", torch.float32, gen)
    lr, beta1, eps = 1e-2, 0.9, 1e-4
    theta, grad = p.detach().double().numpy().copy(), g.double().numpy()
    extra = {"single": {"foreach": False, "fused": False}, "foreach": {"foreach": True}}
    opt = danlu.AdaX([p], lr=lr, betas=(beta1, 1e-4), eps=eps, **extra.get(path, {}))
    p.grad = g
    opt.step()
    want = theta - lr * (1 - beta1) * grad / (np.abs(grad) + eps)
    np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=1e-6, atol=1e-7)


def test_ordinary_entries_keep_their_ordinary_steps_after_a_huge_one():
    """Elementwise optimizers: an entry with ordinary gradients moves as if the huge entry
    next to it had never been there."""
    for cls, kwargs in ((danlu.AdamW, {"lr": 1e-2}), (danlu.AdaX, {"lr": 1e-2})):
        gen = torch.Generator().manual_seed(3)
        p0 = torch.randn(4, 4, generator=gen)
        grads = [torch.randn(4, 4, generator=gen) for _ in range(4)]
        runs = []
        for huge in (False, True):
            p = torch.nn.Parameter(p0.clone())
            opt = cls([p], **kwargs)
            for step, g in enumerate(grads):
                g = g.clone()
                if huge and step == 0:
                    g[0, 0] = FP32_MAX
                p.grad = g
                opt.step()
            runs.append(p.detach())
        assert torch.isfinite(runs[1]).all()
        assert torch.equal(runs[0].view(-1)[1:], runs[1].view(-1)[1:])


def test_square_bound_is_the_overflow_edge():
    from danlu.core.overflow import square_bound

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for count in (1, 7, 4096):
            b = torch.tensor(square_bound(dtype, count), dtype=torch.float64)
            finfo = torch.finfo(dtype)
            assert b * b * count <= finfo.max / 2 * (1 + 1e-12)
            assert b * b * count * 2.1 > finfo.max or b * b * 2.1 > torch.finfo(torch.float32).max


def test_finite_norm_repairs_an_overflowed_sum_of_squares():
    from danlu.core.overflow import finite_norm, finite_norms

    x = torch.full((100,), 1e30)
    assert torch.isinf(torch.linalg.vector_norm(x))
    assert finite_norm(x).item() == pytest.approx(1e31, rel=1e-6)
    assert finite_norms([x, torch.ones(4)])[0].item() == pytest.approx(1e31, rel=1e-6)
    y = torch.randn(50)
    assert torch.equal(finite_norm(y), torch.linalg.vector_norm(y))


# -- Triton kernels (interpreter on CPU) ------------------------------------------------------


def _triton():
    """The device the kernels run on: CUDA natively, else CPU under Triton's interpreter."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter must be enabled before triton is imported")
    pytest.importorskip("triton")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("value", [1e30, FP32_MAX])
def test_adax_triton_kernel_with_huge_gradients(value):
    device = _triton()
    from danlu.algorithms.adax.functional import _single_tensor_adax, adax_new_sample_weight
    from danlu.algorithms.adax.triton import adax_triton

    gen = torch.Generator().manual_seed(4)
    shapes = [(33, 70), (5,)]
    base = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    grads[0][0].view(-1)[[0, 5, 2000]] = torch.tensor([value, -value, value])
    base = [[t.to(device) for t in ts] for ts in base]
    grads = [[t.to(device) for t in ts] for ts in grads]
    runs = []
    for fn in (_single_tensor_adax, adax_triton):
        p, m, v = ([t.clone() for t in ts] for ts in base)
        v = [t.abs() for t in v]
        for step, gs in enumerate(grads, start=1):
            weight = adax_new_sample_weight(step, 1e-4)
            fn(p, gs, m, v, new_sample_weight=weight, lr=1e-2, beta1=0.9, eps=1e-4,
               eps_inside_sqrt=False, weight_decay=0.01, maximize=False)  # fmt: skip
            assert all(torch.isfinite(t).all() for t in (*p, *m, *v))
        runs.append([*p, *m, *v])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("value", [1e19, 1e30, FP32_MAX])
def test_adafactor_triton_kernel_with_huge_gradients(value, beta1):
    device = _triton()
    from danlu.algorithms.adafactor.functional import _single_tensor_adafactor, adafactor_beta2
    from danlu.algorithms.adafactor.triton import adafactor_triton

    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 9), (7,)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    grads[0][0][0, 0], grads[0][0][3, 4] = value, -value
    grads[0][1][2] = value
    p0 = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[g.to(device) for g in gs] for gs in grads]
    runs = []
    for fn in (_single_tensor_adafactor, adafactor_triton):
        p = [t.clone() for t in p0]
        rows = [torch.zeros(6, 1, device=device), None]
        cols = [torch.zeros(1, 9, device=device), None]
        fulls = [None, torch.zeros(7, device=device)]
        ms = [torch.zeros(s, device=device) for s in shapes] if beta1 else [None, None]
        for step, gs in enumerate(grads, start=1):
            fn(p, gs, rows, cols, fulls, ms, beta2_t=adafactor_beta2(step), step_size=1e-2,
               beta1=beta1, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
               multiply_by_parameter_scale=True, weight_decay=0.0, factored_dims="two_largest",
               min_dim_size_to_factor=4, momentum_mode="unit", maximize=False)  # fmt: skip
            state = [t for t in (*p, *rows, *cols, *fulls, *ms) if t is not None]
            assert all(torch.isfinite(t).all() for t in state)
        runs.append(state)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- DTensor (FSDP2 layout) on a one-rank gloo group ----------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [1e19, 1e30, FP32_MAX])
@pytest.mark.parametrize("name", ["adafactor", "amos", "adax", "adamw"])
def test_huge_finite_gradient_on_dtensor_params(mesh, name, value):
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(6)
    params = [
        torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, [Shard(0)]))
        for s in SHAPES
    ]
    opt = REGISTRY[name].cls(params, **CASES[name]["kwargs"])
    for step in range(4):
        before = [p.detach().full_tensor().clone() for p in params]
        for p in params:
            g = torch.randn(p.shape, generator=gen) * 0.1
            if step == 0:
                g.view(-1)[0], g.view(-1)[-1] = value, -value
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
        for p, b in zip(params, before, strict=True):
            full = p.detach().full_tensor()
            assert torch.isfinite(full).all()
            assert not torch.equal(full, b)
        for state in opt.state.values():
            for value_ in state.values():
                if isinstance(value_, torch.Tensor) and value_.is_floating_point():
                    local = getattr(value_, "full_tensor", lambda v=value_: v)()
                    assert torch.isfinite(local).all()


# -- Lion and Tiger: the momentum average β·m + (1−β)·g -----------------------------------
#
# Neither squares the gradient, but the average's intermediate g − m (torch.lerp's formula)
# overflows when m and g are huge with opposite signs: after +max then −max the momentum was
# ±inf, the next step inf − inf = NaN, and sign(NaN) froze (CPU) or poisoned (Triton) the
# parameter for good. A fp16 momentum overflowed from any gradient beyond 65504 in the Triton
# kernel. The gradient is read saturated at half the largest value of the momentum's dtype
# (docs/optimizers/lion.md, tiger.md), so every average stays within that range.

INF = float("inf")
LION_TIGER_VALUES = [1e19, 1e30, FP32_MAX, INF]
VALUE_IDS = ["1e19", "1e30", "fp32max", "inf"]
LT_PATHS = {
    "default": {},
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
}
LION_KW = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
TIGER_KW = {"lr": 2e-2, "beta": 0.9, "weight_decay": 0.1, "rms_floor": 1e-3}


def _momentum_bound(state_dtype: torch.dtype) -> float:
    """Half the largest finite value of the momentum's dtype (the math runs in fp32 at
    least, whose largest value is not smaller)."""
    return float(torch.finfo(state_dtype).max) / 2


def _alternating_grads(shapes, value: float, layout: str, gen, *, hold: int = 1):
    """Three rounds of ``hold`` steps with ±value, the sign flipping each round (so that an
    accumulation window of ``hold`` micro-steps does not cancel), then 3·``hold`` ordinary
    steps (float64)."""
    steps = []
    for step in range(3 * hold):
        sign = 1.0 if (step // hold) % 2 == 0 else -1.0
        grads = []
        for shape in shapes:
            g = (torch.randn(shape, generator=gen) * 0.1).double()
            flat = g.view(-1)
            if layout == "entries":
                flat[0] = sign * value
                if flat.numel() > 2:
                    flat[2] = -sign * value
            else:
                pattern = torch.where(torch.arange(flat.numel()) % 3 == 0, -1.0, 1.0).double()
                flat.copy_(sign * pattern * value)
            grads.append(g)
        steps.append(grads)
    for _ in range(3 * hold):
        steps.append([(torch.randn(s, generator=gen) * 0.1).double() for s in shapes])
    return steps


def _round(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """x rounded to nearest in ``dtype`` (the momentum's storage), back as float64."""
    return torch.from_numpy(x).to(dtype).double().numpy()


def _lion_oracle(thetas, steps, bound, state_dtype, *, lr, betas, weight_decay):
    """Lion, float64, on the gradient clipped to ±bound (Chen et al. 2023, Alg. 2)."""
    b1, b2 = betas
    thetas = [t.copy() for t in thetas]
    ms = [np.zeros_like(t) for t in thetas]
    for grads in steps:
        for i, g in enumerate(grads):
            g = np.clip(g.numpy(), -bound, bound)
            c = b1 * ms[i] + (1 - b1) * g
            thetas[i] = thetas[i] * (1 - lr * weight_decay) - lr * np.sign(c)
            ms[i] = _round(b2 * ms[i] + (1 - b2) * g, state_dtype)
    return thetas, ms


def _tiger_oracle(thetas, steps, bound, state_dtype, *, lr, beta, weight_decay, rms_floor, k=1):
    """Tiger, float64, on the gradient clipped to ±bound (bojone/tiger; the matrix kind
    for 2-D tensors, η = α·max(RMS(θ), floor), the elementwise kind for 1-D, η = α/2, no
    decay); with k micro-steps per update, m ← β·m + (1−β)/k·Σg over each window."""
    thetas = [t.copy() for t in thetas]
    ms = [np.zeros_like(t) for t in thetas]
    for t, grads in enumerate(steps):
        for i, g in enumerate(grads):
            g = np.clip(g.numpy(), -bound, bound)
            m = ms[i] * beta if t % k == 0 else ms[i]
            ms[i] = _round(m + (1 - beta) / k * g, state_dtype)
            if (t + 1) % k:
                continue
            theta = thetas[i]
            if theta.ndim >= 2:
                eta = lr * max(np.sqrt(np.mean(theta**2)), rms_floor)
                thetas[i] = theta - eta * (np.sign(ms[i]) + weight_decay * theta)
            else:
                thetas[i] = theta - 0.5 * lr * np.sign(ms[i])
    return thetas, ms


def _check_against_oracle(params, moms, want_params, want_moms, steps, bound, rtol):
    """Parameters to fp32 precision; momenta to their dtype's precision relative to the
    largest (clipped) gradient an entry saw, since β·m + (1−β)·g cancels."""
    for i, (p, w) in enumerate(zip(params, want_params, strict=True)):
        got = p.detach().double().numpy()
        assert np.isfinite(got).all(), f"param {i} not finite"
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=f"param {i}")
    for i, (m, w) in enumerate(zip(moms, want_moms, strict=True)):
        got = m.double().numpy()
        assert np.isfinite(got).all(), f"momentum {i} not finite"
        scale = np.max([np.abs(np.clip(s[i].numpy(), -bound, bound)) for s in steps], axis=0)
        assert np.all(np.abs(got - w) <= rtol * (np.abs(w) + scale) + 1e-12), f"momentum {i}"


def _lion_tiger_run(name, extra, steps, shapes, *, state_dtype=None, k=1, seed=7):
    gen = torch.Generator().manual_seed(seed)
    theta0 = [torch.randn(s, generator=gen) * 0.5 for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    if name == "lion":
        opt = danlu.Lion(params, **LION_KW, state_dtype=state_dtype, **extra)
    else:
        opt = danlu.Tiger(params, **TIGER_KW, grad_accum_steps=k, state_dtype=state_dtype, **extra)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
        _all_finite(opt, params)
    return theta0, params, [opt.state[p]["exp_avg"] for p in params]


def _oracle_for(name, theta0, steps, bound, state_dtype, k=1):
    thetas = [t.double().numpy() for t in theta0]
    if name == "lion":
        return _lion_oracle(thetas, steps, bound, state_dtype, **LION_KW)
    return _tiger_oracle(thetas, steps, bound, state_dtype, **TIGER_KW, k=k)


def _lion_tiger_values(values, ids):
    """(name, value) pairs: Lion reads ±inf saturated like a finite value; Tiger's non-finite
    policy takes ±inf instead (test_tiger_inf_gradients_after_huge_finite_ones)."""
    return [
        pytest.param(name, value, id=f"{name}-{vid}")
        for name in ("lion", "tiger")
        for value, vid in zip(values, ids, strict=True)
        if name == "lion" or value != INF
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", list(LT_PATHS))
@pytest.mark.parametrize(("name", "value"), _lion_tiger_values(LION_TIGER_VALUES, VALUE_IDS))
def test_lion_tiger_opposite_huge_gradients_match_the_saturated_equations(
    name, value, path, layout
):
    """+huge, −huge, +huge, then ordinary gradients: the float64 equations on the gradient
    clipped at ±max/2 (Lion: ±inf too)."""
    steps = _alternating_grads(SHAPES, value, layout, torch.Generator().manual_seed(8))
    theta0, params, moms = _lion_tiger_run(name, LT_PATHS[path], steps, SHAPES)
    bound = _momentum_bound(torch.float32)
    want_p, want_m = _oracle_for(name, theta0, steps, bound, torch.float32)
    _check_against_oracle(params, moms, want_p, want_m, steps, bound, rtol=1e-6)


@pytest.mark.parametrize("value", [1e30, FP32_MAX], ids=["1e30", "fp32max"])
@pytest.mark.parametrize("path", list(LT_PATHS))
def test_tiger_accumulating_huge_gradients_in_its_momentum(path, value):
    """grad_accum_steps=2: m ← β·m + (1−β)/2·g, twice per window, stays within ±max/2."""
    steps = _alternating_grads(SHAPES, value, "entries", torch.Generator().manual_seed(9), hold=2)
    theta0, params, moms = _lion_tiger_run("tiger", LT_PATHS[path], steps, SHAPES, k=2)
    bound = _momentum_bound(torch.float32)
    want_p, want_m = _oracle_for("tiger", theta0, steps, bound, torch.float32, k=2)
    _check_against_oracle(params, moms, want_p, want_m, steps, bound, rtol=1e-6)


@pytest.mark.parametrize("nonfinite", ["shrink", "skip"])
@pytest.mark.parametrize("path", list(LT_PATHS))
def test_tiger_inf_gradients_after_huge_finite_ones(path, nonfinite):
    """±inf goes to Tiger's non-finite policy, huge finite values to the saturated read: the
    mix of both, with flipping signs, keeps everything finite and the training going."""
    gen = torch.Generator().manual_seed(10)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = danlu.Tiger(params, **TIGER_KW, nonfinite=nonfinite, **LT_PATHS[path])
    for value in (FP32_MAX, -INF, -FP32_MAX, INF, FP32_MAX):
        for p in params:
            g = torch.randn(p.shape, generator=gen) * 0.1
            g.view(-1)[0] = value
            p.grad = g
        opt.step()
        _all_finite(opt, params)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, _ordinary_grads(params, gen), strict=True):
            p.grad = g
        opt.step()
        _all_finite(opt, params)
        assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", list(LT_PATHS))
@pytest.mark.parametrize(
    ("name", "value"),
    _lion_tiger_values([1e5, 1e30, FP32_MAX, INF], ["1e5", "1e30", "fp32max", "inf"]),
)
def test_low_precision_momentum_reads_the_gradient_saturated_at_its_half_range(
    name, value, path, state_dtype
):
    """fp32 parameters, bf16 or fp16 momentum (state_dtype): the gradient is clipped at half
    the momentum dtype's largest value (32752 for fp16), so the stored momentum never
    overflows nor saturates: the equations in float64 with the momentum rounded to its dtype."""
    steps = _alternating_grads(SHAPES, value, "entries", torch.Generator().manual_seed(11))
    theta0, params, moms = _lion_tiger_run(
        name, LT_PATHS[path], steps, SHAPES, state_dtype=state_dtype
    )
    assert all(m.dtype == state_dtype for m in moms)
    bound = _momentum_bound(state_dtype)
    want_p, want_m = _oracle_for(name, theta0, steps, bound, state_dtype)
    rtol = 2.0**-7 if state_dtype == torch.bfloat16 else 2.0**-10
    _check_against_oracle(params, moms, want_p, want_m, steps, bound, rtol=rtol)


@pytest.mark.parametrize("stochastic_rounding", [None, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", list(LT_PATHS))
@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_low_precision_params_with_opposite_maxima(name, path, dtype, stochastic_rounding):
    """bf16/fp16 parameters and momentum, gradients flipping between ±the dtype's maximum:
    with the math in the tensors' own dtype (stochastic_rounding=False) or on fp32 copies."""
    top = float(torch.finfo(dtype).max)
    steps = _alternating_grads(SHAPES, top, "entries", torch.Generator().manual_seed(12))
    gen = torch.Generator().manual_seed(13)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in SHAPES]
    kwargs = {"stochastic_rounding": stochastic_rounding, **LT_PATHS[path]}
    cls, hyper = (danlu.Lion, LION_KW) if name == "lion" else (danlu.Tiger, TIGER_KW)
    opt = cls(params, **hyper, **kwargs)
    for i, grads in enumerate(steps):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(dtype)
        opt.step()
        _all_finite(opt, params)
        assert all(opt.state[p]["exp_avg"].dtype == dtype for p in params)
        if i >= 3:  # ordinary steps: every parameter still moves
            assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_lion_tiger_huge_gradients_on_the_compiled_path(name):
    steps = _alternating_grads(SHAPES, FP32_MAX, "entries", torch.Generator().manual_seed(14))
    theta0, params, moms = _lion_tiger_run(name, {"fused": True}, steps, SHAPES)
    bound = _momentum_bound(torch.float32)
    want_p, want_m = _oracle_for(name, theta0, steps, bound, torch.float32)
    _check_against_oracle(params, moms, want_p, want_m, steps, bound, rtol=1e-6)


@pytest.mark.parametrize("state_dtype", [None, torch.float16])
@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_lion_tiger_chunked_slices_with_opposite_huge_gradients(name, state_dtype, monkeypatch):
    """Tensors larger than one slice of the CPU chunked loop, with huge entries in several
    slices."""
    for algo in ("lion", "tiger"):
        fast = importlib.import_module(f"danlu.algorithms.{algo}.fast")
        original = getattr(fast, f"{algo}_chunked")
        monkeypatch.setattr(
            fast, f"{algo}_chunked", lambda *a, _f=original, **k: _f(*a, **{**k, "chunk": 16})
        )
    steps = _alternating_grads(SHAPES, FP32_MAX, "tensor", torch.Generator().manual_seed(15))
    theta0, params, moms = _lion_tiger_run(name, {}, steps, SHAPES, state_dtype=state_dtype)
    m_dtype = state_dtype or torch.float32
    bound = _momentum_bound(m_dtype)
    want_p, want_m = _oracle_for(name, theta0, steps, bound, m_dtype)
    rtol = 1e-6 if state_dtype is None else 2.0**-10
    _check_against_oracle(params, moms, want_p, want_m, steps, bound, rtol=rtol)


def test_ordinary_lion_tiger_steps_are_unchanged_by_the_bound():
    """Gradients within the bound are read bit for bit: an ordinary entry next to a huge one
    moves exactly as without it (Lion and elementwise Tiger act entry by entry)."""
    for make in (
        lambda p: danlu.Lion([p], lr=1e-2),
        lambda p: danlu.Tiger([{"params": [p], "kind": "elementwise"}], lr=1e-2),
    ):
        gen = torch.Generator().manual_seed(16)
        p0 = torch.randn(4, 4, generator=gen)
        grads = [torch.randn(4, 4, generator=gen) for _ in range(5)]
        runs = []
        for huge in (False, True):
            p = torch.nn.Parameter(p0.clone())
            opt = make(p)
            for step, g in enumerate(grads):
                g = g.clone()
                if huge and step < 3:
                    g[0, 0] = FP32_MAX if step % 2 == 0 else -FP32_MAX
                p.grad = g
                opt.step()
            runs.append((p.detach(), opt.state[p]["exp_avg"]))
        assert torch.isfinite(runs[1][0]).all() and torch.isfinite(runs[1][1]).all()
        for a, b in zip(runs[0], runs[1], strict=True):
            assert torch.equal(a.view(-1)[1:], b.view(-1)[1:])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [1e5, 1e30, FP32_MAX, INF], ids=["1e5", "1e30", "fp32max", "inf"])
def test_lion_triton_kernel_with_opposite_huge_gradients(value, state_dtype):
    _triton()
    from danlu.algorithms.lion.triton import lion_triton

    shapes = [(33, 70), (5,)]
    steps = _alternating_grads(shapes, value, "entries", torch.Generator().manual_seed(17))
    for grads in steps[:3]:  # huge entries in a second block of the first tensor too
        grads[0].view(-1)[2000] = grads[0].view(-1)[0]
    gen = torch.Generator().manual_seed(18)
    theta0 = [torch.randn(s, generator=gen) for s in shapes]
    p = [t.clone() for t in theta0]
    m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    b1, b2 = LION_KW["betas"]
    for grads in steps:
        lion_triton(p, [g.float() for g in grads], m, lr=LION_KW["lr"], beta1=b1, beta2=b2,
                    weight_decay=LION_KW["weight_decay"], maximize=False)  # fmt: skip
    bound = _momentum_bound(state_dtype)
    want_p, want_m = _oracle_for("lion", theta0, steps, bound, state_dtype)
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[state_dtype]
    _check_against_oracle(p, m, want_p, want_m, steps, bound, rtol=rtol)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [1e5, 1e30, FP32_MAX], ids=["1e5", "1e30", "fp32max"])
def test_tiger_triton_kernel_with_opposite_huge_gradients(value, state_dtype, k):
    _triton()
    from danlu.algorithms.tiger.triton import tiger_triton

    shapes = [(33, 70), (5,)]
    steps = _alternating_grads(shapes, value, "entries", torch.Generator().manual_seed(19), hold=k)
    gen = torch.Generator().manual_seed(20)
    theta0 = [torch.randn(s, generator=gen) for s in shapes]
    p = [t.clone() for t in theta0]
    m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    for t, grads in enumerate(steps):
        settings = {
            "lr": TIGER_KW["lr"], "beta": TIGER_KW["beta"], "rms_floor": TIGER_KW["rms_floor"],
            "grad_accum_steps": k, "first_micro_step": t % k == 0,
            "last_micro_step": (t + 1) % k == 0, "maximize": False,
        }  # fmt: skip
        tiger_triton(p[:1], [grads[0].float()], m[:1], kind="matrix",
                     weight_decay=TIGER_KW["weight_decay"], **settings)  # fmt: skip
        tiger_triton(p[1:], [grads[1].float()], m[1:], kind="elementwise",
                     weight_decay=0.0, **settings)  # fmt: skip
    bound = _momentum_bound(state_dtype)
    want_p, want_m = _oracle_for("tiger", theta0, steps, bound, state_dtype, k=k)
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[state_dtype]
    _check_against_oracle(p, m, want_p, want_m, steps, bound, rtol=rtol)


@pytest.mark.parametrize("value", [1e19, FP32_MAX])
@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_opposite_huge_gradients_on_dtensor_params(mesh, name, value):
    from torch.distributed.tensor import Shard, distribute_tensor

    steps = _alternating_grads(SHAPES, value, "entries", torch.Generator().manual_seed(21))
    gen = torch.Generator().manual_seed(22)
    theta0 = [torch.randn(s, generator=gen) * 0.5 for s in SHAPES]
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in theta0]
    opt = danlu.Lion(params, **LION_KW) if name == "lion" else danlu.Tiger(params, **TIGER_KW)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = distribute_tensor(g.float(), mesh, [Shard(0)])
        opt.step()
    got_p = [p.detach().full_tensor() for p in params]
    got_m = [opt.state[p]["exp_avg"].full_tensor() for p in params]
    bound = _momentum_bound(torch.float32)
    want_p, want_m = _oracle_for(name, theta0, steps, bound, torch.float32)
    _check_against_oracle(got_p, got_m, want_p, want_m, steps, bound, rtol=1e-6)

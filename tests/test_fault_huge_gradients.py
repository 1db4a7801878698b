"""Fault injection: huge finite gradients (1e19, 1e30, the dtype's largest value, mixed with
ordinary entries or filling a whole tensor) for every registered optimizer and every path it
has. The square of such a gradient overflows; the optimizers must keep their parameters and
state finite and go on training, and where the first step has a closed form (AdamW, AdaX) it
must equal the float64 equations."""

from __future__ import annotations

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
    from danlu.kernels import chunked

    for fn in ("adax_chunked", "lion_chunked", "tiger_chunked"):
        original = getattr(chunked, fn)
        monkeypatch.setattr(chunked, fn, lambda *a, _f=original, **k: _f(*a, **{**k, "chunk": 16}))
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
    from danlu.functional.overflow import square_bound

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for count in (1, 7, 4096):
            b = torch.tensor(square_bound(dtype, count), dtype=torch.float64)
            finfo = torch.finfo(dtype)
            assert b * b * count <= finfo.max / 2 * (1 + 1e-12)
            assert b * b * count * 2.1 > finfo.max or b * b * 2.1 > torch.finfo(torch.float32).max


def test_finite_norm_repairs_an_overflowed_sum_of_squares():
    from danlu.functional.overflow import finite_norm, finite_norms

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
    from danlu.functional.adax import _single_tensor_adax, adax_new_sample_weight
    from danlu.kernels.triton_adax import adax_triton

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
    from danlu.functional.adafactor import _single_tensor_adafactor, adafactor_beta2
    from danlu.kernels.triton_adafactor import adafactor_triton

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

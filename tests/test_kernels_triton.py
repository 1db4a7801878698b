"""Triton kernels against the functional core. On a CUDA machine they run natively; without
one, under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which checks the kernel
logic (indexing, masks, branches, arithmetic) but not GPU speed."""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # set before the kernels are decorated, and kept: Triton reads it again at launch
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import importlib  # noqa: E402

import danlu  # noqa: E402
from danlu.functional.lion import _single_tensor_lion  # noqa: E402
from danlu.functional.tiger import _single_tensor_tiger  # noqa: E402
from danlu.kernels.triton_lion import lion_triton  # noqa: E402
from danlu.kernels.triton_tiger import tiger_triton  # noqa: E402

# the modules (danlu.functional.tiger as an attribute is the function of the same name)
functional_lion = importlib.import_module("danlu.functional.lion")
functional_tiger = importlib.import_module("danlu.functional.tiger")

DEVICE = "cuda" if ON_GPU else "cpu"
# empty, scalar, sizes that are not multiples of the 1024-element block, several tensors
SHAPES = [(0,), (), (5,), (1500,), (33, 70), (2, 1025)]
TOL = {
    torch.float64: {"rtol": 1e-13, "atol": 1e-15},
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
}


def make(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).to(DEVICE) for s in shapes]
    exp_avgs = [(torch.randn(s, generator=gen, dtype=dtype) * 0.1).to(DEVICE) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype).to(DEVICE) for s in shapes]
             for _ in range(4)]
    return params, exp_avgs, grads


def clone(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize,wd", [(False, 0.0), (True, 0.3)])
def test_lion_kernel(dtype, maximize, wd):
    params, exp_avgs, grads = make(SHAPES, dtype, 0)
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": wd, "maximize": maximize}
    for g in grads:
        _single_tensor_lion(p1, g, m1, **kw)
        lion_triton(p2, g, m2, **kw)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_lion_kernel_bf16_rounds_once():
    # The kernel's contract for bf16: the fp32 math on the upcast values, rounded once to bf16.
    params, exp_avgs, grads = make(SHAPES, torch.bfloat16, 1)
    ref_p = [p.float() for p in params]
    ref_m = [m.float() for m in exp_avgs]
    p2, m2 = clone(params), clone(exp_avgs)
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False}
    _single_tensor_lion(ref_p, [g.float() for g in grads[0]], ref_m, **kw)
    lion_triton(p2, grads[0], m2, **kw)
    for m, g, a, b in zip(exp_avgs, grads[0], ref_p, p2, strict=True):
        # bf16's coarse grid makes exact ties c = 0.9·m + 0.1·g = 0 common; their sign is
        # decided by rounding (FMA or not), so they are left out of the comparison
        c = 0.9 * m.double() + 0.1 * g.double()
        tie = c.abs() <= 1e-6 * (m.double().abs() + g.double().abs())
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float()[~tie], a.bfloat16().float()[~tie], rtol=2**-7,
                                   atol=1e-6)
    for a, b in zip(ref_m, m2, strict=True):
        torch.testing.assert_close(b.float(), a.bfloat16().float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("kind", ["matrix", "elementwise", "embedding"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiger_kernel(kind, k, dtype):
    shapes = [s for s in SHAPES if kind != "embedding" or len(s) > 0]
    params, exp_avgs, grads = make(shapes, dtype, 2)
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    for t, g in enumerate(grads):
        kw = {"lr": 1e-2, "beta": 0.9, "weight_decay": 0.1, "kind": kind, "rms_floor": 1e-3,
              "grad_accum_steps": k, "first_micro_step": t % k == 0,
              "last_micro_step": (t + 1) % k == 0, "maximize": t == 2}
        _single_tensor_tiger(p1, g, m1, **kw)
        tiger_triton(p2, g, m2, **kw)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.fixture
def force_triton(monkeypatch):
    """Route the optimizers through the Triton kernels even on CPU (interpreter)."""
    monkeypatch.setattr(functional_tiger, "select_path", lambda *a: "triton")
    monkeypatch.setattr(functional_lion, "select_path", lambda *a: "triton")


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("mode", ["shrink", "skip"])
def test_tiger_optimizer_on_triton_path(force_triton, scope, mode):
    nan = float("nan")
    shapes = [(4, 3), (5,), (6, 2)]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(4)]
    grads[1][0][0, 0] = nan  # a NaN in the first tensor on micro-step 2
    grads[2][1][3] = float("inf")

    def build(fused):
        params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
        groups = [{"params": params[:2], "kind": "matrix", "center": 0.5},
                  {"params": params[2:], "kind": "embedding"}]
        opt = danlu.Tiger(groups, lr=1e-2, grad_accum_steps=2, nonfinite=mode,
                          nonfinite_scope=scope, fused=fused)
        return params, opt

    ref_params, ref_opt = build(False)
    with pytest.MonkeyPatch.context() as undo:  # the reference runs on the default path
        undo.setattr(functional_tiger, "select_path", lambda *a: "single")
        _run(ref_opt, ref_params, [[g.to(DEVICE) for g in gs] for gs in grads])
    params, opt = build(True)
    _run(opt, params, [[g.to(DEVICE) for g in gs] for gs in grads])
    for a, b in zip(ref_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ref_opt.state[a]["exp_avg"], opt.state[b]["exp_avg"],
                                   rtol=1e-13, atol=1e-15)


def test_lion_optimizer_on_triton_path(force_triton):
    model = torch.nn.Linear(7, 5).double().to(DEVICE)
    opt = danlu.Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 7, dtype=torch.float64, device=DEVICE)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p0, g, p in zip(before, grads, model.parameters(), strict=True):
        # first step: m = 0 → c = 0.1·g, θ ← θ(1 − ηλ) − η·sign(g)
        torch.testing.assert_close(p.detach(), p0 * (1 - 1e-3) - 1e-2 * torch.sign(g))


@pytest.mark.gpu
def test_default_path_on_cuda_is_triton():
    from danlu.functional._utils import select_path

    t = torch.ones(3, device="cuda")
    assert select_path(None, None, [t]) == "triton"

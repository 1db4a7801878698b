"""Triton kernels against the functional core. On a CUDA machine they run natively; without
one, under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which checks the kernel
logic (indexing, masks, branches, arithmetic) but not GPU speed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # set before the kernels are decorated, and kept: Triton reads it again at launch (see
    # also conftest.py: it must precede the first import of triton)
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import importlib  # noqa: E402

import danlu  # noqa: E402
from danlu.algorithms.adafactor.functional import (  # noqa: E402
    _single_tensor_adafactor,
    adafactor_factored_axes,
)
from danlu.algorithms.adafactor.triton import adafactor_triton  # noqa: E402
from danlu.algorithms.adax.functional import _single_tensor_adax, adax_new_sample_weight  # noqa: E402
from danlu.algorithms.adax.triton import adax_triton  # noqa: E402
from danlu.algorithms.lion.functional import _single_tensor_lion  # noqa: E402
from danlu.algorithms.lion.triton import lion_triton  # noqa: E402
from danlu.algorithms.tiger.functional import _single_tensor_tiger  # noqa: E402
from danlu.algorithms.tiger.triton import tiger_triton  # noqa: E402
from danlu.core.precision import upcast_step  # noqa: E402

# the modules (danlu.algorithms.tiger.functional as an attribute is the function of the same name)
functional_lion = importlib.import_module("danlu.algorithms.lion.functional")
functional_tiger = importlib.import_module("danlu.algorithms.tiger.functional")
functional_adax = importlib.import_module("danlu.algorithms.adax.functional")
functional_adafactor = importlib.import_module("danlu.algorithms.adafactor.functional")

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
    grads = [
        [torch.randn(s, generator=gen, dtype=dtype).to(DEVICE) for s in shapes] for _ in range(4)
    ]
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
        torch.testing.assert_close(
            b.float()[~tie], a.bfloat16().float()[~tie], rtol=2**-7, atol=1e-6
        )
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
        kw = {
            "lr": 1e-2,
            "beta": 0.9,
            "weight_decay": 0.1,
            "kind": kind,
            "rms_floor": 1e-3,
            "grad_accum_steps": k,
            "first_micro_step": t % k == 0,
            "last_micro_step": (t + 1) % k == 0,
            "maximize": t == 2,
        }
        _single_tensor_tiger(p1, g, m1, **kw)
        tiger_triton(p2, g, m2, **kw)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.fixture
def force_triton(monkeypatch):
    """Route the optimizers through the Triton kernels even on CPU (interpreter)."""
    for module in (functional_tiger, functional_lion, functional_adax, functional_adafactor):
        monkeypatch.setattr(module, "select_path", lambda *a: "triton")


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
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    grads[1][0][0, 0] = nan  # a NaN in the first tensor on micro-step 2
    grads[2][1][3] = float("inf")

    def build(fused):
        params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in start]
        groups = [
            {"params": params[:2], "kind": "matrix", "center": 0.5},
            {"params": params[2:], "kind": "embedding"},
        ]
        opt = danlu.Tiger(
            groups, lr=1e-2, grad_accum_steps=2, nonfinite=mode, nonfinite_scope=scope, fused=fused
        )
        return params, opt

    ref_params, ref_opt = build(False)
    with pytest.MonkeyPatch.context() as undo:  # the reference runs on the default path
        undo.setattr(functional_tiger, "select_path", lambda *a: "single")
        _run(ref_opt, ref_params, [[g.to(DEVICE) for g in gs] for gs in grads])
    params, opt = build(True)
    _run(opt, params, [[g.to(DEVICE) for g in gs] for gs in grads])
    for a, b in zip(ref_params, params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(
            ref_opt.state[a]["exp_avg"], opt.state[b]["exp_avg"], rtol=1e-13, atol=1e-15
        )


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


def test_kernels_compile_for_a_gpu_with_vector_loads():
    # The interpreter checks the kernels' logic; this checks that Triton's real compiler
    # accepts them (types, compile-time branches, loops) for an sm_90 target, and that full
    # blocks of aligned tensors use 128-bit loads. No GPU needed: PTX and ptxas only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("triton_compile_check.py")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {
        "_lion_kernel",
        "_tiger_kernel",
        "_adax_kernel",
        "_adafactor_reduce_kernel",
        "_adafactor_update_kernel",
        "_segment_sum_kernel",
    }
    for row in rows:
        if row["kernel"] != "_segment_sum_kernel":
            assert row["v4_loads"] > 0, row


@pytest.mark.gpu
def test_default_path_on_cuda_is_triton():
    from danlu.core.tensors import select_path

    t = torch.ones(3, device="cuda")
    assert select_path(None, None, [t]) == "triton"


# ---------------------------------------------------------------------------------------------
# AdaX


def _adax_case(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params, exp_avgs, grads = make(shapes, dtype, seed)
    sd = torch.promote_types(dtype, torch.float32)
    exp_avg_sqs = [torch.rand(s, generator=gen, dtype=sd).to(DEVICE) for s in shapes]
    return params, exp_avgs, exp_avg_sqs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "eps_inside_sqrt,maximize,wd,tensor_lr",
    [(False, False, 0.0, False), (True, True, 0.1, True)],
)
def test_adax_kernel(dtype, eps_inside_sqrt, maximize, wd, tensor_lr):
    params, exp_avgs, exp_avg_sqs, grads = _adax_case(SHAPES, dtype, 4)
    ref = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    out = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    lr = torch.tensor(1e-2, dtype=dtype, device=DEVICE) if tensor_lr else 1e-2
    for t, g in enumerate(grads, start=1):
        kw = {
            "new_sample_weight": adax_new_sample_weight(t, 1e-4),
            "lr": lr,
            "beta1": 0.9,
            "eps": 1e-6,
            "eps_inside_sqrt": eps_inside_sqrt,
            "weight_decay": wd,
            "maximize": maximize,
        }
        _single_tensor_adax(*ref[:1], g, *ref[1:], **kw)
        adax_triton(*out[:1], g, *out[1:], **kw)
    for a, b in zip([t for ts in ref for t in ts], [t for ts in out for t in ts], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_adax_kernel_bf16_rounds_once():
    # bf16 params and momentum, fp32 v̂: the kernel computes in fp32, rounds m to bf16 (the
    # update reads the rounded m, as the eager path does) and θ once. The reference is the
    # same sequence of roundings written out in float64.
    params, exp_avgs, exp_avg_sqs, grads = _adax_case(SHAPES, torch.bfloat16, 5)
    p2, m2, v2 = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    w, lr, wd, eps = 0.25, 1e-2, 0.1, 1e-6
    adax_triton(
        p2,
        grads[0],
        m2,
        v2,
        new_sample_weight=w,
        lr=lr,
        beta1=0.9,
        eps=eps,
        eps_inside_sqrt=False,
        weight_decay=wd,
        maximize=False,
    )
    for p, m, v, g, pk, mk, vk in zip(
        params, exp_avgs, exp_avg_sqs, grads[0], p2, m2, v2, strict=True
    ):
        g64 = g.double()
        m_new = (0.9 * m.double() + 0.1 * g64).bfloat16()
        v_new = (1 - w) * v.double() + w * g64 * g64
        p_new = p.double() * (1 - lr * wd) - lr * m_new.double() / (v_new.sqrt() + eps)
        assert pk.dtype == mk.dtype == torch.bfloat16 and vk.dtype == torch.float32
        torch.testing.assert_close(mk.double(), m_new.double(), rtol=2**-7, atol=1e-30)
        torch.testing.assert_close(vk.double(), v_new, rtol=1e-6, atol=1e-30)
        torch.testing.assert_close(pk.double(), p_new.bfloat16().double(), rtol=2**-7, atol=0.0)


# ---------------------------------------------------------------------------------------------
# AdaFactor

# empty, scalar, vectors, and factored layouts seen as (P, n_a, Q, n_b, S): a matrix
# (P = Q = S = 1), (40, 30, 2) (S > 1), (6, 3, 9) (Q > 1), (3, 5, 7, 4) (P, S > 1)
AF_SHAPES = [(0,), (), (5,), (1500,), (33, 70), (2, 1025), (40, 30, 2), (6, 3, 9), (3, 5, 7, 4)]


def _adafactor_case(shapes, dtype, seed, *, factored_dims, beta1):
    gen = torch.Generator().manual_seed(seed)
    sd = torch.promote_types(dtype, torch.float32)

    def rand(shape, dt=sd):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1).to(dt).to(DEVICE)

    params = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes
    ]
    rows, cols, fulls, momenta = [], [], [], []
    for s in shapes:
        axes = adafactor_factored_axes(s, factored_dims=factored_dims, min_dim_size_to_factor=2)
        if axes is None:
            rows.append(None), cols.append(None), fulls.append(rand(s))
        else:
            row, col = list(s), list(s)
            row[axes[0]], col[axes[1]] = 1, 1
            rows.append(rand(row)), cols.append(rand(col)), fulls.append(None)
        momenta.append(rand(s, dtype) - 0.6 if beta1 > 0 else None)
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]
        for _ in range(3)
    ]
    return [params, rows, cols, fulls, momenta], grads


def _clone_state(lists):
    return [[None if t is None else t.clone() for t in lst] for lst in lists]


AF_CONFIGS = [
    # dtype, factored_dims, beta1, momentum_mode, clip_threshold, parameter scale, weight decay
    (torch.float32, "two_largest", 0.0, "unit", 1.0, True, 0.0),
    (torch.float64, "two_largest", 0.9, "unit", 0.5, False, 0.1),
    (torch.float32, "last_two", 0.9, "scaled", None, True, 0.1),
    (torch.float64, "last_two", 0.0, "unit", None, False, 0.0),
]


@pytest.mark.parametrize("dtype,factored_dims,beta1,mode,clip,scale,wd", AF_CONFIGS)
def test_adafactor_kernel(dtype, factored_dims, beta1, mode, clip, scale, wd):
    state, grads = _adafactor_case(AF_SHAPES, dtype, 6, factored_dims=factored_dims, beta1=beta1)
    ref, out = _clone_state(state), _clone_state(state)
    for t, g in enumerate(grads, start=1):
        step_size = torch.tensor(1e-2, dtype=dtype) if t == 2 else 1e-2
        kw = {
            "beta2_t": 1 - t**-0.8,
            "step_size": step_size,
            "beta1": beta1,
            "eps1": 1e-30,
            "eps2": 1e-3,
            "clip_threshold": clip,
            "multiply_by_parameter_scale": scale,
            "weight_decay": wd,
            "factored_dims": factored_dims,
            "min_dim_size_to_factor": 2,
            "momentum_mode": mode,
            "maximize": t == 3,
        }
        _single_tensor_adafactor(ref[0], g, *ref[1:], **kw)
        adafactor_triton(out[0], g, *out[1:], **kw)
    # the statistics are means of g² taken as ‖g‖²/n here: a few ulp apart, amplified a
    # little by the momentum's cancellations
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for a_list, b_list in zip(ref, out, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)


def test_adafactor_kernel_bf16_params():
    # bf16 params and momentum, fp32 statistics. The reference is the single-tensor core on
    # fp32 copies of the params (momentum and statistics as they are): the kernel's θ is that
    # fp32 result rounded once to bf16, its momentum the same bf16 values
    state, grads = _adafactor_case(
        AF_SHAPES, torch.bfloat16, 7, factored_dims="two_largest", beta1=0.9
    )
    hi = _clone_state(state)
    hi[0] = [p.float() for p in hi[0]]
    out = _clone_state(state)
    kw = {
        "beta2_t": 0.5,
        "step_size": 1e-2,
        "beta1": 0.9,
        "eps1": 1e-30,
        "eps2": 1e-3,
        "clip_threshold": 1.0,
        "multiply_by_parameter_scale": True,
        "weight_decay": 0.1,
        "factored_dims": "two_largest",
        "min_dim_size_to_factor": 2,
        "momentum_mode": "unit",
        "maximize": False,
    }
    _single_tensor_adafactor(hi[0], grads[0], *hi[1:], **kw)
    adafactor_triton(out[0], grads[0], *out[1:], **kw)
    for a, b in zip(hi[0] + hi[4], out[0] + out[4], strict=True):
        assert b.dtype == torch.bfloat16
        # one bf16 spacing: the fp32 values may straddle a rounding boundary
        torch.testing.assert_close(b.float(), a.bfloat16().float(), rtol=2**-7, atol=1e-6)
    for a_list, b_list in zip(hi[1:4], out[1:4], strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            if a is not None:
                assert b.dtype == torch.float32
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)


def test_adafactor_kernel_keeps_coefficients_on_the_device(monkeypatch):
    state, grads = _adafactor_case(
        AF_SHAPES, torch.float32, 8, factored_dims="two_largest", beta1=0.9
    )

    def forbidden(self):
        raise AssertionError(".item() called inside the Triton AdaFactor step")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    adafactor_triton(
        state[0],
        grads[0],
        *state[1:],
        beta2_t=0.5,
        step_size=1e-2,
        beta1=0.9,
        eps1=1e-30,
        eps2=1e-3,
        clip_threshold=1.0,
        multiply_by_parameter_scale=True,
        weight_decay=0.1,
        factored_dims="two_largest",
        min_dim_size_to_factor=2,
        momentum_mode="unit",
        maximize=False,
    )


# ---------------------------------------------------------------------------------------------
# Optimizers on the Triton path against their default path


def _train_pair(factory, module, *, dtype=torch.float64, steps=3):
    """The same model trained by ``factory`` on the default single-tensor path and on the
    path the test forces (``force_triton``)."""
    torch.manual_seed(9)

    def net():
        return (
            torch.nn.Sequential(torch.nn.Linear(7, 130), torch.nn.Tanh(), torch.nn.Linear(130, 3))
            .to(dtype)
            .to(DEVICE)
        )

    ref_model, model = net(), net()
    model.load_state_dict(ref_model.state_dict())
    ref_opt, opt = factory(ref_model.parameters()), factory(model.parameters())
    x = torch.randn(16, 7, dtype=dtype, device=DEVICE)
    for _ in range(steps):
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        with pytest.MonkeyPatch.context() as undo:
            undo.setattr(module, "select_path", lambda *a: "single")
            ref_opt.step()
        opt.step()
    return ref_model, ref_opt, model, opt


def _assert_same_training(ref_model, ref_opt, model, opt, **tol):
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol)
        for key, value in ref_opt.state[a].items():
            assert opt.state[b][key].dtype == value.dtype
            torch.testing.assert_close(opt.state[b][key], value, **tol)


def test_adax_optimizer_on_triton_path(force_triton):
    def factory(params):
        return danlu.AdaX(params, lr=1e-2, weight_decay=0.1, fused=True)

    _assert_same_training(*_train_pair(factory, functional_adax), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta1,mode", [(0.0, "unit"), (0.9, "scaled")])
def test_adafactor_optimizer_on_triton_path(force_triton, beta1, mode):
    def factory(params):
        # min_dim_size_to_factor=4 factors both weights (7 × 130 and 130 × 3 is unfactored
        # below 4), the biases keep full statistics
        return danlu.AdaFactor(
            params,
            lr=None,
            beta1=beta1,
            momentum_mode=mode,
            weight_decay=0.01,
            min_dim_size_to_factor=4,
            fused=True,
        )

    _assert_same_training(*_train_pair(factory, functional_adafactor), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Low-precision state and stochastic rounding in the Lion and Tiger kernels


def _lion_upcast(params, grads, exp_avgs, **kw):
    upcast_step(_single_tensor_lion, params, grads, [exp_avgs], stochastic_rounding=False, **kw)


def test_lion_kernel_bf16_momentum_matches_upcast_path():
    params, exp_avgs, grads = make(SHAPES, torch.float32, 10)
    ms = [m.bfloat16() for m in exp_avgs]
    p1, m1, p2, m2 = clone(params), clone(ms), clone(params), clone(ms)
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False}
    for g in grads:
        _lion_upcast(p1, g, m1, **kw)
        lion_triton(p2, g, m2, **kw)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(m1, m2, strict=True):
        assert b.dtype == torch.bfloat16
        # the same fp32 value rounded to nearest: equal, or one bf16 spacing apart where two
        # fp32 roundings of the lerp straddle a rounding boundary
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-8, atol=1e-30)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["matrix", "embedding"])
def test_tiger_kernel_bf16_momentum_matches_upcast_path(kind, k):
    params, exp_avgs, grads = make([s for s in SHAPES if len(s) > 0], torch.float32, 11)
    ms = [m.bfloat16() for m in exp_avgs]
    p1, m1, p2, m2 = clone(params), clone(ms), clone(params), clone(ms)
    for t, g in enumerate(grads):
        kw = {
            "lr": 1e-2,
            "beta": 0.9,
            "weight_decay": 0.1,
            "kind": kind,
            "rms_floor": 1e-3,
            "grad_accum_steps": k,
            "first_micro_step": t % k == 0,
            "last_micro_step": (t + 1) % k == 0,
            "maximize": False,
        }
        upcast_step(_single_tensor_tiger, p1, g, [m1], stochastic_rounding=False, **kw)
        tiger_triton(p2, g, m2, **kw)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(m1, m2, strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-8, atol=1e-30)


def _bf16_neighbours(x):
    """The two bf16 values around fp32 ``x`` (equal when x is a bf16 value)."""
    down = x.bfloat16()
    down = torch.where(down.float() > x, torch.nextafter(down, -torch.full_like(down, 1e30)), down)
    up = torch.where(down.float() < x, torch.nextafter(down, torch.full_like(down, 1e30)), down)
    return down.float(), up.float()


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_stochastic_rounding_lands_on_a_neighbour_of_the_fp32_result(name):
    params, exp_avgs, grads = make([(1500,), (33, 70)], torch.bfloat16, 12)
    p_hi = [p.float() for p in params]
    m_hi = [m.float() for m in exp_avgs]
    g_hi = [g.float() for g in grads[0]]
    out, out_m = clone(params), clone(exp_avgs)
    if name == "lion":
        kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False}
        _single_tensor_lion(p_hi, g_hi, m_hi, **kw)
        lion_triton(out, grads[0], out_m, stochastic_rounding=True, **kw)
    else:
        kw = {
            "lr": 1e-3,
            "beta": 0.9,
            "weight_decay": 0.1,
            "kind": "matrix",
            "rms_floor": 1e-3,
            "grad_accum_steps": 1,
            "first_micro_step": True,
            "last_micro_step": True,
            "maximize": False,
        }
        _single_tensor_tiger(p_hi, g_hi, m_hi, **kw)
        tiger_triton(out, grads[0], out_m, stochastic_rounding=True, **kw)
    moved_up = moved_down = 0
    for exact, got, m_exact, m_got, m, g in zip(
        p_hi, out, m_hi, out_m, exp_avgs, grads[0], strict=True
    ):
        assert got.dtype == torch.bfloat16
        down, up = _bf16_neighbours(exact)
        # 0.9·m + 0.1·g (Lion's c, Tiger's new m) is often exactly 0 on bf16's coarse grid;
        # its sign then depends on FMA or not: those entries are left out
        c = 0.9 * m.double() + 0.1 * g.double()
        sure = c.abs() > 1e-6 * (m.double().abs() + g.double().abs())
        got = got.float()
        assert torch.all(((got == down) | (got == up))[sure])
        moved_up += int(((got == up) & (up != down)).sum())
        moved_down += int(((got == down) & (up != down)).sum())
        # the momentum is rounded to nearest (one spacing apart where the fp32 values, with
        # and without FMA, straddle a rounding boundary)
        torch.testing.assert_close(m_got.float(), m_exact.bfloat16().float(), rtol=2**-7, atol=1e-6)
    assert moved_up > 100 and moved_down > 100  # both directions occur


def test_stochastic_rounding_in_the_kernel_is_unbiased():
    # θ = 1 (bf16 spacing 2^-7 above 1, 2^-8 below) and a step of 2^-10 per update: plain
    # rounding loses it, stochastic rounding lands on 1 − 2^-8 with probability 2^-10/2^-8 =
    # 1/4 and on 1 otherwise, so the mean is 1 − 2^-10 within a few standard errors
    n = 1 << 14
    params = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    grads = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    exp_avgs = [torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)]
    torch.manual_seed(0)
    lion_triton(
        params,
        grads,
        exp_avgs,
        lr=2**-10,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=False,
        stochastic_rounding=True,
    )
    values = params[0].float()
    assert set(values.unique().tolist()) <= {1.0, 1.0 - 2**-8}
    sem = 2**-8 * (0.25 * 0.75 / n) ** 0.5
    assert abs(values.double().mean().item() - (1 - 2**-10)) < 5 * sem
    # the seed comes from torch's generator: reproducible under manual_seed, fresh otherwise
    again = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    torch.manual_seed(0)
    lion_triton(
        again,
        grads,
        [torch.zeros_like(exp_avgs[0])],
        lr=2**-10,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=False,
        stochastic_rounding=True,
    )
    assert torch.equal(again[0], params[0])
    third = [torch.ones(n, dtype=torch.bfloat16, device=DEVICE)]
    lion_triton(
        third,
        grads,
        [torch.zeros_like(exp_avgs[0])],
        lr=2**-10,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        maximize=False,
        stochastic_rounding=True,
    )
    assert not torch.equal(third[0], params[0])


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_low_precision_optimizer_on_triton_path(force_triton, name):
    # fp32 params with bf16 momentum: the kernel and the upcast path agree; bf16 params with
    # stochastic rounding keep updates below bf16's spacing on the kernel path too
    def factory(params):
        return danlu.create_optimizer(name, params, lr=1e-3, state_dtype=torch.bfloat16)

    module = functional_lion if name == "lion" else functional_tiger
    ref_model, ref_opt, model, opt = _train_pair(factory, module, dtype=torch.float32)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert opt.state[b]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(
            opt.state[b]["exp_avg"].float(),
            ref_opt.state[a]["exp_avg"].float(),
            rtol=2**-8,
            atol=1e-30,
        )

    n, steps, lr = 4096, 8, 1e-4
    param = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=DEVICE))
    opt = danlu.REGISTRY[name].cls(
        [param], lr=lr if name == "lion" else 2 * lr, stochastic_rounding=True
    )
    for _ in range(steps):
        param.grad = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
        opt.step()
    assert abs(param.double().mean().item() - (1 - steps * lr)) < 0.1 * steps * lr

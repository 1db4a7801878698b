"""AdamW with fp16 parameters keeps its moments in float32 (bf16 parameters: v).

In fp16, (1 − β2)·g² for an ordinary gradient (g = 1e-3: 1e-9) is below the smallest subnormal
(6e-8) and rounds to 0, so v stayed 0 while m did not, and the step m̂/(√v̂ + ε) exploded. In
bf16, β2·v with β2 = 0.999 rounds back to v, so v never decayed. The oracle is AdamW in NumPy
float64 (Loshchilov & Hutter 2019, Alg. 2; with k micro-steps per update the moments of
kexue.fm/archives/8634), with the parameter rounded to fp16 after each update (round to
nearest) where the optimizer rounds to nearest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import danlu

F16 = torch.float16
SHAPES = [(7, 5), (9,)]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}}


def _to_f16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(F16).double().numpy()


def _grads(seed: int, steps: int, scale: float) -> list[list[torch.Tensor]]:
    """fp16 gradients of magnitude ~``scale``: with scale ≤ 1e-3 every (1 − β2)·g² underflows
    fp16 (its smallest subnormal is 6e-8)."""
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * scale).to(F16) for s in SHAPES] for _ in range(steps)]


def _oracle(theta0, grads, *, lr, betas, eps, weight_decay, k=1, maximize=False,
            eps_inside_sqrt=False, round_params=True, trace=None):  # fmt: skip
    """AdamW in float64 on the fp16 gradients' exact values; with ``round_params`` θ is
    rounded to fp16 (to nearest) once per update, decay and step together. Returns θ, m, v
    after the last micro-step."""
    b1, b2 = betas
    theta = [t.double().numpy().copy() for t in theta0]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    n = 0
    for t, gs in enumerate(grads):
        first, last = t % k == 0, (t + 1) % k == 0
        for i, g in enumerate(gs):
            g = g.double().numpy() * (-1.0 if maximize else 1.0)
            if first:
                m[i] *= b1
                v[i] *= b2
            m[i] += (1 - b1) / k * g
            v[i] += (1 - b2) / k * g * g
        if not last:
            continue
        n += 1
        for i in range(len(theta)):
            m_hat, v_hat = m[i] / (1 - b1**n), v[i] / (1 - b2**n)
            denom = np.sqrt(v_hat + eps) if eps_inside_sqrt else np.sqrt(v_hat) + eps
            theta[i] = theta[i] * (1 - lr * weight_decay) - lr * m_hat / denom
            if round_params:
                theta[i] = _to_f16(theta[i])
        if trace is not None:
            trace.append([t.copy() for t in theta])
    return theta, m, v


def _run(opt_kwargs, grads, theta0):
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    opt = danlu.AdamW(params, **opt_kwargs)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
    return params, opt


def _theta0(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(F16) for s in SHAPES]


def _ulp16(x: np.ndarray) -> np.ndarray:
    """fp16's spacing at |x| (2^-24 in the subnormal range)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0**-14)))
    return 2.0 ** (e - 10)


def _check_moments(opt, params, want_m, want_v, scale):
    """float32 moments against float64, to float32's precision relative to the gradients'
    size ``scale`` (m is a sum of gradients of both signs and may cancel far below it)."""
    for i, p in enumerate(params):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32, i
        assert state["exp_avg_sq"].dtype == torch.float32, i
        np.testing.assert_allclose(state["exp_avg"].double().numpy(), want_m[i], rtol=1e-5,
                                   atol=1e-6 * scale)  # fmt: skip
        np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), want_v[i], rtol=1e-5,
                                   atol=1e-6 * scale**2)  # fmt: skip
        assert (state["exp_avg_sq"] > 0).all(), "v underflowed to 0"


def _check_params_round_to_nearest(params, want):
    """fp16 parameters: the fp32 math rounded once per update, against float64 rounded once
    per update; the two may round an update that lands near a tie differently (one ulp)."""
    for i, (p, w) in enumerate(zip(params, want, strict=True)):
        assert p.dtype == F16
        got = p.detach().double().numpy()
        assert np.all(np.abs(got - w) <= _ulp16(w) * 1.001), (i, got, w)


@pytest.mark.parametrize("scale", [1e-3, 1e-4, 0.3])
@pytest.mark.parametrize("path", list(PATHS))
def test_fp16_params_follow_float64_adamw(path, scale):
    grads = _grads(1, 8, scale)
    theta0 = _theta0()
    params, opt = _run({**HYPER, "stochastic_rounding": False, **PATHS[path]}, grads, theta0)
    want_theta, want_m, want_v = _oracle(theta0, grads, **HYPER)
    _check_moments(opt, params, want_m, want_v, scale)
    _check_params_round_to_nearest(params, want_theta)


@pytest.mark.parametrize(
    "settings",
    [
        {"maximize": True},
        {"eps_inside_sqrt": True, "eps": 1e-12},
        {"grad_accum_steps": 2},
        {"grad_accum_steps": 3, "weight_decay": 0.0},
    ],
    ids=["maximize", "eps_inside_sqrt", "accum2", "accum3"],
)
@pytest.mark.parametrize("path", list(PATHS))
def test_fp16_variants_follow_float64_adamw(path, settings):
    grads = _grads(2, 12, 1e-3)
    theta0 = _theta0(1)
    kwargs = {**HYPER, **settings}
    params, opt = _run({**kwargs, "stochastic_rounding": False, **PATHS[path]}, grads, theta0)
    k = kwargs.pop("grad_accum_steps", 1)
    want_theta, want_m, want_v = _oracle(theta0, grads, **kwargs, k=k)
    _check_moments(opt, params, want_m, want_v, 1e-3)
    _check_params_round_to_nearest(params, want_theta)


@pytest.mark.parametrize("path", list(PATHS))
def test_fp16_default_stochastic_rounding_stays_within_its_rounding_errors(path):
    """The default writes fp16 parameters stochastically: the moments do not depend on θ and
    equal the oracle's; θ differs from the unrounded float64 run by less than the sum of the
    fp16 spacings at the values written (each write errs by less than one spacing)."""
    steps = 8
    grads = _grads(3, steps, 1e-3)
    theta0 = _theta0(2)
    torch.manual_seed(0)
    params, opt = _run({**HYPER, **PATHS[path]}, grads, theta0)
    trace: list = []
    want_theta, want_m, want_v = _oracle(theta0, grads, **HYPER, round_params=False, trace=trace)
    _check_moments(opt, params, want_m, want_v, 1e-3)
    for i, (p, w) in enumerate(zip(params, want_theta, strict=True)):
        got = p.detach().double().numpy()
        # the spacing at a value within 1 % of the exact one (the written value is close)
        budget = sum(_ulp16(np.abs(thetas[i]) * 1.01) for thetas in trace)
        assert np.all(np.abs(got - w) <= budget), (got, w, budget)
        # Adam's step is about lr per update: the old fp16 v (0) gave steps of ~1e5·lr
        assert np.all(np.abs(got - theta0[0 if got.ndim == 2 else 1].double().numpy()) < 0.2)


def test_the_issue_case_moves_by_about_lr_per_step():
    """The issue: fp16 weights, gradients of 1e-3, default settings. Each Adam step has size
    about lr (|m̂|/√v̂ ≤ 1 up to bias-correction drift), so after 5 steps nothing moved more
    than 5·lr (plus fp16 spacing); with v underflowing to 0, entries moved by thousands."""
    p = torch.nn.Parameter(torch.zeros(64, dtype=F16))
    opt = danlu.AdamW([p], lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        p.grad = (torch.randn(64, generator=gen) * 1e-3).to(F16)
        opt.step()
    assert torch.isfinite(p).all()
    assert p.detach().abs().max().item() <= 5 * 1e-3 * 1.01 + 2**-24


@pytest.mark.parametrize("path", list(PATHS))
def test_loading_an_old_checkpoint_with_fp16_moments_upcasts_them(path):
    """Checkpoints saved before the change (and torch.optim.AdamW's) hold fp16 moments for
    fp16 parameters: they load as float32 holding the same values, and the next steps follow
    the oracle continued from those values (a saved fp16 v of zeros, the old failure, would
    then still explode: the values are loaded as they are)."""
    grads = _grads(5, 6, 1e-3)
    theta0 = _theta0(3)
    params, opt = _run({**HYPER, "stochastic_rounding": False, **PATHS[path]}, grads[:3], theta0)
    saved = opt.state_dict()
    for entry in saved["state"].values():  # what the older layout stored
        entry["exp_avg"] = entry["exp_avg"].to(F16)
        entry["exp_avg_sq"] = entry["exp_avg_sq"].to(F16)
    old = {i: {k: v.clone() for k, v in e.items()} for i, e in saved["state"].items()}

    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = danlu.AdamW(fresh, **HYPER, stochastic_rounding=False, **PATHS[path])
    opt2.load_state_dict(saved)
    for i, p in enumerate(fresh):
        state = opt2.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32, key
            assert torch.equal(state[key], old[i][key].float()), key
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"

    # continue: the oracle from the loaded (fp16-rounded) moments
    b1, b2 = HYPER["betas"]
    lr, eps, wd = HYPER["lr"], HYPER["eps"], HYPER["weight_decay"]
    theta = [p.detach().double().numpy().copy() for p in fresh]
    m = [old[i]["exp_avg"].double().numpy() for i in range(len(fresh))]
    v = [old[i]["exp_avg_sq"].double().numpy() for i in range(len(fresh))]
    n = 3
    for gs in grads[3:]:
        for p, g in zip(fresh, gs, strict=True):
            p.grad = g
        opt2.step()
        n += 1
        for i, g in enumerate(gs):
            g = g.double().numpy()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**n), v[i] / (1 - b2**n)
            theta[i] = _to_f16(theta[i] * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps))
    _check_moments(opt2, fresh, m, v, 1e-3)
    _check_params_round_to_nearest(fresh, theta)


@pytest.mark.parametrize("dtype", [F16, torch.bfloat16])
def test_a_torch_adamw_low_precision_checkpoint_loads_upcast(dtype):
    p = torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    ref = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.full((4, 3), 0.5, dtype=dtype)
    ref.step()
    assert ref.state[p]["exp_avg_sq"].dtype == dtype  # torch keeps the parameter's dtype
    q = torch.nn.Parameter(p.detach().clone())
    opt = danlu.AdamW([q], lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    m_dtype = torch.float32 if dtype == F16 else dtype
    assert opt.state[q]["exp_avg"].dtype == m_dtype
    assert opt.state[q]["exp_avg_sq"].dtype == torch.float32
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[q][key].float(), ref.state[p][key].float())
    q.grad = torch.full((4, 3), 0.5, dtype=dtype)
    opt.step()
    assert torch.isfinite(q).all()


def test_save_and_resume_keeps_float32_moments_bit_identical():
    grads = _grads(6, 6, 1e-3)
    theta0 = _theta0(4)
    kwargs = {**HYPER, "stochastic_rounding": False}
    params, opt = _run(kwargs, grads, theta0)  # uninterrupted
    half, opt_a = _run(kwargs, grads[:3], theta0)
    saved = opt_a.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt_b = danlu.AdamW(resumed, **kwargs)
    opt_b.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(resumed, gs, strict=True):
            p.grad = g
        opt_b.step()
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[a][key].dtype == torch.float32
            assert torch.equal(opt.state[a][key], opt_b.state[b][key])


def test_state_dtypes_per_parameter_dtype():
    """fp16: both moments float32; bf16: m bf16, v float32; fp32/fp64: the parameter's."""
    want = {
        torch.float16: (torch.float32, torch.float32),
        torch.bfloat16: (torch.bfloat16, torch.float32),
        torch.float32: (torch.float32, torch.float32),
        torch.float64: (torch.float64, torch.float64),
    }
    for dtype, (m_dtype, v_dtype) in want.items():
        p = torch.nn.Parameter(torch.ones(3, dtype=dtype))
        opt = danlu.AdamW([p], lr=1e-3)
        p.grad = torch.full((3,), 1e-3, dtype=dtype)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == m_dtype, dtype
        assert opt.state[p]["exp_avg_sq"].dtype == v_dtype, dtype


def _to_bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_params_follow_float64_adamw_with_a_bf16_momentum(path):
    """bf16 parameters (round to nearest): v in float32 equals the oracle's to float32
    precision; m is the oracle's lerp rounded to bf16 each step; θ the update rounded to bf16
    once."""
    b1, b2 = HYPER["betas"]
    lr, eps, wd = HYPER["lr"], HYPER["eps"], HYPER["weight_decay"]
    gen = torch.Generator().manual_seed(9)
    theta0 = [torch.randn(s, generator=gen).bfloat16() for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen) * 1e-3).bfloat16() for s in SHAPES] for _ in range(6)]
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    opt = danlu.AdamW(params, **HYPER, stochastic_rounding=False, **PATHS[path])
    theta = [t.double().numpy() for t in theta0]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    for n, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
        for i, g in enumerate(gs):
            g = g.double().numpy()
            m[i] = _to_bf16(m[i] + (1 - b1) * (g - m[i]))
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**n), v[i] / (1 - b2**n)
            theta[i] = _to_bf16(theta[i] * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps))
    for i, p in enumerate(params):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.bfloat16
        np.testing.assert_allclose(state["exp_avg"].double().numpy(), m[i], rtol=2**-8,
                                   atol=1e-9)  # fmt: skip
        assert state["exp_avg_sq"].dtype == torch.float32
        np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), v[i], rtol=1e-5,
                                   atol=1e-15)  # fmt: skip
        got = p.detach().double().numpy()
        spacing = 2.0 ** (np.floor(np.log2(np.abs(theta[i]))) - 7)
        assert np.all(np.abs(got - theta[i]) <= spacing * 1.001), i


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_second_moment_decays(path):
    """1000 gradients of 1, then 1500 of 0.01: v follows float64 (0.63, then 0.14), where a
    bf16 v climbed to 0.5 and stayed there (0.999·v rounds back to v in bf16)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = danlu.AdamW([p], lr=1e-4, weight_decay=0.0, **PATHS[path])
    b2 = 0.999
    want = peak = 0.0
    for t in range(2500):
        g = float(torch.tensor(1.0 if t < 1000 else 0.01, dtype=torch.bfloat16))
        p.grad = torch.full((2,), g, dtype=torch.bfloat16)
        opt.step()
        want = b2 * want + (1 - b2) * g**2
        peak = max(peak, want)
    got = opt.state[p]["exp_avg_sq"].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert want < 0.25 * peak  # it decayed well below the peak


def test_fp32_params_are_bit_identical_to_torch_adamw():
    """The change touches fp16 parameters only: fp32 still equals torch.optim.AdamW's
    for-loop bit for bit."""
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(6, 4, generator=gen)
    grads = [torch.randn(6, 4, generator=gen) * 1e-3 for _ in range(5)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    opt = danlu.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert torch.equal(a.detach(), b.detach())


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


@pytest.mark.parametrize("path", list(PATHS))
def test_fp16_dtensor_params_keep_float32_moments(mesh, path):
    from torch.distributed.tensor import Shard, distribute_tensor

    grads = _grads(8, 5, 1e-3)
    theta0 = _theta0(5)
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in theta0]
    opt = danlu.AdamW(params, **HYPER, stochastic_rounding=False, **PATHS[path])
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    want_theta, want_m, want_v = _oracle(theta0, grads, **HYPER)
    full = [torch.nn.Parameter(p.detach().full_tensor()) for p in params]
    for p, f in zip(params, full, strict=True):
        opt.state[f] = {
            k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in opt.state[p].items()
        }
    _check_moments(opt, full, want_m, want_v, 1e-3)
    _check_params_round_to_nearest(full, want_theta)

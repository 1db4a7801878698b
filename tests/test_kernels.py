"""Fast paths against the functional core (DESIGN.md "Correctness": odd sizes, empty tensors)."""

import pytest
import torch

import danlu
from danlu.algorithms.adax.fast import adax_chunked, adax_compiled
from danlu.algorithms.adax.functional import _single_tensor_adax, adax_new_sample_weight
from danlu.algorithms.amos.fast import amos_compiled
from danlu.algorithms.amos.functional import _single_tensor_amos, amos_slot_shape
from danlu.algorithms.amos.rule import AmosHyper
from danlu.algorithms.lion.fast import lion_chunked, lion_compiled
from danlu.algorithms.lion.functional import _single_tensor_lion
from danlu.algorithms.tiger.fast import tiger_chunked, tiger_compiled
from danlu.algorithms.tiger.functional import _single_tensor_tiger
from danlu.core.overflow import average_bound
from danlu.core.precision import upcast_step

# sizes that are not multiples of the slice size (7 below), an empty tensor and a scalar
SHAPES = [(0,), (), (1,), (5,), (13, 7), (3, 11, 5), (50, 3)]
CHUNK = 7


def tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    exp_avgs = [torch.randn(s, generator=gen, dtype=dtype) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(4)]
    return params, exp_avgs, grads


def clone(ts):
    return [t.clone() for t in ts]


LION_KW = [
    {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "maximize": False},
    {"lr": 3e-3, "beta1": 0.95, "beta2": 0.98, "weight_decay": 0.5, "maximize": True},
    {"lr": torch.tensor(2e-3), "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False},
]


@pytest.mark.parametrize("kw", LION_KW)
def test_lion_chunked_is_bit_identical(kw):
    params, exp_avgs, grads = tensors(SHAPES)
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    for g in grads:
        _single_tensor_lion(p1, g, m1, **kw)
        lion_chunked(p2, g, m2, chunk=CHUNK, **kw)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        assert torch.equal(a, b)


TIGER_CASES = [
    (kind, k, maximize, wd)
    for kind in ("matrix", "elementwise", "embedding")
    for k, maximize, wd in ((1, False, 0.01), (2, True, 0.0), (3, False, 0.5))
]


def run_tiger(fn, params, exp_avgs, grads, *, kind, k, maximize, wd, **extra):
    for t, g in enumerate(grads):
        fn(
            params,
            g,
            exp_avgs,
            lr=1e-2,
            beta=0.9,
            weight_decay=wd,
            kind=kind,
            rms_floor=1e-3,
            grad_accum_steps=k,
            first_micro_step=t % k == 0,
            last_micro_step=(t + 1) % k == 0,
            maximize=maximize,
            **extra,
        )


@pytest.mark.parametrize("kind,k,maximize,wd", TIGER_CASES)
def test_tiger_chunked_is_bit_identical(kind, k, maximize, wd):
    shapes = [s for s in SHAPES if kind != "embedding" or len(s) > 0]
    params, exp_avgs, grads = tensors(shapes)
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    run_tiger(_single_tensor_tiger, p1, m1, grads, kind=kind, k=k, maximize=maximize, wd=wd)
    run_tiger(tiger_chunked, p2, m2, grads, kind=kind, k=k, maximize=maximize, wd=wd, chunk=CHUNK)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", LION_KW[:2])
def test_lion_chunked_low_precision_state_is_bit_identical_to_upcast(kw, state_dtype):
    # the upcast path (fp32 copies of the whole state, precision.upcast_step) is the reference
    params, exp_avgs, grads = tensors(SHAPES)
    exp_avgs = [m.to(state_dtype) for m in exp_avgs]
    grads[1] = [g * 1e5 for g in grads[1]]  # beyond fp16's range: the reads saturate
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    # the fp32 copies do not show the momentum's dtype: its bound is passed along
    bound = average_bound(state_dtype, torch.float32)
    for g in grads:
        upcast_step(
            _single_tensor_lion, p1, g, [m1], stochastic_rounding=False, grad_bound=bound, **kw
        )
        lion_chunked(p2, g, m2, chunk=CHUNK, **kw)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert all(m.dtype == state_dtype and torch.isfinite(m).all() for m in m2)


@pytest.mark.parametrize("kind,k,maximize,wd", TIGER_CASES[::2])
def test_tiger_chunked_bf16_state_is_bit_identical_to_upcast(kind, k, maximize, wd):
    shapes = [s for s in SHAPES if kind != "embedding" or len(s) > 0]
    params, exp_avgs, grads = tensors(shapes)
    exp_avgs = [m.bfloat16() for m in exp_avgs]
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)

    def upcast(ps, gs, ms, **kw):
        upcast_step(_single_tensor_tiger, ps, gs, [ms], stochastic_rounding=False, **kw)

    run_tiger(upcast, p1, m1, grads, kind=kind, k=k, maximize=maximize, wd=wd)
    run_tiger(tiger_chunked, p2, m2, grads, kind=kind, k=k, maximize=maximize, wd=wd, chunk=CHUNK)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bf16_state_runs_the_chunked_path_on_cpu(monkeypatch):
    import danlu.algorithms.lion.fast as chunked

    calls = []
    original = chunked.lion_chunked
    monkeypatch.setattr(
        chunked, "lion_chunked", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    p = torch.nn.Parameter(torch.randn(1000))
    opt = danlu.Lion([p], lr=1e-3, state_dtype=torch.bfloat16)
    p.grad = torch.randn(1000)
    opt.step()
    assert calls and opt.state[p]["exp_avg"].dtype == torch.bfloat16


def test_embedding_slices_hold_whole_rows():
    # width 3 does not divide the slice size 7: slices of 6 elements keep row step sizes apart
    p = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [9.0, 0.0, 0.0]])
    g = torch.ones_like(p)
    p1, p2, m1, m2 = p.clone(), p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    kw = {
        "lr": 0.1,
        "beta": 0.9,
        "weight_decay": 0.0,
        "kind": "embedding",
        "rms_floor": 0.0,
        "grad_accum_steps": 1,
        "first_micro_step": True,
        "last_micro_step": True,
        "maximize": False,
    }
    _single_tensor_tiger([p1], [g], [m1], **kw)
    tiger_chunked([p2], [g], [m2], chunk=7, **kw)
    assert torch.equal(p1, p2)
    rms = p.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(p - p2, (0.1 * rms).unsqueeze(1).expand_as(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lion_compiled_matches_single(dtype):
    params, exp_avgs, grads = tensors(SHAPES, dtype=dtype, seed=1)
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "maximize": False}
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    for g in grads:
        _single_tensor_lion(p1, g, m1, **kw)
        lion_compiled(p2, g, m2, **kw)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", ["matrix", "elementwise", "embedding"])
def test_tiger_compiled_matches_single(kind):
    shapes = [s for s in SHAPES if kind != "embedding" or len(s) > 0]
    params, exp_avgs, grads = tensors(shapes, dtype=torch.float64, seed=2)
    p1, m1, p2, m2 = clone(params), clone(exp_avgs), clone(params), clone(exp_avgs)
    run_tiger(_single_tensor_tiger, p1, m1, grads, kind=kind, k=2, maximize=False, wd=0.01)
    run_tiger(tiger_compiled, p2, m2, grads, kind=kind, k=2, maximize=False, wd=0.01)
    for a, b in zip(p1 + m1, p2 + m2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


# (AdaX and Amos compile per param group: their compiled math is checked below, on one call)
@pytest.mark.parametrize("name", ["lion", "tiger", "adafactor"])
def test_fused_optimizer_equals_default(name):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    ).double()
    clone_model = torch.nn.Sequential(
        torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    ).double()
    clone_model.load_state_dict(model.state_dict())
    o1 = danlu.create_optimizer(name, model, lr=1e-2)
    o2 = danlu.create_optimizer(name, clone_model, lr=1e-2, fused=True)
    x = torch.randint(0, 20, (16, 4))
    for _ in range(3):
        for m, o in ((model, o1), (clone_model, o2)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), clone_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lion", "tiger", "adax", "amos"])
def test_fused_true_on_cpu_runs_the_compiled_path(name, monkeypatch):
    import importlib

    compiled = importlib.import_module(f"danlu.algorithms.{name}.fast")
    calls = []
    monkeypatch.setattr(compiled, f"{name}_compiled", lambda *a, **k: calls.append(name))
    param = torch.nn.Parameter(torch.ones(4, 3))
    opt = danlu.REGISTRY[name].cls([param], lr=1e-2, fused=True)
    param.grad = torch.ones(4, 3)
    opt.step()
    assert calls == [name]


def test_adafactor_fused_true_on_cpu_runs_the_single_tensor_loop(monkeypatch):
    # no compiled AdaFactor: on CPU the loop measured faster than the foreach math
    import sys

    functional = sys.modules[
        "danlu.algorithms.adafactor.functional"
    ]  # the package re-exports a function

    calls = []
    original = functional._single_tensor_adafactor
    monkeypatch.setattr(
        functional,
        "_single_tensor_adafactor",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    monkeypatch.setattr(functional, "_multi_tensor_adafactor", None)  # fails if called
    param = torch.nn.Parameter(torch.ones(4, 3))
    opt = danlu.AdaFactor([param], lr=1e-2, fused=True)
    param.grad = torch.ones(4, 3)
    opt.step()
    assert calls == [1]


def test_foreach_and_fused_both_true_is_rejected():
    with pytest.raises(ValueError, match="fused"):
        danlu.Lion([torch.nn.Parameter(torch.ones(2))], foreach=True, fused=True)


ADAX_KW = [
    {
        "lr": 1e-2,
        "beta1": 0.9,
        "eps": 1e-6,
        "eps_inside_sqrt": False,
        "weight_decay": 0.0,
        "maximize": False,
    },
    {
        "lr": 3e-3,
        "beta1": 0.5,
        "eps": 1e-3,
        "eps_inside_sqrt": True,
        "weight_decay": 0.5,
        "maximize": True,
    },
    {
        "lr": torch.tensor(2e-3),
        "beta1": 0.9,
        "eps": 1e-6,
        "eps_inside_sqrt": False,
        "weight_decay": 0.1,
        "maximize": False,
    },
]


def adax_state(shapes, dtype, seed):
    params, exp_avgs, grads = tensors(shapes, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    sd = torch.promote_types(dtype, torch.float32)
    return params, exp_avgs, [torch.rand(s, generator=gen).to(sd) for s in shapes], grads


def run_adax(fn, params, exp_avgs, exp_avg_sqs, grads, kw, **extra):
    for t, g in enumerate(grads, start=1):
        fn(
            params,
            g,
            exp_avgs,
            exp_avg_sqs,
            new_sample_weight=adax_new_sample_weight(t, 1e-4),
            **kw,
            **extra,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", ADAX_KW)
def test_adax_chunked_is_bit_identical(kw, dtype):
    params, exp_avgs, exp_avg_sqs, grads = adax_state(SHAPES, dtype, 4)
    a = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    b = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    run_adax(_single_tensor_adax, *a, grads, kw)
    run_adax(adax_chunked, *b, grads, kw, chunk=CHUNK)
    for x, y in zip([*a[0], *a[1], *a[2]], [*b[0], *b[1], *b[2]], strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


def test_adax_compiled_matches_single():
    dtype = torch.float64
    params, exp_avgs, exp_avg_sqs, grads = adax_state(SHAPES, dtype, 5)
    a = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    b = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    kw = ADAX_KW[1]
    run_adax(_single_tensor_adax, *a, grads, kw)
    run_adax(adax_compiled, *b, grads, kw)
    for x, y in zip([*a[0], *a[1], *a[2]], [*b[0], *b[1], *b[2]], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


def test_state_dict_saved_without_fused_loads():
    # a state dict from before ``fused`` existed loads and steps on the default path
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    opts = [danlu.AdaX([p], lr=1e-2) for p in params]
    for p, opt in zip(params, opts, strict=True):
        p.grad = torch.ones(3)
        opt.step()
    saved = opts[1].state_dict()
    for group in saved["param_groups"]:
        del group["fused"]
    opts[1].load_state_dict(saved)
    for p, opt in zip(params, opts, strict=True):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(params[0], params[1])


def test_amos_compiled_matches_single():
    # float64, momentum, clipping, a centre; a 0-d param, and every slot rule: 0-d slots of
    # a vector and of a 3-d tensor ("scalar"), per-output rows, full-size slots
    shapes = [(), (5,), (13, 7), (3, 11, 5), (4, 6)]
    rules = ["per_output", "per_output", "per_output", "scalar", "full"]
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    slot_shapes = [amos_slot_shape(s, r) for s, r in zip(shapes, rules, strict=True)]
    vs = [torch.rand(s, generator=gen, dtype=torch.float64) for s in slot_shapes]
    bs = [torch.rand(s, generator=gen, dtype=torch.float64) for s in slot_shapes]
    ms = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3)]
    a = [clone(params), clone(vs), clone(bs), clone(ms)]
    b = [clone(params), clone(vs), clone(bs), clone(ms)]
    for t, g in enumerate(grads, start=1):
        kw = {
            "etas": [0.5, 0.5, 0.3, 0.2, 0.4],
            "bias_correction": 1 - 0.999**t,
            "lr": 0.1,
            "beta": 0.999,
            "zeta": 0.25,
            "finetune_rate": 1.0,
            "center": 0.5,
            "momentum": 0.5,
            "clip_value": 1.0,
            "eps": 2.0**-125,
            "maximize": True,  # constant: a changed flag would compile a second variant
        }
        etas, hyper = kw.pop("etas"), AmosHyper(**kw)  # the paths take the hyper-parameters as one
        _single_tensor_amos(a[0], g, *a[1:], etas=etas, hyper=hyper)
        amos_compiled(b[0], g, *b[1:], etas=etas, hyper=hyper)
    for x, y in zip([*a[0], *a[1], *a[2], *a[3]], [*b[0], *b[1], *b[2], *b[3]], strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)

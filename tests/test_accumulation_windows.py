"""Accumulation windows (Tiger and AdamW with ``grad_accum_steps``) are the optimizer's, not
each parameter's: one micro-step counter per optimizer, checkpointed.

A parameter without a gradient on a micro-step adds nothing (a zero gradient); over a window
it takes one step on (sum of its gradients in the window) / k, the window's mean gradient with
a missing micro-batch counting as zero, as exact accumulation of ``.grad`` gives (kexue 8634:
add (1-β)g/k on every micro-step, decay once per window). A parameter without any gradient in
a window neither decays nor moves. The oracles are NumPy float64 and work window by window,
not micro-step by micro-step.
"""

from __future__ import annotations

import copy
import functools
import importlib
import io

import numpy as np
import pytest
import torch
from reference import tiger_step
from torch import nn

import danlu
from danlu.distributed import get_optimizer_state_dict, set_optimizer_state_dict

functional_tiger = importlib.import_module("danlu.algorithms.tiger.functional")
chunked = importlib.import_module("danlu.algorithms.tiger.fast")

TIGER = {"lr": 0.05, "beta": 0.9, "weight_decay": 0.01, "rms_floor": 1e-3}
ADAMW = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}
TIGER_PATHS = ["single", "foreach", "chunked", "triton"]
ADAMW_PATHS = ["single", "foreach"]
# (kind, shape) of the Tiger test tensors; AdamW uses the same shapes
TENSORS = [("matrix", (4, 6)), ("elementwise", (5,)), ("embedding", (3, 6))]


# ----------------------------------------------------------------------------------------------
# NumPy float64 oracles, one step per window


def _window_sum(grads, window, k, square=False):
    present = [g for g in grads[window * k : (window + 1) * k] if g is not None]
    if not present:
        return None
    return sum((np.square(g) if square else g) for g in present)


def tiger_windows(theta, grads, *, k, kind, lr, beta, weight_decay, rms_floor):
    """Tiger (k = 1) on each window's mean gradient Σg/k; windows without a gradient skipped."""
    theta = np.asarray(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    for window in range(len(grads) // k):
        total = _window_sum(grads, window, k)
        if total is not None:
            theta, m = tiger_step(
                theta, m, total / k, lr=lr, beta=beta, wd=weight_decay, kind=kind,
                rms_floor=rms_floor,
            )  # fmt: skip
    return theta, m


def adamw_windows(theta, grads, *, k, lr, betas, eps, weight_decay):
    """The blog's AdamW accumulation per window: m from Σg/k, v from Σg²/k, bias correction
    over the parameter's own update count; windows without a gradient skipped."""
    theta = np.asarray(theta, dtype=np.float64)
    m, v, n = np.zeros_like(theta), np.zeros_like(theta), 0
    for window in range(len(grads) // k):
        total = _window_sum(grads, window, k)
        if total is None:
            continue
        n += 1
        m = betas[0] * m + (1 - betas[0]) * total / k
        v = betas[1] * v + (1 - betas[1]) * _window_sum(grads, window, k, square=True) / k
        m_hat, v_hat = m / (1 - betas[0] ** n), v / (1 - betas[1] ** n)
        theta = theta * (1 - lr * weight_decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta, m


# ----------------------------------------------------------------------------------------------
# Optimizers on every path


@pytest.fixture
def route(monkeypatch):
    """route(name, path) → constructor kwargs for that implementation path; "chunked" uses
    tiny slices (so small test tensors take the sliced loop), "triton" Triton's interpreter."""
    calls = []

    def configure(name, path):
        if path == "single":
            return {"foreach": False, "fused": False} if name == "tiger" else {"foreach": False}
        if path == "foreach":
            return {"foreach": True}
        if path == "chunked":
            sliced = functools.partial(chunked.tiger_chunked, chunk=5)

            def counting(*args, **kwargs):
                calls.append("chunked")
                return sliced(*args, **kwargs)

            monkeypatch.setattr(chunked, "tiger_chunked", counting)
            return {}
        if path == "triton":
            if torch.cuda.is_available():
                # the interpreter cannot run in a process that compiles for CUDA; make
                # gpu-check compares the native kernels' accumulation micro-steps instead
                pytest.skip("Triton interpreter route: CPU-only (make gpu-check covers CUDA)")
            pytest.importorskip("triton")
            monkeypatch.setattr(functional_tiger, "select_path", lambda *a: "triton")
            return {}
        if path == "compiled":
            return {"fused": True}
        raise AssertionError(path)

    configure.calls = calls
    return configure


def make(name, params, path, route, k, **extra):
    kwargs = route(name, path)
    if name == "tiger":
        kinds = [kind for kind, _ in TENSORS]
        groups = [{"params": [p], "kind": kind} for p, kind in zip(params, kinds, strict=True)]
        return danlu.Tiger(groups, **TIGER, grad_accum_steps=k, **kwargs, **extra)
    return danlu.AdamW(params, **ADAMW, grad_accum_steps=k, **kwargs, **extra)


def new_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for _, shape in TENSORS]


def random_grads(calls, dtype=torch.float64, seed=1, present=0.55):
    """grads[call][param]: a tensor, or None where the parameter has no gradient."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(shape, generator=gen, dtype=dtype) if rng.random() < present else None
            for _, shape in TENSORS
        ]
        for _ in range(calls)
    ]


def run(opt, params, grads):
    """Step once per call; returns the calls (1-based) on which each parameter moved."""
    moved = [[] for _ in params]
    for call, call_grads in enumerate(grads, start=1):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, call_grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        for i, (p, old) in enumerate(zip(params, before, strict=True)):
            if not torch.equal(p.detach(), old):
                moved[i].append(call)
    return moved


def check_oracle(name, start, params, opt, grads, k):
    for i, ((kind, _), p0, p) in enumerate(zip(TENSORS, start, params, strict=True)):
        series = [None if call[i] is None else call[i].numpy() for call in grads]
        if name == "tiger":
            theta, m = tiger_windows(p0.numpy(), series, k=k, kind=kind, **TIGER)
        else:
            theta, m = adamw_windows(p0.numpy(), series, k=k, **ADAMW)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10, atol=1e-12)
        if p in opt.state:
            np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-10, atol=1e-13)
        else:
            assert not m.any()


PATHS = [("tiger", path) for path in TIGER_PATHS] + [("adamw", path) for path in ADAMW_PATHS]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), PATHS)
def test_a_missing_gradient_does_not_shift_the_window(name, path, route):
    """The issue's repro: k = 4, the second tensor has no gradient on call 2 of 8."""
    params = new_params(torch.float32)
    opt = make(name, params, path, route, k=4)
    grads = random_grads(8, torch.float32, present=1.0)
    grads[1][1] = None
    moved = run(opt, params, grads)
    assert moved == [[4, 8]] * 3
    assert opt.micro_step == 8
    assert all(g["micro_step"] == 8 for g in opt.param_groups)
    if path == "chunked":
        assert route.calls  # the sliced loop ran


@pytest.mark.parametrize(("name", "path"), PATHS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_missing_gradients_give_one_step_on_the_window_mean(name, path, seed, route):
    k = 3
    params = new_params(seed=seed)
    start = [p.detach().clone() for p in params]
    grads = random_grads(5 * k, seed=seed)
    # always covered: gradients early in a window but none on its last call, none in a
    # whole window, and only on the last call of a window
    grads[0][0] = grads[1][0] = torch.randn(4, 6, dtype=torch.float64)
    grads[2][0] = None
    for call in range(3, 6):
        grads[call][1] = None
    grads[6][2] = grads[7][2] = None
    grads[8][2] = torch.randn(3, 6, dtype=torch.float64)
    opt = make(name, params, path, route, k=k)
    moved = run(opt, params, grads)
    for i, calls in enumerate(moved):
        assert set(calls) <= {3, 6, 9, 12, 15}
        windows_with_grads = {
            (w + 1) * k
            for w in range(5)
            if any(grads[c][i] is not None for c in range(w * k, w * k + k))
        }
        assert set(calls) == windows_with_grads
    check_oracle(name, start, params, opt, grads, k)


def test_compiled_path_windows():
    """fused=True on CPU (the foreach math through torch.compile): kept small (one tensor)."""
    k = 2
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(4, 6, dtype=torch.float64, generator=gen))
    start = p.detach().numpy().copy()
    grads = [torch.randn(4, 6, dtype=torch.float64, generator=gen), None, None, None]
    grads[3] = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    opt = danlu.Tiger([p], **TIGER, grad_accum_steps=k, fused=True)
    assert run(opt, [p], [[g] for g in grads]) == [[2, 4]]
    series = [None if g is None else g.numpy() for g in grads]
    theta, m = tiger_windows(start, series, k=k, kind="matrix", **TIGER)
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("name", "path"), PATHS)
def test_add_param_group_mid_window_joins_the_current_window(name, path, route):
    k = 4
    params = new_params()
    start = [p.detach().clone() for p in params]
    grads = random_grads(3 * k, present=1.0, seed=5)
    kwargs = route(name, path)
    if name == "tiger":
        groups = [{"params": [params[0]], "kind": "matrix"}]
        groups.append({"params": [params[1]], "kind": "elementwise"})
        opt = danlu.Tiger(groups, **TIGER, grad_accum_steps=k, **kwargs)
    else:
        opt = danlu.AdamW(params[:2], **ADAMW, grad_accum_steps=k, **kwargs)
    for call in range(2):
        grads[call][2] = None  # not in the optimizer yet
    moved_before = run(opt, params[:2], [g[:2] for g in grads[:2]])
    if name == "tiger":
        opt.add_param_group({"params": [params[2]], "kind": "embedding"})
    else:
        opt.add_param_group({"params": [params[2]]})
    assert opt.param_groups[-1]["micro_step"] == 2
    moved_after = run(opt, params, grads[2:])
    assert moved_before == [[], []]
    assert moved_after == [[2, 6, 10]] * 3  # calls 4, 8 and 12 of the whole run
    check_oracle(name, start, params, opt, grads, k)


def _state_copy(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a, b):
    """Equal state dicts: tensors bit for bit, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(("name", "path"), PATHS)
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "distributed"])
def test_resume_mid_window_is_bit_identical(name, path, how, route):
    k = 3
    grads = random_grads(4 * k, seed=6)
    params = new_params()
    opt = make(name, params, path, route, k=k)
    run(opt, params, grads[:5])  # mid-window
    saved_params = [p.detach().clone() for p in params]
    if how == "state_dict":
        saved = _state_copy(opt)
    elif how == "deepcopy":
        twin = copy.deepcopy({"params": params, "opt": opt})
    else:
        # the helper returns the live state tensors: copied before the run goes on
        saved = copy.deepcopy(get_optimizer_state_dict(nn.ParameterList(params), opt))
    run(opt, params, grads[5:])

    if how == "deepcopy":
        params2, opt2 = twin["params"], twin["opt"]
    else:
        params2 = [nn.Parameter(p.clone()) for p in saved_params]
        opt2 = make(name, params2, path, route, k=k)
        if how == "state_dict":
            opt2.load_state_dict(saved)
        else:
            set_optimizer_state_dict(nn.ParameterList(params2), opt2, saved)
    assert opt2.micro_step == 5
    run(opt2, params2, grads[5:])
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])


@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_a_state_dict_without_the_counter_loads(name, route):
    """danlu 0.1.0 saved no optimizer-wide counter: it is taken from the per-parameter counts
    (which equal it when every parameter had a gradient on every call)."""
    k = 4
    grads = random_grads(3 * k, present=1.0, seed=7)
    params = new_params()
    opt = make(name, params, "single", route, k=k)
    run(opt, params, grads[:6])
    saved = _state_copy(opt)
    for group in saved["param_groups"]:
        del group["micro_step"]
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, grads[6:])

    params2 = [nn.Parameter(p) for p in saved_params]
    opt2 = make(name, params2, "single", route, k=k)
    opt2.load_state_dict(saved)
    assert opt2.micro_step == 6
    assert all(g["micro_step"] == 6 for g in opt2.param_groups)
    moved = run(opt2, params2, grads[6:])
    assert moved == [[2, 6]] * 3  # calls 8 and 12
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)


def test_a_torch_adamw_checkpoint_starts_a_window():
    """torch.optim.AdamW keeps no micro-step count: n updates are taken as n·k micro-steps, so
    the next call opens a window (the moments decay once)."""
    k = 2
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    reference = torch.optim.AdamW([p], **ADAMW)
    for g in ([0.5, 1.0], [-1.0, 2.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        reference.step()
    opt = danlu.AdamW([p], **ADAMW, grad_accum_steps=k)
    saved = reference.state_dict()
    # torch's groups lack danlu's keys: filled from the defaults (as load_state_dict will)
    saved["param_groups"] = [{**opt.defaults, **g} for g in saved["param_groups"]]
    opt.load_state_dict(saved)
    assert opt.micro_step == 4
    m0 = opt.state[p]["exp_avg"].clone()
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    expected = ADAMW["betas"][0] * m0 + (1 - ADAMW["betas"][0]) / k * p.grad
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_bad_counter_in_a_state_dict_is_refused_before_loading(name, route):
    params = new_params()
    opt = make(name, params, "single", route, k=2)
    run(opt, params, random_grads(3, present=1.0))
    saved = _state_copy(opt)
    before = _state_copy(opt)
    for bad in (-1, 2.5, True, "3"):
        saved["param_groups"][0]["micro_step"] = bad
        with pytest.raises(ValueError, match="micro_step"):
            opt.load_state_dict(saved)
        assert opt.micro_step == 3
        assert _same(_state_copy(opt), before)


@pytest.mark.parametrize(("name", "path"), PATHS)
def test_counters_stay_exact_beyond_2_to_the_24(name, path, route):
    k = 2
    params = new_params(torch.float32)
    opt = make(name, params, path, route, k=k)
    for group in opt.param_groups:
        group["micro_step"] = 2**24
    grads = random_grads(6, torch.float32, present=1.0, seed=8)
    grads[2][0] = None  # a missing gradient at the start of a window
    assert run(opt, params, grads) == [[2, 4, 6]] * 3
    assert opt.micro_step == 2**24 + 6
    if name == "tiger":
        assert opt.state[params[0]]["step"].dtype == torch.float64
        assert opt.state[params[0]]["step"].item() == 2**24 + 6


def test_tiger_step_counter_survives_torchs_fused_cast(route):
    """torch's load_state_dict casts "step" to float32 when the group has fused=True; beyond
    2**24 float32 cannot count micro-steps."""
    params = new_params(torch.float32)
    opt = make("tiger", params, "single", route, k=2)
    for group in opt.param_groups:
        group["micro_step"] = 2**24
    run(opt, params, random_grads(1, torch.float32, present=1.0))  # micro-step 2**24
    saved = _state_copy(opt)
    for group in saved["param_groups"]:
        group["fused"] = True
    opt2 = danlu.Tiger(
        [{"params": [p], "kind": kind} for p, (kind, _) in zip(params, TENSORS, strict=False)],
        **TIGER, grad_accum_steps=2, fused=True,
    )  # fmt: skip
    opt2.load_state_dict(saved)
    step = opt2.state[params[0]]["step"]
    assert step.dtype == torch.float64 and step.item() == 2**24 + 1
    assert opt2.micro_step == 2**24 + 1


@pytest.mark.parametrize("mode", ["skip", "shrink"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("path", TIGER_PATHS)
def test_tiger_nonfinite_micro_steps_keep_windows_aligned(mode, scope, path, route):
    params = new_params(torch.float32)
    opt = make("tiger", params, path, route, k=3, nonfinite=mode, nonfinite_scope=scope)
    grads = random_grads(9, torch.float32, present=1.0, seed=9)
    grads[1][0] = torch.full((4, 6), float("nan"))  # mid-window
    grads[3][1] = torch.full((5,), float("inf"))  # first call of a window
    moved = run(opt, params, grads)
    assert opt.micro_step == 9
    shrunk = {2, 4} if mode == "shrink" else set()  # calls whose non-finite tensors shrink
    if scope == "tensor":
        assert moved[0] == sorted({3, 6, 9} | ({2} if mode == "shrink" else set()))
        assert moved[1] == sorted({3, 6, 9} | ({4} if mode == "shrink" else set()))
        assert moved[2] == [3, 6, 9]
    else:
        for calls in moved:
            assert calls == sorted({3, 6, 9} | shrunk)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_guard_skips_keep_windows_aligned(scope, name, route):
    """NonFiniteGuard hides a skipped gradient: the micro-batch adds nothing to the window,
    whose end still comes on the k-th call."""
    k = 3
    params = new_params()
    start = [p.detach().clone() for p in params]
    inner = make(name, params, "single", route, k=k)
    opt = danlu.NonFiniteGuard(inner, mode="skip", scope=scope)
    grads = random_grads(3 * k, present=1.0, seed=10)
    bad = [list(call) for call in grads]
    bad[2][0] = torch.full((4, 6), float("nan"), dtype=torch.float64)  # ends window 1
    bad[4][1] = torch.full((5,), float("inf"), dtype=torch.float64)
    moved = run(opt, params, bad)
    assert inner.micro_step == 3 * k
    assert moved == [[3, 6, 9]] * 3
    # the oracle: a skipped tensor had no gradient on that call (all tensors, globally)
    seen = [list(call) for call in grads]
    for call, i in ((2, 0), (4, 1)):
        if scope == "global":
            seen[call] = [None] * 3
        else:
            seen[call][i] = None
    check_oracle(name, start, params, inner, seen, k)


@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_step_in_backward_counts_one_micro_step_per_iteration(name):
    """Inside backward each parameter is stepped alone; the window still advances once per
    iteration, and a parameter unused in an iteration moves at the window's end."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    twin = copy.deepcopy(model)
    k = 3

    def build(m):
        if name == "tiger":
            return danlu.Tiger(m.parameters(), lr=0.05, grad_accum_steps=k)
        return danlu.AdamW(m.parameters(), lr=0.01, grad_accum_steps=k)

    plain = build(model)
    hooked = danlu.step_in_backward(build(twin))
    uses_b = [True, True, False, True, False, False, True, False, True]
    for i, use_b in enumerate(uses_b):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        for m, opt in ((model, plain), (twin, hooked)):
            loss = m["a"](x).square().sum()
            if use_b:
                loss = loss + m["b"](x).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert plain.micro_step == hooked.optimizer.micro_step == len(uses_b)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    hooked.remove()


@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_multi_group_counter_is_shared_and_k_per_group(name, route):
    """Groups with different k read the same counter."""
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    cls = danlu.Tiger if name == "tiger" else danlu.AdamW
    opt = cls([{"params": [a], "grad_accum_steps": 2}, {"params": [b], "grad_accum_steps": 3}])
    moved = run(
        opt, [a, b], [[torch.randn(3), None if i == 0 else torch.randn(3)] for i in range(6)]
    )
    assert moved == [[2, 4, 6], [3, 6]]


@pytest.mark.parametrize("mode", ["skip", "shrink"])
@pytest.mark.parametrize("name", ["tiger", "adamw"])
def test_guard_call_with_only_skipped_gradients_still_counts(mode, name, route):
    """Found by the wrapper fuzz test: a call whose only gradients are non-finite still
    advances the window (the guard steps the inner optimizer with them hidden), so a tensor
    with a gradient earlier in the window moves on that call when it closes the window, and a
    skipped tensor moves there on what it accumulated (then shrinks, with "shrink")."""
    k = 2
    params = new_params()
    start = [p.detach().clone() for p in params]
    inner = make(name, params, "single", route, k=k)
    opt = danlu.NonFiniteGuard(inner, mode=mode, shrink_ratio=0.5)
    grads = random_grads(3 * k, present=1.0, seed=11)
    grads[0][1] = grads[1][0] = grads[1][2] = None  # call 2: only tensor 1 ...
    nan = torch.full((5,), float("nan"), dtype=torch.float64)
    bad = [list(call) for call in grads]
    bad[1][1] = nan  # ... and it is skipped
    bad[3] = [None, nan, None]  # the only gradient of call 4 (tensor 1 had one on call 3)
    moved = run(opt, params, bad)
    assert inner.micro_step == 3 * k
    # tensor 1 has no gradient in window 1 (it moves on 2 only by shrinking)
    assert moved == [[2, 4, 6], [2, 4, 6] if mode == "shrink" else [4, 6], [2, 4, 6]]
    if mode == "skip":
        seen = [list(call) for call in bad]
        seen[1][1] = seen[3][1] = None
        check_oracle(name, start, params, inner, seen, k)

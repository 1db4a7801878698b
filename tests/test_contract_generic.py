"""The generic optimizer contract, over every registered optimizer and every wrapper.

Modelled on PyTorch's own ``OptimizerInfo`` tests (torch/testing/_internal/common_optimizers.py):
what any ``torch.optim.Optimizer`` promises its users, independent of the math. A newly
registered optimizer is covered automatically. The two-phase promise (a failed step or load
leaves parameters and state exactly as they were) is checked bit for bit: every parameter and
every state tensor, dtype included.
"""

import copy
import io

import numpy as np
import pytest
import torch
from optimizer_cases import CASES
from torch import nn

import danlu
from danlu.registry import REGISTRY

NAMES = sorted(REGISTRY)
SHAPES = [(6, 5), (5,), (7, 4)]


def make(name, params, **overrides):
    return REGISTRY[name].cls(params, **{**CASES[name]["kwargs"], **overrides})


def new_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES
    ]


def named(params):
    return [(f"layer{i}.weight", p) for i, p in enumerate(params)]


def grads_for(step, seed=100, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def run(opt, params, steps, start=0, seed=100):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(t, seed, params[0].dtype), strict=True):
            p.grad = g.clone()
        opt.step()


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_identical(a, b, path="snapshot"):
    """Equal bit for bit: tensors with dtype and device, containers key by key."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


def trained(name, seed=0, steps=2, **overrides):
    params = new_params(seed)
    opt = make(name, named(params), **overrides)
    run(opt, params, steps)
    return params, opt


# -- learning rates and other hyper-parameters ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_of_every_shape_torch_accepts_equals_float_lr(name, shape):
    lr = CASES[name]["kwargs"]["lr"]
    p1, p2 = new_params(), new_params()
    o1 = make(name, p1, lr=lr)
    o2 = make(name, p2, lr=torch.full(shape, lr))
    # the scheduler's in-place write reaches the lr the optimizer reads
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    for t in range(4):
        run(o1, p1, 1, start=t)
        run(o2, p2, 1, start=t)
        s1.step()
        s2.step()
    assert float(o2.param_groups[0]["lr"]) == pytest.approx(lr / 4)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_scalar_hyper_parameters(name):
    floats = {k: v for k, v in CASES[name]["kwargs"].items() if type(v) is float}
    ints = {k: v for k, v in CASES[name]["kwargs"].items() if type(v) is int}
    as_numpy = {k: np.float32(v) for k, v in floats.items()} | {
        k: np.int64(v) for k, v in ints.items()
    }
    as_python = {k: float(np.float32(v)) for k, v in floats.items()} | ints
    p1, p2 = new_params(), new_params()
    o1 = make(name, p1, **as_python)
    o2 = make(name, p2, **as_numpy)
    for key in as_numpy:
        assert type(o2.param_groups[0][key]) in (float, int), key
    run(o1, p1, 2)
    run(o2, p2, 2)
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    buffer = io.BytesIO()
    torch.save(o2.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # no numpy object left in the state dict


BAD_LRS = {
    "bool tensor": lambda: torch.tensor(True),
    "two-element tensor": lambda: torch.tensor([1e-3, 2e-3]),
    "meta tensor": lambda: torch.tensor(1e-3, device="meta"),
    "complex tensor": lambda: torch.tensor(1e-3 + 0j),
    "numpy bool": lambda: np.bool_(True),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", sorted(BAD_LRS))
def test_invalid_lr_raises_naming_lr_and_nothing_moves(name, bad):
    with pytest.raises(ValueError, match="lr"):
        make(name, new_params(), lr=BAD_LRS[bad]())
    params, opt = trained(name)
    before = snapshot(opt, params)
    opt.param_groups[0]["lr"] = BAD_LRS[bad]()
    for p, g in zip(params, grads_for(7), strict=True):
        p.grad = g
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = before[1]["param_groups"][0]["lr"]
    assert_identical(before, snapshot(opt, params))


# -- parameters and gradients that cannot be stepped ----------------------------------------------

BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_unsupported_parameter_dtypes_are_refused_naming_the_parameter(name, dtype):
    bad = torch.zeros(3, 2).to(dtype)
    with pytest.raises(ValueError, match=r"'odd\.weight'.*" + str(dtype).split(".")[1]):
        make(name, [("good.weight", nn.Parameter(torch.ones(2))), ("odd.weight", bad)])
    _, opt = trained(name)
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=str(dtype).split(".")[1]):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == groups


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mismatch", ["dtype", "shape"])
def test_gradient_unlike_its_parameter_is_refused_and_nothing_moves(name, mismatch):
    params, opt = trained(name)
    before = snapshot(opt, params)
    for p, g in zip(params, grads_for(9), strict=True):
        p.grad = g
    last = params[-1]
    odd = last.grad.double() if mismatch == "dtype" else torch.zeros(last.shape[0] + 1)
    last.grad.data = odd  # `p.grad = odd` is refused by autograd; `.data` is not
    with pytest.raises(ValueError, match=r"'layer2\.weight'.*gradient|gradient.*'layer2\.weight'"):
        opt.step()
    assert_identical(before, snapshot(opt, params))


# -- checkpoints ----------------------------------------------------------------------------------


def counters(opt):
    return {
        (i, key): value
        for i, entry in opt.state_dict()["state"].items()
        for key, value in entry.items()
        if key in type(opt)._counter_keys
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", [float, int])
def test_step_saved_as_a_number_loads_and_steps_as_the_tensor_does(name, kind):
    params, opt = trained(name)
    as_numbers = copy.deepcopy(opt.state_dict())
    for entry in as_numbers["state"].values():
        # an optimizer without a counter (Lion) gets one, as a checkpoint of another may hold
        entry["step"] = kind(entry["step"].item()) if "step" in entry else kind(2)
    restored_params = [nn.Parameter(p.detach().clone()) for p in params]
    restored = make(name, named(restored_params))
    restored.load_state_dict(as_numbers)
    for key, loaded in counters(restored).items():
        assert torch.is_tensor(loaded) and loaded.device.type == "cpu", key
        value = counters(opt).get(key)
        if value is not None:
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
    run(opt, params, 2, start=2)
    run(restored, restored_params, 2, start=2)
    for a, b in zip(params, restored_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_weights_only_load_then_step_continues_bit_for_bit(name):
    params, opt = trained(name)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored_params = [nn.Parameter(p.detach().clone()) for p in params]
    restored = make(name, named(restored_params))
    restored.load_state_dict(loaded)
    assert_identical(opt.state_dict(), restored.state_dict())
    run(opt, params, 2, start=2)
    run(restored, restored_params, 2, start=2)
    for a, b in zip(params, restored_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in NAMES if "fused" in REGISTRY[n].defaults])
def test_counters_keep_an_exact_dtype_through_loads_into_fused_groups(name):
    """torch casts 'step' to float32 for fused groups (counting stops at 2**24); danlu keeps
    the saved dtype, on the CPU, and a count beyond float32 exactly."""
    params, opt = trained(name)
    saved = copy.deepcopy(opt.state_dict())
    dtypes = {key: value.dtype for key, value in counters(opt).items()}
    fused = make(name, named([nn.Parameter(p.detach().clone()) for p in params]), fused=True)
    fused.load_state_dict(saved)
    again = make(name, named([nn.Parameter(p.detach().clone()) for p in params]), fused=True)
    again.load_state_dict(fused.state_dict())
    for key, value in counters(again).items():
        assert value.dtype == dtypes[key] and value.device.type == "cpu", key
    big = 2**24 + 1
    for entry in saved["state"].values():
        entry["step"] = torch.tensor(big, dtype=torch.float64)
    fused.load_state_dict(saved)
    assert all(float(v) == big for v in counters(fused).values())
    for entry in saved["state"].values():
        entry["step"] = big  # a Python int
    fused.load_state_dict(saved)
    assert all(float(v) == big for v in counters(fused).values())


def _rescale_group(sd):
    sd["param_groups"][0]["lr"] = -1.0


def _drop_group(sd):
    sd["param_groups"].pop()


def _short_group(sd):
    sd["param_groups"][-1]["params"].pop()


def _resized_state(sd):
    entry = sd["state"][max(sd["state"])]
    key = next(k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0)
    entry[key] = torch.zeros(tuple(s + 1 for s in entry[key].shape))


def _integer_state(sd):
    entry = sd["state"][max(sd["state"])]
    key = next(k for k, v in entry.items() if torch.is_tensor(v) and v.dim() > 0)
    entry[key] = entry[key].to(torch.int64)


def _bad_step(sd):
    sd["state"][max(sd["state"])]["step"] = float("nan")


def _text_step(sd):
    sd["state"][max(sd["state"])]["step"] = "three"


def _amsgrad(sd):
    sd["param_groups"][-1]["amsgrad"] = True


def _not_a_state_dict(sd):
    sd.pop("state")


CORRUPTIONS = {
    "bad lr in a group": _rescale_group,
    "missing group": _drop_group,
    "group of another size": _short_group,
    "state of a resized parameter": _resized_state,
    "integer state tensor": _integer_state,
    "NaN step": _bad_step,
    "text step": _text_step,
    "feature danlu lacks (amsgrad=True)": _amsgrad,
    "no 'state'": _not_a_state_dict,
}


def two_groups(name, seed):
    params = new_params(seed)
    groups = [
        {"params": params[:1], "param_names": ["layer0.weight"]},
        {"params": params[1:], "param_names": ["layer1.weight", "layer2.weight"]},
    ]
    opt = make(name, groups)
    run(opt, params, 2, seed=seed)
    return params, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_every_load_error_names_the_problem_and_changes_nothing(name, corruption):
    _, source = two_groups(name, seed=1)
    sd = copy.deepcopy(source.state_dict())
    CORRUPTIONS[corruption](sd)
    params, opt = two_groups(name, seed=2)  # different values: a half-load would show
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(sd)
    assert_identical(before, snapshot(opt, params))
    message = str(error.value)
    if corruption in ("state of a resized parameter", "integer state tensor", "NaN step"):
        assert "'layer2.weight'" in message
    if corruption == "bad lr in a group":
        assert "param_groups[0]" in message and "lr" in message


@pytest.mark.parametrize("name", NAMES)
def test_resized_embedding_is_refused_at_load_naming_it(name):
    torch.manual_seed(0)
    small = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6))
    opt = danlu.create_optimizer(name, small, **CASES[name]["kwargs"])
    small(torch.tensor([[1, 2, 3]])).pow(2).sum().backward()
    opt.step()
    big = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 6))
    target = danlu.create_optimizer(name, big, **CASES[name]["kwargs"])
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"'0\.weight'.*shape|shape.*'0\.weight'"):
        target.load_state_dict(opt.state_dict())
    assert_identical(before, target.state_dict())


def test_missing_group_keys_are_filled_and_loaded_values_checked():
    params, opt = trained("tiger")
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["grad_accum_steps"], group["maximize"], group["nonfinite"]
    fresh = make("tiger", named([nn.Parameter(p.detach().clone()) for p in params]))
    fresh.load_state_dict(sd)
    for key in ("grad_accum_steps", "maximize", "nonfinite"):
        assert fresh.param_groups[0][key] == opt.param_groups[0][key]
    run(fresh, fresh.param_groups[0]["params"], 1, start=2)


# -- checkpoints of other libraries -------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_torch_adamw_checkpoint_continues_in_danlu_adamw(foreach):
    kw = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    theirs_params = new_params()
    theirs = torch.optim.AdamW(theirs_params, foreach=foreach, **kw)
    run(theirs, theirs_params, 3)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours_params = [nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours = danlu.AdamW(ours_params, foreach=foreach)  # settings come from the checkpoint
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    assert ours.param_groups[0]["lr"] == kw["lr"]
    run(theirs, theirs_params, 3, start=3)
    run(ours, ours_params, 3, start=3)
    for a, b in zip(theirs_params, ours_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for a, b in zip(theirs_params, ours_params, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours.state[b][key], theirs.state[a][key])


def test_torch_adamw_amsgrad_and_adam_checkpoints_are_refused():
    for cls, kw, flag in (
        (torch.optim.AdamW, {"amsgrad": True}, "amsgrad"),
        (torch.optim.Adam, {"weight_decay": 0.1}, "decoupled_weight_decay"),
    ):
        params = new_params()
        theirs = cls(params, **kw)
        run(theirs, params, 1)
        ours = danlu.AdamW([nn.Parameter(p.detach().clone()) for p in params])
        before = copy.deepcopy(ours.state_dict())
        with pytest.raises(ValueError, match=flag):
            ours.load_state_dict(theirs.state_dict())
        assert_identical(before, ours.state_dict())


def test_lion_pytorch_checkpoint_continues_in_danlu_lion():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    kw = {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.1}
    theirs_params = new_params()
    theirs = lion_pytorch.Lion(theirs_params, **kw)
    run(theirs, theirs_params, 3)
    ours_params = [nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours = danlu.Lion(ours_params)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["betas"] == kw["betas"]
    run(theirs, theirs_params, 3, start=3)
    run(ours, ours_params, 3, start=3)
    for a, b in zip(theirs_params, ours_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# -- hooks, copies, printing ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_fire(name):
    params, opt = trained(name, steps=0)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    run(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_steps_like_the_original(name):
    params, opt = trained(name)
    twin = copy.deepcopy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(a is not b for a, b in zip(params, twin_params, strict=True))
    run(opt, params, 2, start=2)
    run(twin, twin_params, 2, start=2)
    for a, b in zip(params, twin_params, strict=True):
        assert torch.equal(a, b)
    assert_identical(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_repr_prints_the_class_and_settings(name):
    _, opt = trained(name, steps=0, lr=torch.tensor([1e-3]))
    text = repr(opt)
    assert type(opt).__name__ in text and "lr" in text


# -- wrappers -------------------------------------------------------------------------------------


def _accumulation(params):
    return danlu.GradientAccumulation(danlu.Tiger(named(params), lr=1e-2), 3)


def _update_every(params):
    return danlu.UpdateEvery(danlu.AdamW(named(params), lr=1e-2), 3)


def _guard(params):
    return danlu.NonFiniteGuard(danlu.Lion(named(params), lr=1e-3), mode="skip")


def _lazy(params):
    return danlu.Lazy(danlu.AdamW(named(params), lr=1e-2), params=params[:1], lazy_moments=True)


def _in_backward(params):
    return danlu.step_in_backward(danlu.AdaFactor(named(params), lr=1e-2))


def _multi(params):
    return danlu.MultiOptimizer(
        {
            "first": danlu.AdamW(named(params[:2]), lr=1e-2),
            "second": danlu.Tiger([("layer2.weight", params[2])], lr=1e-2),
        }
    )


def _nested(params):
    return danlu.GradientAccumulation(danlu.NonFiniteGuard(danlu.Amos(named(params))), 3)


WRAPPERS = {
    "GradientAccumulation": _accumulation,
    "UpdateEvery": _update_every,
    "NonFiniteGuard": _guard,
    "Lazy": _lazy,
    "step_in_backward": _in_backward,
    "MultiOptimizer": _multi,
    "nested": _nested,
}


def _inner_states(sd):
    """Every bare optimizer's state dict inside ``sd`` (one, or one per MultiOptimizer part)."""
    return list(sd["optimizers"].values()) if "optimizers" in sd else [sd]


def _last_inner_resized(sd):
    _resized_state(_inner_states(sd)[-1])


def _last_inner_bad_lr(sd):
    _inner_states(sd)[-1]["param_groups"][0]["lr"] = float("nan")


def _bad_record(sd):
    if "optimizers" in sd:  # MultiOptimizer: a part that does not exist
        sd["optimizers"]["third"] = sd["optimizers"]["first"]
        return
    record = sd["danlu_wrappers"][-1]
    if record["type"] == "GradientAccumulation":
        record["sums"] = {0: torch.zeros(2, 2)}
    elif record["type"] == "NonFiniteGuard":
        record["last_nonfinite"] = 3
    else:
        record["type"] = "Something"


def _accumulation_index(sd):
    if "danlu_wrappers" in sd and sd["danlu_wrappers"][-1]["type"] == "GradientAccumulation":
        sd["danlu_wrappers"][-1]["sums"] = {99: torch.zeros(1)}
    else:
        _last_inner_resized(sd)


WRAPPER_CORRUPTIONS = {
    "inner state of a resized parameter": _last_inner_resized,
    "inner group with a NaN lr": _last_inner_bad_lr,
    "bad wrapper record": _bad_record,
    "running sum of a parameter that does not exist": _accumulation_index,
}


def wrapped(kind, seed):
    params = new_params(seed)
    opt = WRAPPERS[kind](params)
    for t in range(4):  # 4 micro-steps: mid-window for the accumulating wrappers
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads_for(t, seed), strict=True))
        loss.backward()
        opt.step()
    return params, opt


def wrapper_snapshot(opt, params):
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    return [p.detach().clone() for p in params], grads, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
@pytest.mark.parametrize("corruption", sorted(WRAPPER_CORRUPTIONS))
def test_every_wrapper_load_error_changes_nothing(kind, corruption):
    _, source = wrapped(kind, seed=1)
    sd = copy.deepcopy(source.state_dict())
    WRAPPER_CORRUPTIONS[corruption](sd)
    params, opt = wrapped(kind, seed=2)
    before = wrapper_snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_identical(before, wrapper_snapshot(opt, params))
    # and the intact state dict still loads and steps
    opt.load_state_dict(copy.deepcopy(source.state_dict()))
    assert_identical(copy.deepcopy(source.state_dict()), opt.state_dict())


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_wrapper_hooks_fire_and_repr_prints(kind):
    _, opt = wrapped(kind, seed=0)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]
    assert repr(opt)


def _bad_gradient(params):
    if params[-1].grad is None:  # step_in_backward freed it: a gradient set by hand
        params[-1].grad = torch.zeros_like(params[-1])
    params[-1].grad.data = torch.zeros(params[-1].shape[0] + 1)


def _bad_lr(opt):
    for group in opt.param_groups:
        group["lr"] = float("nan")


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
@pytest.mark.parametrize("fault", ["gradient unlike its parameter", "NaN lr"])
def test_every_wrapper_step_that_raises_changes_nothing(kind, fault):
    params, opt = wrapped(kind, seed=0)
    opt.zero_grad()
    loss = sum((p * g).sum() for p, g in zip(params, grads_for(9), strict=True))
    loss.backward()
    if fault == "NaN lr":
        _bad_lr(opt)
        if kind in ("GradientAccumulation", "nested"):
            opt.step()  # mid-window: the inner step (which raises) comes on the next call
    else:
        _bad_gradient(params)
    if kind == "step_in_backward" and fault == "NaN lr":
        # the parameters were stepped inside backward; a hand-set gradient reaches step()
        params[0].grad = torch.ones_like(params[0])
    before = wrapper_snapshot(opt, params)
    lrs = [group["lr"] for group in opt.param_groups]
    with pytest.raises(ValueError, match="lr" if fault == "NaN lr" else "'layer2.weight'"):
        opt.step()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        assert group["lr"] is lr
    assert_identical(before, wrapper_snapshot(opt, params))

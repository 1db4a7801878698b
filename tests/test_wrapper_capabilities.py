"""One wrapper mechanism (danlu.wrappers._base.WrapperBase): every wrapper declares its
capabilities, the checks read the declarations (so a wrapper written outside danlu takes part
by declaring them), and no code of danlu writes torch's private optimizer attributes."""

import ast
import copy
import pathlib

import pytest
import torch
from lora_models import batch, two_adapter_model
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import danlu
from danlu.distributed import get_optimizer_state_dict, set_optimizer_state_dict
from danlu.wrappers import OptimizerWrapper
from danlu.wrappers._base import WrapperBase, counts_windows, unwrap

SRC = pathlib.Path(danlu.__file__).parent

FLAGS = ("holds_several", "holds_gradients", "carries_window", "withholds_gradients")
METHODS = ("parts", "owner", "keeps_window", "ends_window", "refuses_per_parameter")


def params(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(3, 4, generator=gen)) for _ in range(n)]


def lora_pro():
    return danlu.lora.LoRAPro(two_adapter_model(), lr=1e-2)


#: class → (a fresh instance, the capabilities it must declare). Written from each wrapper's
#: documented behaviour, not read from the code.
def instances():
    ps = params(4)
    return {
        "GradientAccumulation": (
            danlu.GradientAccumulation(danlu.Tiger(ps[:1]), 2),
            {"holds_gradients": True, "records_state": True, "keeps_window": True},
        ),
        "UpdateEvery": (
            danlu.UpdateEvery(torch.optim.SGD(ps[:1], lr=0.1), 3),
            {"carries_window": True, "records_state": True, "keeps_window": True},
        ),
        "Lazy": (
            danlu.Lazy(torch.optim.SGD(ps[1:2], lr=0.1), params=[ps[1]]),
            {"records_state": True, "per_parameter": True},
        ),
        "NonFiniteGuard": (
            danlu.NonFiniteGuard(torch.optim.SGD(ps[:1], lr=0.1)),
            {"withholds_gradients": True, "records_state": True, "per_parameter": True},
        ),
        "StepInBackward": (
            danlu.step_in_backward(torch.optim.SGD(ps[2:3], lr=0.1)),
            {"records_state": True},
        ),
        "MultiOptimizer": (
            danlu.MultiOptimizer([torch.optim.SGD(ps[:2], lr=0.1), danlu.Tiger(ps[2:])]),
            {"holds_several": True, "keeps_window": True},
        ),
        "LoRAPro": (lora_pro(), {}),
    }


def test_every_wrapper_is_a_wrapper_base():
    exported = {
        name
        for name in danlu.wrappers.__all__
        if isinstance(getattr(danlu.wrappers, name), type)
        and issubclass(getattr(danlu.wrappers, name), torch.optim.Optimizer)
    }
    assert exported - {"OptimizerWrapper"} <= set(instances())
    for name in [*exported, "LoRAPro"]:
        cls = getattr(danlu.wrappers, name, None) or getattr(danlu.lora, name)
        assert issubclass(cls, WrapperBase), name


@pytest.mark.parametrize("name", sorted(instances()))
def test_every_wrapper_declares_every_capability(name):
    wrapper, expected = instances()[name]
    for flag in FLAGS:
        value = getattr(type(wrapper), flag)
        assert isinstance(value, bool) and value == expected.get(flag, False), (name, flag)
    records = type(wrapper).records_state
    assert isinstance(records, bool) and records == expected.get("records_state", False)
    for method in METHODS:
        assert callable(getattr(wrapper, method)), (name, method)
    assert wrapper.keeps_window() == expected.get("keeps_window", False)
    refusal = wrapper.refuses_per_parameter("optimizer")
    if expected.get("per_parameter", False):
        assert refusal is None
    else:
        assert isinstance(refusal, str) and refusal.startswith("optimizer")
    parts = wrapper.parts()
    assert parts and all(isinstance(p, torch.optim.Optimizer) for p in parts.values())
    assert (len(parts) > 1) == wrapper.holds_several
    for part in parts.values():  # each parameter is stepped by the part that holds it
        for group in part.param_groups:
            for p in group["params"]:
                assert wrapper.owner(p) is part
    assert wrapper.owner(nn.Parameter(torch.zeros(1))) is None


def test_state_dict_records_follow_records_state():
    for name, (wrapper, _) in instances().items():
        saved = wrapper.state_dict()
        if name == "MultiOptimizer":
            assert set(saved) == {"optimizers"}
        elif wrapper.records_state:
            assert saved["danlu_wrappers"][-1]["type"] == name
        else:
            assert "danlu_wrappers" not in saved
            assert saved.keys() == wrapper.optimizer.state_dict().keys()


def test_the_window_capabilities_follow_the_micro_steps():
    p = params(1)[0]
    acc = danlu.GradientAccumulation(torch.optim.SGD([p], lr=0.1), 2)
    every = danlu.UpdateEvery(torch.optim.SGD([p], lr=0.1), 2)
    assert not danlu.GradientAccumulation(torch.optim.SGD([p], lr=0.1), 1).keeps_window()
    assert not danlu.UpdateEvery(torch.optim.SGD([p], lr=0.1), 1).keeps_window()
    for wrapper in (acc, every):
        ends = []
        for _ in range(4):
            ends.append(wrapper.ends_window())
            p.grad = torch.ones_like(p)
            wrapper.step()
        assert ends == [False, True, False, True]
    guard = danlu.NonFiniteGuard(torch.optim.SGD([p], lr=0.1), scope="global")
    assert guard.refuses_per_parameter("x") is not None


# -- a wrapper written outside danlu takes part by declaring capabilities ------------------------


class Counting(OptimizerWrapper):
    """A user's wrapper that declares nothing: it counts the inner steps."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return self.optimizer.step(closure)


class WindowOfTwo(Counting):
    def keeps_window(self):
        return True


class HoldsGradients(Counting):
    holds_gradients = True


class NoRecord(Counting):
    records_state = False


class NotPerParameter(Counting):
    def refuses_per_parameter(self, where):
        return f"{where}: NotPerParameter steps whole models"


def test_a_user_wrapper_that_keeps_a_window_is_stepped_by_the_guard():
    """A NonFiniteGuard steps a windowed optimizer even when every gradient is skipped (its
    window stays aligned); otherwise it skips the step."""
    for cls, stepped in ((Counting, 0), (WindowOfTwo, 1)):
        p = params(1)[0]
        inner = cls(torch.optim.SGD([p], lr=0.1))
        assert counts_windows(inner) == (cls is WindowOfTwo)
        guard = danlu.NonFiniteGuard(inner)
        p.grad = torch.full_like(p, float("nan"))
        before = p.detach().clone()
        guard.step()
        assert inner.calls == stepped, cls
        assert torch.equal(p, before)
        assert torch.isnan(p.grad).all()  # the user's gradient is put back


def test_a_user_wrapper_that_holds_gradients_must_be_outside_the_guard():
    p = params(1)[0]
    with pytest.raises(ValueError, match=r"HoldsGradients\(NonFiniteGuard\(opt\)"):
        danlu.NonFiniteGuard(HoldsGradients(torch.optim.SGD([p], lr=0.1)))
    danlu.NonFiniteGuard(Counting(torch.optim.SGD([p], lr=0.1)))  # declares nothing: accepted
    danlu.GradientAccumulation(danlu.NonFiniteGuard(torch.optim.SGD([p], lr=0.1)), 2)


def test_a_user_wrapper_refusing_per_parameter_steps_is_refused_in_backward():
    a, b = params(2)
    with pytest.raises(ValueError, match="optimizer: NotPerParameter steps whole models"):
        danlu.step_in_backward(NotPerParameter(torch.optim.SGD([a], lr=0.1)))
    multi = danlu.MultiOptimizer(
        {"x": torch.optim.SGD([a], lr=0.1), "y": NotPerParameter(torch.optim.SGD([b], lr=0.1))}
    )
    with pytest.raises(ValueError, match=r"optimizer\['y'\]: NotPerParameter"):
        danlu.step_in_backward(multi)
    with pytest.raises(ValueError, match=r"optimizer\['y'\]: NotPerParameter"):
        danlu.step_in_backward(
            danlu.MultiOptimizer({"y": NotPerParameter(Counting(torch.optim.SGD([b], lr=0.1)))})
        )


def test_a_user_wrapper_declaring_nothing_is_transparent():
    """unwrap goes through it, and inside backward each parameter takes the ordinary step."""
    a, b = params(2, seed=3)
    ref = [nn.Parameter(p.detach().clone()) for p in (a, b)]
    wrapped = Counting(torch.optim.SGD([a, b], lr=0.1, momentum=0.9))
    assert [type(o) for o in unwrap(wrapped)] == [Counting, torch.optim.SGD]
    opt = danlu.step_in_backward(wrapped)
    plain = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        ((x @ a.T).sin().sum() + (x @ b.T).square().sum()).backward()
        opt.step()
        plain.zero_grad()
        ((x @ ref[0].T).sin().sum() + (x @ ref[1].T).square().sum()).backward()
        plain.step()
    for p, q in zip((a, b), ref, strict=True):
        assert torch.equal(p, q)
    assert wrapped.calls == 6  # one per parameter per backward


def test_a_user_wrapper_without_a_record_is_left_out_of_distributed_checkpoints():
    model = nn.Linear(4, 3)
    opt = danlu.GradientAccumulation(NoRecord(danlu.Tiger(model.parameters(), lr=1e-2)), 2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert [r["type"] for r in opt.state_dict()["danlu_wrappers"]] == ["GradientAccumulation"]
    saved = get_optimizer_state_dict(model, opt)
    assert [r["type"] for r in saved["danlu_wrappers"]] == ["GradientAccumulation"]
    twin = danlu.GradientAccumulation(NoRecord(danlu.Tiger(model.parameters(), lr=1e-2)), 2)
    set_optimizer_state_dict(model, twin, copy.deepcopy(saved))
    for key, value in opt.optimizer.state[model.weight].items():
        assert torch.equal(twin.optimizer.state[model.weight][key], value)


# -- LoRA-Pro is a wrapper now -------------------------------------------------------------------


def test_lora_pro_is_refused_inside_backward_before_any_step():
    """It adjusts both factors of an adapter together: refused at construction (before, the
    first backward raised from inside autograd)."""
    with pytest.raises(ValueError, match="LoRAPro adjusts the gradients"):
        danlu.step_in_backward(lora_pro())


def test_lora_pro_checkpoint_hooks_fire_and_a_copy_steps_like_the_original():
    opt = lora_pro()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]

    model = two_adapter_model()
    opt = danlu.lora.LoRAPro(model, lr=1e-2)
    x, y = batch()
    for _ in range(2):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = danlu.lora.LoRAPro(twin_model, lr=1e-2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    copied = copy.deepcopy({"model": model, "opt": opt})  # the optimizer follows its model
    for m, o in ((model, opt), (twin_model, twin), (copied["model"], copied["opt"])):
        for _ in range(2):
            o.zero_grad()
            (m(x) - y).square().mean().backward()
            o.step()
    for p, q, r in zip(
        model.parameters(), twin_model.parameters(), copied["model"].parameters(), strict=True
    ):
        assert torch.equal(p, q) and torch.equal(p, r)


# -- torch's bookkeeping ---------------------------------------------------------------------------


def test_wrapping_leaves_the_inner_defaults_alone():
    inner = danlu.Tiger(params(1), lr=1e-3)
    before = dict(inner.defaults)
    for wrapper in (
        danlu.GradientAccumulation(inner, 2),
        danlu.NonFiniteGuard(inner),
        danlu.UpdateEvery(inner, 2),
        danlu.MultiOptimizer([inner]),
    ):
        assert wrapper.defaults is not None
    assert inner.defaults == before


def _hook_order(opt):
    """The order in which torch's or the wrapper's registry calls the checkpoint hooks,
    with prepend and a removed handle."""
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("a"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("b"), prepend=True)
    gone = opt.register_state_dict_pre_hook(lambda o: calls.append("c"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("d"), prepend=True)
    gone.remove()
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "marked": True})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "marked"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("loaded"), prepend=True)
    saved = opt.state_dict()
    assert saved["marked"] is True
    opt.load_state_dict(saved)
    return calls


def test_checkpoint_hooks_behave_as_torchs():
    expected = _hook_order(torch.optim.SGD(params(1), lr=0.1))
    assert expected == ["d", "b", "a", "loaded"]
    for wrapper in (
        danlu.GradientAccumulation(torch.optim.SGD(params(1), lr=0.1), 2),
        danlu.MultiOptimizer([torch.optim.SGD(params(1), lr=0.1)]),
        lora_pro(),
    ):
        assert _hook_order(wrapper) == expected


def test_step_hooks_are_torchs_and_survive_a_copy():
    opt = danlu.NonFiniteGuard(torch.optim.SGD(params(1), lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", type(o).__name__)))
    handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append(("global", type(o).__name__))
    )
    try:
        opt.step()
        copy.deepcopy(opt).step()
    finally:
        handle.remove()
    guard = "NonFiniteGuard"
    # the inner SGD's step runs the global hook too
    assert calls == [("pre", guard), ("global", "SGD"), ("global", guard)] * 2


# -- no writes to torch's private attributes -------------------------------------------------------


def _torch_private_names() -> set[str]:
    """The private attributes torch keeps on an optimizer (hook registries, profiling names, the
    lr scheduler's step counter flag), read from torch itself, and the private method that
    rewrites the class's ``step``."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.step()
    scheduler.step()
    names = {name for name in vars(opt) if name.startswith("_")}
    assert "_optimizer_step_pre_hooks" in names and "_opt_called" in names
    assert callable(torch.optim.Optimizer._patch_step_function)
    return names | {"_patch_step_function"}


MUTATORS = {"clear", "update", "pop", "popitem", "setdefault", "move_to_end", "__setitem__"}


def private_writes(source: str, names: set[str]) -> list[str]:
    """Each place in ``source`` that assigns, deletes or mutates one of ``names`` as an
    attribute, calls ``_patch_step_function``, or names one in a string (setattr, vars())."""
    found = []
    for node in ast.walk(ast.parse(source)):
        target = None
        if isinstance(node, ast.Attribute) and node.attr in names:
            if isinstance(node.ctx, ast.Store | ast.Del) or node.attr == "_patch_step_function":
                target = node
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del):
            if isinstance(node.value, ast.Attribute) and node.value.attr in names:
                target = node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if (
                node.func.attr in MUTATORS
                and isinstance(owner, ast.Attribute)
                and owner.attr in names
            ):
                target = node
        elif isinstance(node, ast.Constant) and node.value in names:
            target = node
        if target is not None:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_each_kind_of_write():
    names = _torch_private_names()
    old = "\n".join(
        [
            "opt._optimizer_step_pre_hooks = OrderedDict()",
            "opt._patch_step_function()",
            "self._optimizer_state_dict_pre_hooks[handle.id] = hook",
            "del opt._opt_called",
            "opt._optimizer_load_state_dict_post_hooks.clear()",
            "setattr(opt, '_zero_grad_profile_name', 'x')",
            "opt._optimizer_step_post_hooks.move_to_end(1)",
        ]
    )
    assert len(private_writes(old, names)) == 7
    reads = "for hook in opt._optimizer_load_state_dict_pre_hooks.values():\n    hook(opt)\n"
    assert private_writes(reads, names) == []


def test_no_code_of_danlu_writes_torchs_private_optimizer_attributes():
    names = _torch_private_names()
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = {
        str(path.relative_to(SRC)): writes
        for path in files
        if (writes := private_writes(path.read_text(), names))
    }
    assert found == {}

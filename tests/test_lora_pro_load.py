"""LoRA-Pro's load_state_dict: checked in full before anything changes (both modes).

A state dict that cannot be stepped (moments of the wrong shape, an incomplete entry, a
non-tensor moment, another lora_scale, bad hyper-parameters) raises a ValueError naming the
parameter and leaves the optimizer exactly as it was; one that can be stepped loads and the
next steps equal those of the optimizer it was saved from.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import batch, two_adapter_model

from danlu.lora import LoRAPro

F64 = torch.float64


def train(model, opt, seeds, dtype=F64):
    for seed in seeds:
        opt.zero_grad()
        x, y = batch(dtype, seed)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def trained(mode, dtype=F64):
    model = two_adapter_model(dtype)
    opt = LoRAPro(model, mode=mode, lr=1e-2, weight_decay=0.01)
    train(model, opt, [1, 2], dtype)
    return model, opt


def adapter_state_id(opt, layer):
    """The state-dict id of the state entry keyed by ``layer.lora_A``."""
    flat = [p for g in opt.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(flat) if p is layer.lora_A)


def lora_B_id(opt, layer):
    flat = [p for g in opt.param_groups for p in g["params"]]
    return next(i for i, p in enumerate(flat) if p is layer.lora_B)


def assert_load_refused(opt, model, state_dict, match):
    """The load raises ValueError matching ``match``; the optimizer is as it was: its state
    dict, its groups (the same objects) and the next steps (against a twin never touched)."""
    twin_model = copy.deepcopy(model)
    twin = LoRAPro(twin_model, mode=opt.mode, lr=1e-2, weight_decay=0.01)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = copy.deepcopy(opt.state_dict())
    groups = opt.param_groups
    group_objects = [id(g) for g in groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    torch.testing.assert_close(after["state"], before["state"], rtol=0, atol=0)
    assert opt.param_groups is groups and [id(g) for g in opt.param_groups] == group_objects
    assert opt.state is opt.inner.state and opt.param_groups is opt.inner.param_groups
    train(model, opt, [3, 4])
    train(twin_model, twin, [3, 4])
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


# -- full mode (LoRAProAdam: out×in moments keyed by lora_A) --------------------------------


def test_full_mode_moments_of_the_wrong_shape_are_refused_naming_the_adapter():
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    i = adapter_state_id(opt, model[2])
    saved["state"][i]["exp_avg_sq"] = torch.zeros(5, 7, dtype=F64)  # out×in is 5×8
    assert_load_refused(
        opt, model, saved, r"lora_A of adapter '2'.*'exp_avg_sq'.*\(5, 7\).*\(5, 8\)"
    )


def test_full_mode_refuses_an_efficient_mode_checkpoint():
    """mode='efficient' keeps A- and B-shaped moments: its checkpoint cannot drive full mode."""
    model, opt = trained("full")
    _, efficient = trained("efficient")
    assert_load_refused(opt, model, copy.deepcopy(efficient.state_dict()), "parameter groups")


@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq", "step"])
def test_full_mode_incomplete_state_is_refused(missing):
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    i = adapter_state_id(opt, model[0])
    del saved["state"][i][missing]
    assert_load_refused(opt, model, saved, rf"lora_A of adapter '0'.*{missing!r}")


def test_full_mode_non_tensor_moment_is_refused():
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    i = adapter_state_id(opt, model[0])
    saved["state"][i]["exp_avg"] = saved["state"][i]["exp_avg"].tolist()
    assert_load_refused(opt, model, saved, r"lora_A of adapter '0'.*'exp_avg'.*tensor")


def test_full_mode_state_under_lora_B_is_refused():
    """Full mode keys an adapter's state by its lora_A; moments under lora_B come from
    another optimizer (mode='efficient', torch.optim.AdamW) and would be silently unused."""
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    i, j = adapter_state_id(opt, model[0]), lora_B_id(opt, model[0])
    saved["state"][j] = copy.deepcopy(saved["state"][i])
    assert_load_refused(opt, model, saved, r"lora_B of adapter '0'.*under its lora_A")


@pytest.mark.parametrize("scale", [None, 5.0])
def test_full_mode_refuses_another_lora_scale(scale):
    """lora_scale is the adapter's s = α/r of the model's forward pass: a checkpoint with
    another one (another model) would step with the wrong equations."""
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][1]["lora_scale"] = scale
    assert_load_refused(opt, model, saved, r"param_groups\[1\].*lora_scale")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("lr", -1.0, "lr"), ("betas", (0.9,), "betas"), ("eps", float("nan"), "eps")],
)
@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_bad_loaded_hyper_parameters_are_refused(mode, key, value, match):
    model, opt = trained(mode)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][key] = value
    assert_load_refused(opt, model, saved, match)


def test_full_mode_negative_step_is_refused():
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][adapter_state_id(opt, model[2])]["step"] = torch.tensor(-1.0)
    assert_load_refused(opt, model, saved, r"lora_A of adapter '2'.*'step'")


def test_full_mode_float64_moments_of_float32_params_load_as_float32():
    """A checkpoint whose moments are wider than the compute dtype (saved from a float64 run)
    loads cast to it; the moments used to be kept float64 and the next step raised midway
    (lerp of a float64 moment with a float32 gradient)."""
    model, opt = trained("full", dtype=torch.float32)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = entry[key].double()
    twin_model = copy.deepcopy(model)
    twin = LoRAPro(twin_model, mode="full", lr=1e-2, weight_decay=0.01)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.load_state_dict(saved)
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.float32
        assert state["exp_avg_sq"].dtype == torch.float32
    train(model, opt, [3], torch.float32)
    train(twin_model, twin, [3], torch.float32)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_full_mode_state_of_an_unknown_id_is_kept_as_torch_does():
    """Entries whose id names no parameter are carried along (torch's rule); they used to make
    the override index past the parameter list after the load had already happened."""
    model, opt = trained("full")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][99] = {"note": 1}
    opt.load_state_dict(saved)
    assert opt.state[99] == {"note": 1}
    train(model, opt, [3])


# -- efficient mode (the default inner torch.optim.AdamW: A- and B-shaped moments) ----------


def test_efficient_mode_moments_of_the_wrong_shape_are_refused_naming_the_factor():
    model, opt = trained("efficient")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][lora_B_id(opt, model[2])]["exp_avg"] = torch.zeros(5, 2, dtype=F64)
    assert_load_refused(opt, model, saved, r"lora_B of adapter '2'.*'exp_avg'.*\(5, 2\).*\(5, 3\)")


def test_efficient_mode_refuses_a_full_mode_checkpoint():
    model, opt = trained("efficient")
    _, full = trained("full")
    assert_load_refused(opt, model, copy.deepcopy(full.state_dict()), "mode='full'")


@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq", "step"])
def test_efficient_mode_incomplete_state_is_refused(missing):
    model, opt = trained("efficient")
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][adapter_state_id(opt, model[0])][missing]
    assert_load_refused(opt, model, saved, rf"lora_A of adapter '0'.*{missing!r}")


@pytest.mark.parametrize("step", [-1.0, float("nan"), "three"])
def test_efficient_mode_bad_step_is_refused(step):
    model, opt = trained("efficient")
    saved = copy.deepcopy(opt.state_dict())
    value = torch.tensor(step) if isinstance(step, float) else step
    saved["state"][adapter_state_id(opt, model[0])]["step"] = value
    assert_load_refused(opt, model, saved, r"lora_A of adapter '0'.*'step'")


def test_efficient_mode_amsgrad_without_its_buffer_is_refused():
    model, opt = trained("efficient")
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["amsgrad"] = True
    assert_load_refused(opt, model, saved, r"'max_exp_avg_sq'")


def test_efficient_mode_malformed_state_dict_is_refused():
    model, opt = trained("efficient")
    assert_load_refused(opt, model, {"state": {}}, "param_groups")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0] = [1, 2]
    assert_load_refused(opt, model, saved, "must be a dict")


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_a_good_checkpoint_still_resumes_bit_identically(mode):
    model, opt = trained(mode)
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = LoRAPro(twin, mode=mode, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved)
    train(model, opt, [3, 4])
    train(twin, opt2, [3, 4])
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_users_inner_optimizer_loads_as_it_does_itself():
    """With ``inner=`` the state layout is the inner optimizer's: LoRAPro delegates."""
    model = two_adapter_model()
    opt = LoRAPro(model, inner=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, opt, [1])
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = LoRAPro(twin, inner=torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    opt2.load_state_dict(saved)
    train(model, opt, [2])
    train(twin, opt2, [2])
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)

"""The shared conformance suite (DESIGN.md "Correctness"), run over every registered optimizer."""

import copy

import pytest
import torch
from optimizer_cases import CASES
from torch import nn

import danlu
from danlu.registry import REGISTRY

NAMES = sorted(REGISTRY)


def test_every_registered_optimizer_has_a_case():
    assert set(NAMES) <= set(CASES), f"add conformance cases for {set(NAMES) - set(CASES)}"


class TinyNet(nn.Module):
    """Every parameter kind: embedding, matrices, biases, a norm gain."""

    def __init__(self, vocab=11, dim=6, out=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, tokens):
        x = self.embed(tokens).mean(dim=1)
        return self.head(self.norm(torch.tanh(self.hidden(x))))


def make_data(n=64, vocab=11, seq=5, out=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1000)
        teacher = TinyNet(vocab, out=out)
        with torch.no_grad():
            target = teacher(tokens) * 3
    return tokens, target


def build(name, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    kwargs = {**CASES[name]["kwargs"], **overrides}
    opt = danlu.create_optimizer(name, model, **kwargs)
    return model, opt


def train(model, opt, steps, data, dtype=torch.float32):
    tokens, target = data
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(tokens) - target.to(dtype)).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model, opt):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
    )


def assert_same_snapshot(a, b):
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    sa, sb = a[1]["state"], b[1]["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        assert sa[idx].keys() == sb[idx].keys()
        for key in sa[idx]:
            assert torch.equal(sa[idx][key], sb[idx][key]), (idx, key)


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(name):
    model, opt = build(name)
    losses = train(model, opt, 150, make_data())
    assert losses[-1] < 0.6 * losses[0], losses[::25]


@pytest.mark.parametrize("name", NAMES)
def test_foreach_equals_single_tensor_in_float64(name):
    data = make_data()
    m1, o1 = build(name, dtype=torch.float64, foreach=False)
    m2, o2 = build(name, dtype=torch.float64, foreach=True)
    train(m1, o1, 8, data, torch.float64)
    train(m2, o2, 8, data, torch.float64)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_identical(name):
    data = make_data()
    model, opt = build(name)
    train(model, opt, 5, data)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 5, data)
    reference = snapshot(model, opt)

    model2, opt2 = build(name, seed=123)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, 5, data)
    assert_same_snapshot(reference, snapshot(model2, opt2))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_stay_bf16(name):
    # State follows the parameter dtype, except the keys a case declares float32 by design.
    float32_keys = set(CASES[name].get("float32_state", ()))
    model, opt = build(name, dtype=torch.bfloat16)
    losses = train(model, opt, 20, make_data(), torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses)))
    seen = set()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value) or key == "step":
                continue
            if key in float32_keys:
                assert value.dtype == torch.float32, key
                seen.add(key)
            elif value.dim() > 0:
                assert value.dtype == torch.bfloat16, key
    assert seen <= float32_keys
    if float32_keys:
        assert seen, f"none of {sorted(float32_keys)} appeared in the state"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_dict_resume_keeps_state_dtypes(name):
    # torch's load_state_dict casts floating state to the parameter dtype; float32 statistics
    # must come back float32 and bit-identical.
    data = make_data()
    model, opt = build(name, dtype=torch.bfloat16)
    train(model, opt, 3, data, torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    model2, opt2 = build(name, dtype=torch.bfloat16, seed=7)
    opt2.load_state_dict(saved)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert opt.state[p].keys() == opt2.state[p2].keys()
        for key, value in opt.state[p].items():
            assert opt2.state[p2][key].dtype == value.dtype, key
            assert torch.equal(opt2.state[p2][key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_untouched(name):
    model, opt = build(name)
    frozen = model.hidden.weight
    before = frozen.detach().clone()
    tokens, target = make_data()
    for _ in range(3):
        opt.zero_grad()
        (model(tokens) - target).pow(2).mean().backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_maximize_flips_the_direction(name):
    torch.manual_seed(1)
    p0 = torch.randn(4, 5)
    grads = [torch.randn(4, 5) for _ in range(4)]
    a = nn.Parameter(p0.clone())
    b = nn.Parameter(p0.clone())
    info = REGISTRY[name]
    oa = info.cls([a], **CASES[name]["kwargs"], maximize=True)
    ob = info.cls([b], **CASES[name]["kwargs"])
    for g in grads:
        a.grad = g.clone()
        b.grad = -g
        oa.step()
        ob.step()
        assert torch.equal(a.grad, g), "maximize must not modify the user's gradient"
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_per_group_settings_are_respected(name):
    torch.manual_seed(2)
    x0, y0 = torch.randn(3, 4), torch.randn(6)
    grads = [(torch.randn(3, 4), torch.randn(6)) for _ in range(3)]
    info, kw = REGISTRY[name], CASES[name]["kwargs"]
    x, y = nn.Parameter(x0.clone()), nn.Parameter(y0.clone())
    joint = info.cls([{"params": [x]}, {"params": [y], "lr": kw["lr"] * 7}], **kw)
    x_alone, y_alone = nn.Parameter(x0.clone()), nn.Parameter(y0.clone())
    ox = info.cls([x_alone], **kw)
    oy = info.cls([y_alone], **{**kw, "lr": kw["lr"] * 7})
    for gx, gy in grads:
        x.grad, y.grad, x_alone.grad, y_alone.grad = gx, gy, gx.clone(), gy.clone()
        joint.step()
        ox.step()
        oy.step()
    assert torch.equal(x, x_alone)
    assert torch.equal(y, y_alone)
    assert not torch.equal(y, y0)


@pytest.mark.parametrize(
    "name,arg,value",
    [(n, a, v) for n in NAMES for a, v in CASES[n]["invalid"]],
)
def test_bad_hyper_parameters_raise_value_error(name, arg, value):
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=arg.split("[")[0]):
        REGISTRY[name].cls([p], **{**CASES[name]["kwargs"], arg: value})


@pytest.mark.parametrize(
    "name,arg,value",
    [(n, a, v) for n in NAMES for a, v in CASES[n]["invalid_group"]],
)
def test_bad_group_settings_raise_and_leave_everything_as_it_was(name, arg, value):
    model, opt = build(name)
    data = make_data()
    train(model, opt, 2, data)
    # add_param_group with a bad value: ValueError, no group added
    extra = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": [extra], arg: value})
    assert all(extra is not p for g in opt.param_groups for p in g["params"])
    # a group mutated to a bad value after construction: step raises, nothing changes
    before = snapshot(model, opt)
    opt.param_groups[0][arg] = value
    tokens, target = data
    opt.zero_grad()
    (model(tokens) - target).pow(2).mean().backward()
    with pytest.raises(ValueError, match=arg):
        opt.step()
    after = snapshot(model, opt)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key])
    for idx, state in before[1]["state"].items():
        for key, value_ in state.items():
            assert torch.equal(value_, after[1]["state"][idx][key])


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_rejected(name):
    p = nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        REGISTRY[name].cls([p], **CASES[name]["kwargs"])


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_is_rejected_and_nothing_changes(name):
    model, opt = build(name)
    train(model, opt, 2, make_data())
    before = snapshot(model, opt)
    dense = nn.Linear(3, 3)
    sparse_embed = nn.Embedding(5, 3, sparse=True)
    opt.add_param_group(
        {
            "params": [dense.weight, sparse_embed.weight],
            "param_names": ["dense.weight", "sparse.weight"],
        }
    )
    tokens, target = make_data()
    opt.zero_grad()
    (model(tokens) - target).pow(2).mean().backward()
    (dense(sparse_embed(torch.tensor([1, 2]))).sum()).backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    after = snapshot(model, opt)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key])
    assert len(opt.state[dense.weight]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_and_its_loss_returned(name):
    model, opt = build(name)
    tokens, target = make_data()

    def closure():
        opt.zero_grad()
        loss = (model(tokens) - target).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.dim() == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (), (1,), (7, 1)])
def test_odd_shapes(name, shape):
    p = nn.Parameter(torch.ones(shape))
    opt = REGISTRY[name].cls([p], **CASES[name]["kwargs"])
    for _ in range(2):
        p.grad = torch.full(shape, 0.5)
        opt.step()
    assert torch.isfinite(p).all()
    if p.numel():
        assert (p < 1).all()


@pytest.mark.parametrize("name", NAMES)
def test_works_with_torch_lr_scheduler(name):
    model, opt = build(name)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    train(model, opt, 1, make_data())
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 / 2)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr(name):
    data = make_data()
    m1, o1 = build(name)
    m2, o2 = build(name, lr=torch.tensor(CASES[name]["kwargs"]["lr"]))
    train(m1, o1, 3, data)
    train(m2, o2, 3, data)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_create_optimizer_and_registry_defaults(name):
    info = REGISTRY[name]
    assert info.defaults["lr"] is not None
    opt = danlu.create_optimizer(name.upper(), [nn.Parameter(torch.ones(2))])
    assert type(opt) is info.cls
    assert opt.defaults["lr"] == info.defaults["lr"]


def test_create_optimizer_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer"):
        danlu.create_optimizer("adamq", [nn.Parameter(torch.ones(2))])

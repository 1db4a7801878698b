"""danlu.step_in_backward: numerically the ordinary loop, without keeping gradient buffers."""

import pytest
import torch
from optimizer_cases import CASES
from test_conformance import TinyNet, make_data
from torch import nn

import danlu


class TiedNet(nn.Module):
    """The embedding table is also the output layer (used twice in one graph)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.swap = danlu.nn.HalfSwap()

    def forward(self, tokens):
        h = self.norm(torch.tanh(self.hidden(self.embed(tokens).mean(dim=1))))
        return self.swap(h) @ self.embed.weight.T


OPTIMIZERS = {
    "tiger": lambda m: danlu.Tiger(danlu.param_groups(m), lr=2e-2),
    "tiger-accum": lambda m: danlu.Tiger(danlu.param_groups(m), lr=2e-2, grad_accum_steps=3),
    "lion": lambda m: danlu.Lion(danlu.param_groups(m), lr=3e-3, weight_decay=0.1),
    "adamw-accum": lambda m: danlu.AdamW(danlu.param_groups(m), lr=1e-2, grad_accum_steps=2),
    "torch-adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False),
    "torch-sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=False),
    "multi": lambda m: danlu.MultiOptimizer.adam_for_embeddings(m, lr=2e-2),
    "lazy-guard": lambda m: danlu.NonFiniteGuard(
        danlu.Lazy(danlu.Tiger(danlu.param_groups(m), lr=2e-2), lazy_moments=True)
    ),
    # every registered optimizer at its conformance settings (a new one is covered too)
    **{
        f"registry-{name}": lambda m, name=name: danlu.create_optimizer(
            m, name, **CASES[name]["kwargs"]
        )
        for name in danlu.REGISTRY
    },
}


def run(model, opt, steps, scheduler=None):
    tokens, target = make_data()
    if isinstance(model, TiedNet):
        target = tokens[:, 0]
    for i in range(steps):
        opt.zero_grad()
        out = model(tokens[i % 3 :: 3])
        if isinstance(model, TiedNet):
            loss = nn.functional.cross_entropy(out, target[i % 3 :: 3])
        else:
            loss = (out - target[i % 3 :: 3]).pow(2).mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("net", [TinyNet, TiedNet])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_equals_the_ordinary_loop_bit_for_bit(name, net):
    torch.manual_seed(0)
    ordinary = net()
    torch.manual_seed(0)
    hooked = net()
    run(ordinary, OPTIMIZERS[name](ordinary), 7)
    opt = danlu.step_in_backward(OPTIMIZERS[name](hooked))
    run(hooked, opt, 7)
    for (key, a), b in zip(
        ordinary.state_dict().items(), hooked.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", ["tiger", "tiger-accum", "lion"])
def test_no_gradient_buffer_is_kept(name):
    torch.manual_seed(0)
    model = TinyNet()
    opt = danlu.step_in_backward(OPTIMIZERS[name](model))
    params = list(model.parameters())
    held = []
    for p in params:  # runs before each accumulation: count the gradients alive at that moment
        p.register_hook(lambda g: held.append(sum(q.grad is not None for q in params)))
    tokens, target = make_data()
    for _ in range(3):
        opt.zero_grad()
        (model(tokens) - target).pow(2).mean().backward()
        assert all(p.grad is None for p in params)
        opt.step()
    assert len(held) == 3 * len(params) and max(held) == 0
    # the state was updated inside backward: one momentum per parameter, nothing else
    for p in params:
        assert set(opt.state[p]) == ({"exp_avg"} if name == "lion" else {"exp_avg", "step"})
        assert opt.state[p]["exp_avg"].shape == p.shape


def test_the_optimizer_runs_inside_backward():
    torch.manual_seed(0)
    model = TinyNet()
    opt = danlu.step_in_backward(danlu.Tiger(danlu.param_groups(model), lr=2e-2))
    before = [p.detach().clone() for p in model.parameters()]
    tokens, target = make_data()
    (model(tokens) - target).pow(2).mean().backward()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved), "every parameter must be stepped by backward() alone"
    after = [p.detach().clone() for p in model.parameters()]
    opt.step()  # nothing left to apply
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters(), strict=True))


def test_scheduler_applies_from_the_next_backward():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    oa = danlu.Tiger(danlu.param_groups(a), lr=2e-2)
    ob = danlu.step_in_backward(danlu.Tiger(danlu.param_groups(b), lr=2e-2))
    run(a, oa, 5, torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.3))
    run(b, ob, 5, torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.3))
    assert ob.param_groups[0]["lr"] == pytest.approx(2e-2 * 0.3**2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_remove_restores_the_ordinary_optimizer():
    torch.manual_seed(0)
    model = TinyNet()
    tokens, target = make_data()
    with danlu.step_in_backward(danlu.Tiger(danlu.param_groups(model), lr=2e-2)) as opt:
        assert opt.active
        (model(tokens) - target).pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters())
    assert not opt.active
    (model(tokens) - target).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the leftover gradients are applied by step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_manual_gradients_are_applied_by_step():
    p = nn.Parameter(torch.ones(3))
    opt = danlu.step_in_backward(danlu.Tiger([p], lr=0.1))
    p.grad = torch.ones(3)  # no backward: no hook fires
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))


def test_added_param_group_gets_hooks():
    p = nn.Parameter(torch.ones(3))
    q = nn.Parameter(torch.ones(2))
    opt = danlu.step_in_backward(danlu.Tiger([p], lr=0.1))
    opt.add_param_group({"params": [q]})
    (p.sum() + q.sum()).backward()
    assert p.grad is None and q.grad is None
    assert opt.state[q]["step"].item() == 1


def test_guard_with_tensor_scope_skips_only_the_bad_parameter():
    torch.manual_seed(0)
    model = TinyNet()
    guard = danlu.NonFiniteGuard(danlu.Tiger(danlu.param_groups(model), lr=2e-2))
    opt = danlu.step_in_backward(guard)
    assert opt.active
    model.hidden.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = model.hidden.weight.detach().clone()
    bias_before = model.hidden.bias.detach().clone()
    tokens, target = make_data()
    (model(tokens) - target).pow(2).mean().backward()
    assert torch.equal(model.hidden.weight.detach(), before)
    assert not torch.equal(model.hidden.bias.detach(), bias_before)
    # inside backward the guard sees one parameter per call: its counters count tensor-steps
    assert guard.skipped_tensors == 1 and guard.skipped_steps == 1
    assert guard.steps == len(list(model.parameters()))
    assert model.hidden.weight.grad is None

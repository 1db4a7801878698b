"""danlu.Lazy: row-masked updates, docs/reference/algorithms.md#lazy-updates and the oracles of
docs/reference/algorithms.md#embedding-drift-tests items 2-3."""

import numpy as np
import pytest
import torch
from reference import adam_lazy_rows
from torch import nn

import danlu

F64 = torch.float64
VARIANTS = {"dense": None, "masked": False, "frozen": True}  # → lazy_moments


def adam(params, eps, inner):
    if inner == "torch":
        return torch.optim.Adam(params, lr=0.1, betas=(0.9, 0.999), eps=eps)
    return danlu.AdamW(params, lr=0.1, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)


def run_table(grads, *, variant, eps, inner="torch", rows=1):
    table = nn.Parameter(torch.zeros(rows, 2, dtype=F64))
    opt = adam([table], eps, inner)
    if VARIANTS[variant] is not None:
        opt = danlu.Lazy(opt, params=[table], lazy_moments=VARIANTS[variant])
    history = []
    for g in grads:
        table.grad = torch.tensor(g, dtype=F64)
        opt.step()
        history.append(table.detach().clone())
    return history, opt


@pytest.mark.parametrize("inner", ["torch", "danlu"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_spec_4e2_three_variants(variant, inner):
    # docs/reference/algorithms.md#embedding-drift-tests item 2: 1×2 table, lr=0.1, β=(0.9, 0.999),
    # ε=0, gradients [1,1], [0,0], [1,1]. After step 2 the dense row is at −0.16700583 and both lazy
    # rows stay at −0.1. The held-back step-3 values, derived by hand from the Adam equations (t=3,
    # 1−β1³=0.271, 1−β2³=0.002997001):
    #   dense  m=0.181, v=0.001998001 → θ3 = −0.16700583 − 0.1·0.818004 = −0.2488061
    #   masked same moments, θ2 = −0.1           → θ3 = −0.1 − 0.0818004   = −0.1818003
    #   frozen m=0.19, v=0.001999 (step 2 frozen) → θ3 = −0.1 − 0.0858463  = −0.1858463
    # and the NumPy reference (tests/reference.py) reproduces them.
    grads = [[[1.0, 1.0]], [[0.0, 0.0]], [[1.0, 1.0]]]
    history, _ = run_table(grads, variant=variant, eps=0.0, inner=inner)
    expected = adam_lazy_rows(
        np.zeros((1, 2)), grads, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, variant=variant
    )
    for got, want in zip(history, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    step2 = {"dense": -0.16700583, "masked": -0.1, "frozen": -0.1}[variant]
    step3 = {"dense": -0.2488061, "masked": -0.1818003, "frozen": -0.1858463}[variant]
    assert history[1][0, 0].item() == pytest.approx(step2, abs=1e-8)
    assert history[2][0, 0].item() == pytest.approx(step3, abs=1e-7)


@pytest.mark.parametrize("variant", ["masked", "frozen"])
def test_spec_4e3_untouched_rows_with_small_eps(variant):
    # docs/reference/algorithms.md#embedding-drift-tests item 3: 3×2 table, ε=1e-12; step 1
    # [[1,1],0,0], step 2 [[0,0],[2,-2],0]. dense θ after step 2: row0 = −0.16700583, row1 =
    # [−0.07441368, +0.07441368]; lazy: row0 stays −0.1, row1 identical to dense, row2 never moves.
    grads = [[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, -2.0], [0.0, 0.0]]]
    dense, _ = run_table(grads, variant="dense", eps=1e-12, rows=3)
    lazy, _ = run_table(grads, variant=variant, eps=1e-12, rows=3)
    torch.testing.assert_close(dense[1][0], torch.full((2,), -0.16700583, dtype=F64))
    torch.testing.assert_close(dense[1][1], torch.tensor([-0.07441368, 0.07441368], dtype=F64))
    assert torch.equal(lazy[1][0], lazy[0][0])  # row0 stays where step 1 put it, ≈ −0.1
    torch.testing.assert_close(lazy[1][0], torch.full((2,), -0.1, dtype=F64))
    assert torch.equal(lazy[1][1], dense[1][1])
    assert torch.equal(lazy[1][2], torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("variant", ["masked", "frozen"])
def test_eps_zero_never_turns_0_over_0_into_nan(variant):
    # docs/reference/algorithms.md#embedding-drift-tests item 3 with ε = 0: a never-seen row
    # computes 0/0 = NaN inside Adam; NaN·0 is NaN, so a multiplicative mask would keep it. The
    # absent rows must come back exactly.
    grads = [[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, -2.0], [0.0, 0.0]]]
    dense, _ = run_table(grads, variant="dense", eps=0.0, rows=3)
    assert torch.isnan(dense[1][2]).all(), "the hazard exists in the dense optimizer"
    lazy, opt = run_table(grads, variant=variant, eps=0.0, rows=3)
    assert torch.equal(lazy[1][2], torch.zeros(2, dtype=F64))
    assert all(torch.isfinite(h).all() for h in lazy)
    table = opt.lazy_params[0]
    assert torch.isfinite(opt.state[table]["exp_avg"]).all()


class Bag(nn.Module):
    def __init__(self, vocab=10, dim=4, sparse=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, sparse=sparse, padding_idx=0)
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1)).squeeze(-1)


def train_bag(model, opt, steps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 5, (8, 3), generator=gen)  # rows 5..9 never appear
        opt.zero_grad()
        (model(tokens) - 1.0).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("lazy_moments", [False, True])
def test_tiger_absent_rows_never_move_and_defaults_to_embedding_groups(lazy_moments):
    torch.manual_seed(0)
    model = Bag()
    w0 = model.embed.weight.detach().clone()
    opt = danlu.Lazy(
        danlu.Tiger(danlu.param_groups(model), lr=0.05, weight_decay=0.1),
        lazy_moments=lazy_moments,
    )
    assert opt.lazy_params == [model.embed.weight]
    train_bag(model, opt, 6)
    w = model.embed.weight.detach()
    assert torch.equal(w[5:], w0[5:]), "absent rows"
    assert torch.equal(w[0], w0[0]), "the padding row (zero gradient) is absent too"
    assert not torch.equal(w[1:5], w0[1:5])
    # without the wrapper, decay alone moves the absent rows
    torch.manual_seed(0)
    plain = Bag()
    train_bag(plain, danlu.Tiger(danlu.param_groups(plain), lr=0.05, weight_decay=0.1), 6)
    assert not torch.equal(plain.embed.weight.detach()[5:], w0[5:])


def test_lazy_moments_freeze_or_decay_the_absent_momentum():
    table = nn.Parameter(torch.ones(2, 3))
    frozen = danlu.Lazy(danlu.Tiger([table], lr=0.1, beta=0.5), [table], lazy_moments=True)
    twin = nn.Parameter(torch.ones(2, 3))
    masked = danlu.Lazy(danlu.Tiger([twin], lr=0.1, beta=0.5), [twin], lazy_moments=False)
    for p, opt in ((table, frozen), (twin, masked)):
        p.grad = torch.ones(2, 3)
        opt.step()
        p.grad = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
        opt.step()
    assert torch.equal(frozen.state[table]["exp_avg"][1], torch.full((3,), 0.5))
    assert torch.equal(masked.state[twin]["exp_avg"][1], torch.full((3,), 0.25))
    assert torch.equal(table.detach()[1], twin.detach()[1])  # the row itself is frozen in both
    assert torch.equal(frozen.state[table]["step"], masked.state[twin]["step"])


def test_sparse_gradients_equal_the_dense_path():
    torch.manual_seed(0)
    dense_model = Bag()
    torch.manual_seed(0)
    sparse_model = Bag(sparse=True)
    for model in (dense_model, sparse_model):
        opt = danlu.Lazy(danlu.Tiger(danlu.param_groups(model), lr=0.05), lazy_moments=True)
        train_bag(model, opt, 4)
    assert sparse_model.embed.weight.grad.is_sparse, "the user's sparse gradient is put back"
    for a, b in zip(dense_model.parameters(), sparse_model.parameters(), strict=True):
        assert torch.equal(a, b)

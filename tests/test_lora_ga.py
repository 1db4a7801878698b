"""LoRA-GA (danlu.lora.lora_ga_init_) against docs/reference/algorithms.md#lora-ga and the NumPy
reference."""

import copy
import itertools
import os
import weakref

import numpy as np
import pytest
import torch
from reference import lora_ga_factors, svd_signed
from torch import nn

from danlu.lora import (
    LoRALinear,
    average_gradients,
    export_lora_delta,
    find_lora_adapters,
    inject,
    lora_ga_init_,
)

G_DIAG = np.diag([3.0, 2.0, 1.0, 0.5])


def linear_probe(G, rank, *, alpha=None, dtype=torch.float32):
    """A LoRALinear whose loss <G, W> has gradient exactly G with respect to W (out×in):
    with the identity as the input batch, layer(I) = Wᵀ, and sum(Wᵀ ⊙ Gᵀ) = <W, G>."""
    out_f, in_f = G.shape
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=False, dtype=dtype), rank, alpha)
    eye = torch.eye(in_f, dtype=dtype)
    target = torch.tensor(G.T, dtype=dtype)

    def loss_fn(model, batch):
        return (model(eye) * target).sum()

    return layer, loss_fn


def effective_weight(layer):
    return (layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A).detach()


def residual(G, layer):
    """‖B Bᵀ G + G Aᵀ A − G‖² in PEFT naming (the blog's ‖A0A0ᵀG + GB0ᵀB0 − G‖²,
    docs/reference/algorithms.md#lora-ga)."""
    A = layer.lora_A.detach().double().numpy()
    B = layer.lora_B.detach().double().numpy()
    return float(np.sum((B @ B.T @ G + G @ A.T @ A - G) ** 2))


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_oracle_diag_residual(direction):
    # docs/reference/algorithms.md#lora-ga-tests item 1: G0 = diag(3, 2, 1, 0.5), r = 1: residual
    # 1² + 0.5² = 1.25 for any split.
    layer, loss_fn = linear_probe(G_DIAG, rank=1)
    lora_ga_init_(layer, [None], loss_fn, direction=direction, scale="unit", svd="full")
    assert residual(G_DIAG, layer) == pytest.approx(1.25, abs=1e-5)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_random_residual_is_tail_energy(direction):
    # docs/reference/algorithms.md#lora-ga-tests item 1: random 6×5 G, r = 2: residual Σ_{i>4} σ_i²
    # (NumPy SVD) for every split.
    G = np.random.default_rng(1).standard_normal((6, 5))
    layer, loss_fn = linear_probe(G, rank=2)
    lora_ga_init_(layer, [None], loss_fn, direction=direction, scale="unit", svd="full")
    sigma = np.linalg.svd(G, compute_uv=False)
    assert residual(G, layer) == pytest.approx(np.sum(sigma[4:] ** 2), rel=1e-4)


@pytest.mark.parametrize(
    ("direction", "second_order"),
    [
        # docs/reference/algorithms.md#lora-ga-tests item 2, the blog's split (A0 = e1, B0 = e2ᵀ in
        # blog names): +6η² E21.
        ("A2rBr", (1, 0)),
        # ArB2r by hand: lora_A = e1ᵀ, lora_B = e2, g_A = Bᵀ G = 2e2ᵀ, g_B = G Aᵀ = 3e1, so the
        # η² term g_B g_A = 6 E12.
        ("ArB2r", (0, 1)),
    ],
)
def test_oracle_one_sgd_step(direction, second_order):
    eta = 0.1
    layer, loss_fn = linear_probe(G_DIAG, rank=1)
    w_start = effective_weight(layer)
    lora_ga_init_(layer, [None], loss_fn, direction=direction, scale="unit", svd="full")
    torch.testing.assert_close(effective_weight(layer), w_start)  # W is unchanged at init
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=eta)
    loss_fn(layer, None).backward()
    opt.step()
    expected = -eta * np.diag([3.0, 2.0, 0.0, 0.0])
    expected[second_order] += 6 * eta**2
    np.testing.assert_allclose(
        (effective_weight(layer) - w_start).numpy(), expected, atol=2e-6, rtol=0
    )


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)
    ).to(dtype)
    return model


def regression_batches(n=4, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 9, generator=gen, dtype=dtype),
            torch.randn(8, 5, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def independent_mean_gradients(model, batches):
    """Per-batch autograd gradients of the (frozen) base weights, averaged in float64."""
    clone = copy.deepcopy(model)
    weights = {a.name: a.base_weight for a in find_lora_adapters(clone)}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: 0.0 for name in weights}
    for batch in batches:
        grads = torch.autograd.grad(mse(clone, batch), list(weights.values()))
        for name, g in zip(weights, grads, strict=True):
            sums[name] = sums[name] + g.double().numpy()
    return {name: total / len(batches) for name, total in sums.items()}


def test_averaged_gradients_and_state_restored():
    model = mlp()
    inject(model, target=["0", "2", "4"], rank=2, alpha=4)
    model.eval()
    batches = regression_batches()
    expected = independent_mean_gradients(model, batches)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = average_gradients(model, batches, mse)
    assert set(got) == {"0", "2", "4"}
    for name, g in got.items():
        assert g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), expected[name], rtol=1e-5, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())  # the caller's eval mode is back


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "peft_stable", "peft_gd", "peft_unit"])
def test_factors_and_base_update_match_reference(direction, scale):
    model = mlp(torch.float64)
    inject(model, target=["0", "2", "4"], rank=2, alpha=3)  # s = 1.5
    batches = regression_batches(dtype=torch.float64)
    grads = independent_mean_gradients(model, batches)
    w_before = {a.name: a.base_weight.detach().clone() for a in find_lora_adapters(model)}
    x = torch.randn(5, 9, dtype=torch.float64)
    out_before = model(x).detach()
    lora_ga_init_(model, batches, mse, direction=direction, scale=scale, svd="full")
    for a in find_lora_adapters(model):
        A_ref, B_ref = lora_ga_factors(
            grads[a.name], 2, direction=direction, scale=scale, lora_scale=1.5, gamma=16.0
        )
        np.testing.assert_allclose(a.lora_A.detach().numpy(), A_ref, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(a.lora_B.detach().numpy(), B_ref, atol=2e-5, rtol=1e-4)
        expected_w = w_before[a.name].numpy() - 1.5 * B_ref @ A_ref
        np.testing.assert_allclose(a.base_weight.detach().numpy(), expected_w, atol=1e-5)
    torch.testing.assert_close(model(x), out_before, atol=1e-6, rtol=1e-6)


def test_info_reports_captured_gradient_energy():
    model = mlp(torch.float64)
    inject(model, target=["2"], rank=2)
    batches = regression_batches(dtype=torch.float64)
    G = independent_mean_gradients(model, batches)["2"]
    info = lora_ga_init_(model, batches, mse, svd="full")["2"]
    sigma = np.linalg.svd(G, compute_uv=False)
    np.testing.assert_allclose(info.singular_values.numpy(), sigma[:4], rtol=1e-4)
    assert info.captured == pytest.approx(np.sum(sigma[:4] ** 2) / np.sum(sigma**2), rel=1e-4)


def test_precomputed_gradients_give_the_same_init():
    model = mlp()
    inject(model, target=["0", "2"], rank=2)
    twin = copy.deepcopy(model)
    batches = regression_batches()
    lora_ga_init_(model, batches, mse, svd="full")
    grads = average_gradients(twin, batches, mse)
    lora_ga_init_(twin, gradients=grads, svd="full")
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_randomized_svd_is_seeded_and_accurate():
    G = svd_signed(np.random.default_rng(3).standard_normal((40, 30)))
    # a gradient with a decaying spectrum, so the top directions are well defined
    G = (G[0] * (0.7 ** np.arange(30))) @ G[2]
    runs = []
    for seed in (0, 0, 1):
        layer, loss_fn = linear_probe(G, rank=3)
        lora_ga_init_(layer, [None], loss_fn, scale="unit", svd="randomized", seed=seed)
        runs.append(layer)
    assert torch.equal(runs[0].lora_A, runs[1].lora_A)
    assert torch.equal(runs[0].lora_B, runs[1].lora_B)
    A_ref, B_ref = lora_ga_factors(G, 3, direction="ArB2r", scale="unit", lora_scale=1.0)
    for layer in (runs[0], runs[2]):
        np.testing.assert_allclose(layer.lora_A.detach().numpy(), A_ref, atol=1e-4)
        np.testing.assert_allclose(layer.lora_B.detach().numpy(), B_ref, atol=1e-4)


def test_bf16_base_update_in_fp32():
    model = mlp()
    inject(model, target=["0", "2", "4"], rank=2, alpha=4)
    model.to(torch.bfloat16)
    w_before = {a.name: a.base_weight.detach().clone() for a in find_lora_adapters(model)}
    x = torch.randn(6, 9, dtype=torch.bfloat16)
    out_before = model(x).detach().float()
    lora_ga_init_(model, regression_batches(dtype=torch.bfloat16), mse)
    for a in find_lora_adapters(model):
        assert a.base_weight.dtype == a.lora_A.dtype == a.lora_B.dtype == torch.bfloat16
        # W0 − s·B0A0 computed in fp32 from the bf16 factors, rounded once
        expected = (
            w_before[a.name].float() - a.scale * (a.lora_B.float() @ a.lora_A.float())
        ).bfloat16()
        assert torch.equal(a.base_weight, expected)
    torch.testing.assert_close(model(x).float(), out_before, atol=0.05, rtol=0.05)


def test_second_call_folds_the_current_adapter_in():
    model = mlp(torch.float64)
    inject(model, target=["0", "2"], rank=2)
    x = torch.randn(5, 9, dtype=torch.float64)
    batches = regression_batches(dtype=torch.float64)
    lora_ga_init_(model, batches, mse)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    out = model(x).detach()
    lora_ga_init_(model, batches, mse, direction="A2rBr")
    torch.testing.assert_close(model(x), out)


def test_export_delta_is_the_change_since_init():
    model = mlp(torch.float64)
    inject(model, target=["0", "2", "4"], rank=2, alpha=4)
    w_orig = {a.name: a.base_weight.detach().clone() for a in find_lora_adapters(model)}
    batches = regression_batches(dtype=torch.float64)
    lora_ga_init_(model, batches, mse)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches * 3:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    deltas = export_lora_delta(model)
    for a in find_lora_adapters(model):
        d = deltas[a.name]
        assert d.lora_A.shape == (4, a.in_features) and d.lora_B.shape == (a.out_features, 4)
        effective = a.base_weight + a.scale * a.lora_B @ a.lora_A
        torch.testing.assert_close(
            w_orig[a.name] + d.weight().double(), effective.detach(), atol=1e-6, rtol=1e-6
        )
        assert d.weight().abs().max() > 1e-4  # training moved it


def test_peak_extra_memory_is_one_weight_gradient():
    """Track every weight gradient autograd produces (a weak reference to each .grad, freed
    when its last reference dies): LoRA-GA must never hold two at once, while a plain
    backward pass holds all of them. The fp32 running sums (one per weight, ``grad_device``
    chooses where) are the only other allocation and are not weight gradients."""
    torch.manual_seed(0)
    sizes = [24, 40, 32, 48, 16, 8]
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in itertools.pairwise(sizes)])
    inject(model, target=r"\d+", rank=2)
    weights = [a.base_weight for a in find_lora_adapters(model)]
    alive, peak = [0], [0]

    def release(nbytes):
        alive[0] -= nbytes

    def track(w):
        nbytes = w.grad.numel() * w.grad.element_size()
        alive[0] += nbytes
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(w.grad, release, nbytes)

    for w in weights:  # hooks run in registration order: the tracker sees each grad first
        w.requires_grad_(True)
        w.register_post_accumulate_grad_hook(track)
        w.requires_grad_(False)
    x = torch.randn(16, 24)
    batches = [(x, torch.randn(16, 8)) for _ in range(3)]
    lora_ga_init_(model, batches, mse)
    largest = max(w.numel() * w.element_size() for w in weights)
    assert peak[0] == largest
    assert alive[0] == 0

    # Control: the same tracker sees every gradient alive at once after a plain backward.
    peak[0] = 0
    for w in weights:
        w.requires_grad_(True)
    mse(model, batches[0]).backward()
    assert peak[0] == sum(w.numel() * w.element_size() for w in weights)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"direction": "BrA2r"}, ValueError, "direction"),
        ({"scale": "weightS"}, ValueError, "scale"),
        ({"stable_gamma": 0}, ValueError, "stable_gamma"),
        ({"svd": "lowrank"}, ValueError, "svd"),
        ({"niter": -1}, ValueError, "niter"),
        ({"seed": 1.5}, ValueError, "seed"),
    ],
)
def test_bad_options(kw, error, match):
    model = mlp()
    inject(model, target=["0"], rank=2)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lora_ga_init_(model, regression_batches(), mse, **kw)
    assert_unchanged(model, before)


def test_rank_too_large_for_lora_ga():
    # 2r must fit in min(in, out): rank 3 on a 12→5 layer needs 6 directions of 5.
    model = mlp()
    inject(model, target=["0", "4"], rank=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'4'.*2·rank <= min"):
        lora_ga_init_(model, regression_batches(), mse)
    assert_unchanged(model, before)


def test_layer_without_gradient_is_an_error():
    model = mlp()
    inject(model, target=["0", "2", "4"], rank=2)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def first_layer_only(m, batch):
        return m[0](batch[0]).square().mean()

    with pytest.raises(ValueError, match=r"no gradient reached.*'2', '4'"):
        lora_ga_init_(model, regression_batches(), first_layer_only)
    assert_unchanged(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_non_finite_gradient_is_an_error():
    model = mlp()
    inject(model, target=["0"], rank=2)
    before = snapshot(model)
    batches = regression_batches()
    batches[1][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        lora_ga_init_(model, batches, mse)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        (([], mse), {}, "batches is empty"),
        ((None, None), {}, "pass batches and loss_fn"),
        ((regression_batches(), lambda m, b: m(b[0])), {}, "scalar"),
        ((regression_batches(), mse), {"gradients": {}}, "not both"),
        ((), {"gradients": {"0": torch.zeros(3, 3)}}, "shape"),
        ((), {"gradients": {}}, "no entry"),
    ],
)
def test_bad_batches_loss_and_gradients(args, kw, match):
    model = mlp()
    inject(model, target=["0"], rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_ga_init_(model, *args, **kw)
    assert_unchanged(model, before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_model_without_lora_layers():
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ga_init_(mlp(), regression_batches(), mse)


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = mlp()
        inject(model, target=["0", "2", "4"], rank=2)
        batches = regression_batches(n=4)
        own = batches[:1] if rank == 0 else batches[1:]  # unequal shares: 1 and 3 batches
        lora_ga_init_(model, own, mse, svd="full")
        torch.save(model.state_dict(), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_one_gradient_estimate(tmp_path):
    """Under torch.distributed every rank gets the average over all ranks' batches, so the
    adapters (and shifted base weights) are identical and equal a single process's init."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = mlp()
    inject(single, target=["0", "2", "4"], rank=2)
    lora_ga_init_(single, regression_batches(n=4), mse, svd="full")
    states = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    for name, value in single.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-6)


def test_tied_base_weight_is_refused_and_nothing_changes():
    """LoRA-GA shifts the base weight; a weight another layer also uses (tied embeddings) would
    change that layer too, so the model would no longer compute the same function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))
    model[2].weight = model[0].weight  # tied
    inject(model, target=["2", "4"], rank=2)
    state = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(8, 8), torch.randn(8, 5))]
    with pytest.raises(ValueError, match=r"'2': its base weight is shared with '0\.weight'"):
        lora_ga_init_(model, batches, mse)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # untied, the same call keeps the function
    model[2].base.weight = nn.Parameter(model[0].weight.detach().clone(), requires_grad=False)
    x = torch.randn(4, 8)
    out = model(x).detach()
    lora_ga_init_(model, batches, mse)
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-5)

"""danlu.init against docs/reference/algorithms.md#initialisation-tests and NumPy quadrature
(tests/reference.py)."""

import math

import pytest
import reference
import torch
from torch import nn

from danlu import init

# -- γ, the truncated-normal variance --------------------------------------------------------


def test_gamma_matches_spec():
    gamma, factor = init.TRUNCATED_NORMAL_VARIANCE, init.TRUNCATED_NORMAL_STD_FACTOR
    assert gamma == pytest.approx(0.77374130, abs=1e-8)
    assert factor == pytest.approx(1.13684723, abs=1e-8)
    # The blog's effective BERT std, 0.02·√γ = 0.0175925 (= 0.02 / 1.1368472).
    assert 0.02 * math.sqrt(init.TRUNCATED_NORMAL_VARIANCE) == pytest.approx(0.0175925, abs=1e-7)


@pytest.mark.parametrize("bound", [0.5, 1.0, 2.0, 3.0])
def test_gamma_matches_quadrature(bound):
    want = reference.truncated_normal_variance(bound)
    assert init.truncated_normal_variance(bound) == pytest.approx(want, rel=1e-12)


# -- trunc_normal_tf_ ------------------------------------------------------------------------


def test_trunc_normal_tf_spec_sample():
    """docs/reference/algorithms.md#initialisation-tests: 10⁶ draws with σ = 0.02 have std ≈
    0.017593 (tolerance 1e-4) and none lies outside ±2σ."""
    t = torch.empty(1_000_000)
    init.trunc_normal_tf_(t, std=0.02, generator=torch.Generator().manual_seed(1))
    assert t.double().std().item() == pytest.approx(0.017593, abs=1e-4)
    assert t.double().abs().max().item() <= 2 * 0.02
    assert t.double().mean().item() == pytest.approx(0.0, abs=1e-4)
    # the bounds are reached, i.e. the cut is at ±2σ and not further in
    assert t.double().abs().max().item() > 2 * 0.02 * 0.999


def test_trunc_normal_tf_corrected_std():
    t = torch.empty(1_000_000)
    init.trunc_normal_tf_(t, std=0.02, correct_std=True, generator=torch.Generator().manual_seed(2))
    assert t.double().std().item() == pytest.approx(0.02, abs=1e-4)
    # cut at ±2 of the std actually passed to the normal: 2 · 0.02 · 1.1368472
    assert t.double().abs().max().item() <= 2 * 0.02 * 1.1368473


def test_trunc_normal_tf_bounds_are_in_units_of_std():
    """docs/reference/algorithms.md#initialisation-edge-cases: torch's trunc_normal_(std=0.02) cuts
    at absolute ±2, i.e. not at all."""
    torch_style = torch.nn.init.trunc_normal_(torch.empty(200_000), std=0.02)
    assert torch_style.abs().max().item() > 0.04
    ours = init.trunc_normal_tf_(torch.empty(200_000), mean=3.0, std=5.0, bound=1.0)
    assert ours.min().item() >= 3.0 - 5.0 and ours.max().item() <= 3.0 + 5.0
    want = 5.0 * math.sqrt(reference.truncated_normal_variance(1.0))
    assert ours.double().std().item() == pytest.approx(want, rel=1e-2)


def test_trunc_normal_tf_dtypes_generator_and_meta():
    gen = torch.Generator().manual_seed(3)
    a = init.trunc_normal_tf_(torch.empty(64, 64), std=0.1, generator=gen)
    b = init.trunc_normal_tf_(
        torch.empty(64, 64), std=0.1, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)
    bf = init.trunc_normal_tf_(torch.empty(100_000, dtype=torch.bfloat16), std=0.02)
    assert bf.dtype == torch.bfloat16
    assert bf.float().abs().max().item() <= 0.04
    d = init.trunc_normal_tf_(torch.empty(10, dtype=torch.float64), std=1.0)
    assert d.dtype == torch.float64 and d.abs().max().item() <= 2.0
    meta = torch.empty(5, 5, device="meta")
    assert init.trunc_normal_tf_(meta, std=0.02) is meta
    assert init.trunc_normal_tf_(torch.empty(0), std=0.02).numel() == 0


def test_trunc_normal_tf_inside_autograd():
    p = nn.Parameter(torch.zeros(8, 8))
    init.trunc_normal_tf_(p, std=0.02)
    assert p.requires_grad and p.grad_fn is None and p.abs().max() > 0


@pytest.mark.parametrize(
    "kwargs,name",
    [({"std": 0.0}, "std"), ({"std": -1.0}, "std"), ({"std": math.nan}, "std"),
     ({"bound": 0.0}, "bound"), ({"mean": math.inf}, "mean")],
)  # fmt: skip
def test_trunc_normal_tf_bad_input(kwargs, name):
    t = torch.zeros(4)
    with pytest.raises(ValueError, match=name):
        init.trunc_normal_tf_(t, **kwargs)
    assert torch.equal(t, torch.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        init.trunc_normal_tf_(torch.zeros(4, dtype=torch.long), std=1.0)


# -- LeCun / He / Xavier ---------------------------------------------------------------------


def test_standard_stds():
    # docs/reference/algorithms.md#initialisation
    assert init.lecun_std(768) == pytest.approx(0.0360844, abs=1e-7)
    assert init.xavier_std(768, 768) == pytest.approx(0.0360844, abs=1e-7)
    assert init.he_std(512) == pytest.approx(math.sqrt(2 / 512))
    assert init.xavier_std(100, 300) == pytest.approx(math.sqrt(2 / 400))
    # docs/reference/algorithms.md#initialisation-claims: truncated BERT std against LeCun at d =
    # 768, ratio 0.4875
    ratio = 0.02 * math.sqrt(init.TRUNCATED_NORMAL_VARIANCE) / init.lecun_std(768)
    assert ratio == pytest.approx(0.4875, abs=1e-4)
    assert init.uniform_bound(0.02) == pytest.approx(math.sqrt(3) * 0.02)
    assert init.fans(torch.empty(8, 4, 3, 3)) == (36, 72)


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
@pytest.mark.parametrize(
    "fn,variance",
    [(init.lecun_normal_, 1 / 500), (init.he_normal_, 2 / 500), (init.xavier_normal_, 2 / 2500)],
)
def test_variance_scaling_gives_exact_variance(fn, variance, distribution):
    w = torch.empty(2000, 500)  # fan_in 500, fan_out 2000
    fn(w, distribution, generator=torch.Generator().manual_seed(4))
    assert w.double().var().item() == pytest.approx(variance, rel=1e-2)
    if distribution == "uniform":
        assert w.abs().max().item() <= math.sqrt(3 * variance) + 1e-7
    if distribution == "truncated_normal":
        assert w.abs().max().item() <= 2 * math.sqrt(variance) * 1.1368473


@pytest.mark.parametrize(
    "kwargs,name",
    [({"mode": "fan"}, "mode"), ({"distribution": "cauchy"}, "distribution"),
     ({"scale": 0.0}, "scale")],
)  # fmt: skip
def test_variance_scaling_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        init.variance_scaling_(torch.empty(3, 3), **kwargs)
    with pytest.raises(ValueError, match="2 dims"):
        init.lecun_normal_(torch.empty(3))
    with pytest.raises(ValueError, match="fan_in"):
        init.lecun_std(0)


# -- bert_init_ ------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(128, 64))
        self.proj = nn.Linear(64, 256)
        self.norm = nn.LayerNorm(256)
        self.out = nn.Linear(256, 1000, bias=False)
        self.temperature = nn.Parameter(torch.tensor([7.0]))
        self.out.weight = nn.Parameter(torch.empty(1000, 256))


def test_bert_init():
    model = _Block()
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
        model.norm.bias.fill_(3.0)
        model.proj.bias.fill_(3.0)
    assert init.bert_init_(model, generator=torch.Generator().manual_seed(5)) is model
    for w in (model.embed.weight[1:], model.position, model.proj.weight, model.out.weight):
        assert w.abs().max().item() <= 0.04
        assert w.double().std().item() == pytest.approx(0.0175925, rel=0.03)
    assert torch.equal(model.embed.weight[0], torch.zeros(64))
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert torch.equal(model.norm.bias, torch.zeros(256))
    assert torch.equal(model.proj.bias, torch.zeros(256))
    assert model.temperature.item() == 7.0


def test_bert_init_tied_and_frozen_and_corrected():
    embed = nn.Embedding(4000, 100)
    head = nn.Linear(100, 4000, bias=False)
    head.weight = embed.weight
    frozen = nn.Linear(100, 100)
    frozen.requires_grad_(False)
    model = nn.Sequential(embed, frozen, head)
    init.bert_init_(model, std=0.05, correct_std=True)
    assert embed.weight.double().std().item() == pytest.approx(0.05, rel=0.01)
    assert frozen.weight.abs().max().item() <= 2 * 0.05 * 1.1368473
    assert frozen.weight.abs().max().item() > 0
    with pytest.raises(ValueError, match="std"):
        init.bert_init_(model, std=0.0)


# -- tied embeddings, sigmoid second moment --------------------------------------------------


def test_tied_embedding_std():
    assert init.tied_embedding_std(50000, 768) == pytest.approx(0.0140883, abs=1e-7)


def test_expected_initial_loss_tied():
    """docs/reference/algorithms.md#initialisation-tests: 27.71 for d = 768, σ = 1/√768, n = 50000
    (log n = 10.82)."""
    loss = init.expected_initial_loss_tied(50000, 768, 1 / math.sqrt(768))
    assert loss == pytest.approx(27.71, abs=5e-3)
    assert math.log(50000) == pytest.approx(10.82, abs=5e-3)
    # with σ = ln(n)/d the self-logit is ln n: log(n + n - 1)
    fixed = init.expected_initial_loss_tied(50000, 768, init.tied_embedding_std(50000, 768))
    assert fixed == pytest.approx(math.log(99999), rel=1e-12)
    # small σ: every logit ≈ 0, loss → log n
    assert init.expected_initial_loss_tied(50000, 768, 1e-9) == pytest.approx(
        math.log(50000), abs=1e-5
    )
    # no overflow for a huge self-logit
    assert init.expected_initial_loss_tied(50000, 10**6, 1.0) == pytest.approx(1e6)


@pytest.mark.parametrize(
    "args,name",
    [((1, 768, 0.02), "vocab_size"), ((50000, 0, 0.02), "dim"), ((50000, 768, 0.0), "std"),
     ((50000, 768, -0.02), "std")],
)  # fmt: skip
def test_tied_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        init.expected_initial_loss_tied(*args)


def test_activation_second_moment():
    sigmoid = init.activation_second_moment(torch.sigmoid)
    # docs/reference/algorithms.md#initialisation
    assert sigmoid == pytest.approx(0.2933790, abs=1e-7)
    constant = init.SIGMOID_SECOND_MOMENT
    assert constant == pytest.approx(sigmoid, abs=1e-10)
    assert init.activation_second_moment(torch.relu) == pytest.approx(0.5, abs=1e-7)
    assert init.activation_second_moment(lambda x: x) == pytest.approx(1.0, abs=1e-9)
    # the rescaled sigmoid keeps a unit second moment (checked by sampling)
    x = torch.randn(1_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    scaled = torch.sigmoid(x) / math.sqrt(init.SIGMOID_SECOND_MOMENT)
    assert scaled.square().mean().item() == pytest.approx(1.0, abs=3e-3)


@pytest.mark.gpu
def test_trunc_normal_tf_cuda_bf16():
    t = torch.empty(1_000_000, device="cuda", dtype=torch.bfloat16)
    init.trunc_normal_tf_(t, std=0.02)
    assert t.dtype == torch.bfloat16 and t.device.type == "cuda"
    assert t.float().abs().max().item() <= 0.04
    assert t.float().std().item() == pytest.approx(0.017593, abs=2e-4)

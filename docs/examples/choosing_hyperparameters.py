"""The worked examples of docs/choosing-hyperparameters.md.

    python docs/examples/choosing_hyperparameters.py           # print every example's output
    python docs/examples/choosing_hyperparameters.py --json    # {name: {"code", "output"}}
    python docs/examples/choosing_hyperparameters.py --write   # regenerate the page's blocks

Each function below is one example: its body is shown in the page as a code block, followed by
what it prints. tests/test_docs_hyperparameters.py runs this script and checks that the page
shows exactly this code and this output, so the numbers in the page cannot go stale.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import danlu
from danlu import init, recipes, scaling

PAGE = Path(__file__).resolve().parents[1] / "choosing-hyperparameters.md"
EXAMPLES: list[Callable[[], None]] = []


def example(fn: Callable[[], None]) -> Callable[[], None]:
    EXAMPLES.append(fn)
    return fn


# ----------------------------------------------------------------------------------------------
# Initialisation


@example
def init_std() -> None:
    d = 768  # BERT-base hidden size
    gamma = init.TRUNCATED_NORMAL_VARIANCE  # variance kept by a ±2σ truncation
    bert = 0.02 * math.sqrt(gamma)
    print(f"LeCun / Xavier std, d = {d}:          {init.lecun_std(d):.7f}")
    print(f"BERT's 0.02 after the ±2σ truncation:  {bert:.7f}")
    print(f"ratio to LeCun:                        {bert / init.lecun_std(d):.4f}")
    corrected = 0.02 * init.TRUNCATED_NORMAL_STD_FACTOR
    print(f"pass this for an exact std of 0.02:    {corrected:.7f}")

    gen = torch.Generator().manual_seed(0)
    ours = init.trunc_normal_tf_(torch.empty(3072, 768), std=0.02, generator=gen)
    torchs = nn.init.trunc_normal_(torch.empty(3072, 768), std=0.02, generator=gen)
    for label, w in [("danlu trunc_normal_tf_", ours), ("torch trunc_normal_", torchs)]:
        outside = bool((w.abs() > 0.04).any())
        print(f"{label:<23} std {w.std():.4f}, any |w| > 2σ = 0.04: {outside}")


@example
def bert_init_module() -> None:
    layer = nn.TransformerEncoderLayer(d_model=768, nhead=12, dim_feedforward=3072)
    init.bert_init_(layer, generator=torch.Generator().manual_seed(0))
    for name in ("linear1.weight", "self_attn.in_proj_weight", "linear1.bias", "norm1.weight"):
        p = layer.get_parameter(name)
        print(f"{name:<26} mean {p.mean():+.4f}  std {p.std():.4f}  max |p| {p.abs().max():.4f}")


@example
def tied_embeddings() -> None:
    for label, vocab, dim in [("BERT-base", 30522, 768), ("1B model", 32000, 2048)]:
        lecun = init.lecun_std(dim)
        tied = init.tied_embedding_std(vocab, dim)
        print(f"{label}: vocab {vocab}, d {dim}; log n = {math.log(vocab):.2f}")
        for what, std in [("LeCun 1/√d", lecun), ("half of LeCun", lecun / 2), ("BERT 0.02", 0.02),
                          ("ln(n)/d", tied)]:  # fmt: skip
            loss = init.expected_initial_loss_tied(vocab, dim, std)
            print(f"  σ = {std:.5f} ({what:<13}) initial loss ≈ {loss:6.2f}")


# ----------------------------------------------------------------------------------------------
# Sign optimizers (Lion, Tiger)


@example
def sign_optimizer_lr() -> None:
    for label, dim in [("BERT-base", 768), ("1B model", 2048)]:
        sigma = 1 / math.sqrt(dim)
        lion = recipes.sign_optimizer_hparams(sigma)  # α0 = 1.11e-3
        tiger = recipes.sign_optimizer_hparams(sigma, rms_relative=True)
        print(f"{label} (σ = 1/√{dim} = {sigma:.5f}):")
        print(f"  Lion:  lr = {lion.lr:.3e}, weight_decay = {lion.weight_decay:.4f}")
        print(f"  Tiger: lr = {tiger.lr:.3e}, weight_decay = {tiger.weight_decay:.4f}")
    bias = recipes.sign_optimizer_hparams(recipes.ELEMENTWISE_CHANGE_SCALE)
    print(f"biases and norms (σ = 0.5), Lion: lr = {bias.lr:.3e}")

    for label, lr, wd in [("BERT-base", 1e-4, 0.01), ("1B model", 3e-4, 0.1)]:
        lion = recipes.adamw_to_lion(lr, wd)  # factor 10
        print(f"{label}: AdamW (lr, wd) = ({lr:g}, {wd:g})", end="")
        print(f" -> Lion ({lion.lr:g}, {lion.weight_decay:g})")


@example
def amos_schedules() -> None:
    model = nn.Linear(768, 768)
    lr, wd = recipes.sign_optimizer_hparams(1 / math.sqrt(768))
    opt = danlu.Lion(model.parameters(), lr=lr, weight_decay=wd)
    schedule = recipes.InverseTimeDecayLR(opt, halving_step=100_000, alpha0=1.11e-3)
    print(f"inverse-time decay, halving at 100k steps: p0 = {schedule.rate:.4f}")

    print(f"{'step':>9} {'1/(α0·p·t+1)²':>15} {'1/(2·α0·p0·t+1)':>17}")
    for t in [0, 10_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]:
        square = recipes.inverse_square_decay(t, 100_000)
        time = recipes.inverse_time_decay(t, 100_000)
        print(f"{t:>9,} {square:>15.4f} {time:>17.4f}")


# ----------------------------------------------------------------------------------------------
# Learning rate against batch size


@example
def batch_size_rules() -> None:
    base_lr, base_batch = 1e-4, 256  # BERT-base with Adam
    print(f"{'batch':>7} {'linear':>9} {'sqrt':>9}")
    for batch in [256, 1024, 4096, 32768]:
        linear = scaling.scale_lr(base_lr, base_batch, batch, "linear")
        sqrt = scaling.scale_lr(base_lr, base_batch, batch, "sqrt")
        print(f"{batch:>7} {linear:>9.2e} {sqrt:>9.2e}")


@example
def noise_scale_monitor() -> None:
    # Regression y = x·w* + 3·noise, x ~ N(0, I_64), loss (x·w - y)², all at w = 0.
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(64, generator=gen)
    x = torch.randn(4096, 64, generator=gen)
    y = x @ w_star + 3.0 * torch.randn(4096, generator=gen)
    model = nn.Linear(64, 1, bias=False)
    nn.init.zeros_(model.weight)

    # 8 steps of 512 samples, each as 16 micro-batches of 32 (no optimizer: w stays at 0).
    monitor = scaling.NoiseScaleMonitor(model, micro_batch_size=32, ema=0.8)
    for xb, yb in zip(x.split(512), y.split(512), strict=True):
        monitor.backward_micro_batches(lambda a, b: F.mse_loss(model(a).squeeze(-1), b), xb, yb)
        step = monitor.update()
        model.zero_grad()
        print(f"this step {step.b_simple:5.1f}   smoothed {monitor.b_simple:5.1f}")

    # Exact: the per-sample gradient -2·x·y has mean g = -2w* and covariance
    # Σ = 4((|w*|² + 9)·I + w*w*ᵀ), so tr Σ / |g|² = 65 + 576/|w*|².
    print(f"exact B_simple: {65 + 576 / w_star.square().sum():.1f}")


@example
def lr_from_noise_scale() -> None:
    # Suppose the monitor settles at B_simple ≈ 2000, and the best lr at batch 256 is known.
    b_noise, batch0, lr0 = 2000.0, 256, 1e-4
    eta_max = lr0 * (1 + b_noise / batch0)  # invert η* = η_max / (1 + B_noise/B) for SGD
    kappa2 = b_noise  # for sign updates κ² is estimated like B_simple
    sign_max = lr0 / scaling.opt_lr_sign(batch0, 1.0, kappa2)  # invert the diagonal sign rule
    print(f"{'batch':>7} {'SGD':>9} {'sign':>9} {'steps':>8} {'samples':>11}")
    for batch in [256, 1024, 2048, 8192, 32768]:
        sgd = scaling.opt_lr_sgd(batch, eta_max, b_noise)
        sign = scaling.opt_lr_sign(batch, sign_max, kappa2)
        steps, samples = scaling.steps_data_tradeoff(10_000, 10_000 * b_noise, batch)
        print(f"{batch:>7} {sgd:>9.2e} {sign:>9.2e} {steps:>8.0f} {samples:>11.3e}")


@example
def adam_epsilon() -> None:
    # Per-coordinate gradients of a 1.2B-parameter model whose gradient norm is ≈ 1:
    g = 1 / math.sqrt(1.2e9)
    print(f"typical |g_i| ≈ {g:.1e}; softsign(g, eps) = g/√(g² + eps²):")
    for eps in [1e-8, 1e-6, 1e-5, 1e-4]:
        print(f"  eps = {eps:.0e}: {g / math.hypot(g, eps):.4f}")

    # The surge and how ε removes it (3 coordinates, g = 1, σ² = 4, H_ii = 1, H_ij = 0.9):
    g, sigma2 = [1.0, 1.0, 1.0], [4.0, 4.0, 4.0]
    hessian = [[1.0, 0.9, 0.9], [0.9, 1.0, 0.9], [0.9, 0.9, 1.0]]
    batches = [1, 4, 8, 20, 100, 10_000]
    print("batch:   " + "".join(f"{b:>8}" for b in batches) + "   peak at B")
    for eps in [0.0, 1.0]:
        s = scaling.softsign_noise_scale(g, sigma2, hessian, eps)
        lrs = "".join(f"{s.lr(b):8.4f}" for b in batches)
        peak = f"{s.b_noise:.2f}" if math.isfinite(s.b_noise) else "none"
        print(f"eps = {eps}:{lrs}   {peak}")


# ----------------------------------------------------------------------------------------------
# Rendering


def _body(fn: Callable[[], None]) -> str:
    lines = inspect.getsource(fn).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def ")) + 1
    return textwrap.dedent("\n".join(lines[start:])).strip("\n")


def render() -> dict[str, dict[str, str]]:
    """{example name: {"code": its body, "output": what it prints}}."""
    out = {}
    for fn in EXAMPLES:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            fn()
        out[fn.__name__] = {"code": _body(fn), "output": buffer.getvalue().rstrip("\n")}
    return out


def block(name: str, code: str, output: str) -> str:
    """The page's text for one example, between its markers."""
    return (
        f"<!-- example: {name} -->\n```python\n{code}\n```\n\nOutput:\n\n"
        f"```text\n{output}\n```\n<!-- /example -->"
    )


BLOCK = re.compile(r"<!-- example: (\w+) -->\n.*?<!-- /example -->", re.S)


def write(page: Path = PAGE) -> None:
    rendered = render()
    text = page.read_text(encoding="utf-8")
    text = BLOCK.sub(lambda m: block(m.group(1), **rendered[m.group(1)]), text)
    page.write_text(text, encoding="utf-8")


def main(argv: list[str]) -> None:
    if "--write" in argv:
        write()
    elif "--json" in argv:
        print(json.dumps(render(), ensure_ascii=False))
    else:
        for name, item in render().items():
            print(f"== {name}\n{item['output']}\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])

"""Lightning's ``configure_optimizers`` with danlu optimizers, wrappers and schedulers: the run
equals a plain loop, and a checkpoint resumes it exactly."""

import logging
import warnings

import lightning
import pytest
import torch
from torch import nn

import danlu

STEPS, HALF = 10, 5


class Regressor(lightning.LightningModule):
    def __init__(self, build):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))
        self.build = build

    def forward(self, tokens):
        return self.body(self.embed(tokens).mean(dim=1))

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return nn.functional.mse_loss(self(tokens), target)

    def configure_optimizers(self):
        opt, sched = self.build(self)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def tiger(model):
    opt = danlu.Tiger(danlu.param_groups(model, weight_decay=0.01), lr=0.2)
    return opt, danlu.schedules.PiecewiseLinearLR(opt, {2: 1.0, STEPS: 0.2})


def guarded_lion(model):
    opt = danlu.NonFiniteGuard(danlu.Lion(model.parameters(), lr=3e-3, weight_decay=0.1))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))


def amos(model):
    opt = danlu.Amos(danlu.param_groups(model, output_layer=model.body[3]), lr=0.3)
    return opt, danlu.recipes.InverseTimeDecayLR(opt, halving_step=4)


BUILDERS = {"tiger": tiger, "guarded-lion": guarded_lion, "amos": amos}


def data():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 10, (16, 4), generator=gen)
    target = torch.randn(16, 1, generator=gen)
    return tokens, target


def loader():
    # one batch holding the whole data set: every step sees the same batch, in any order
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=16)


def trainer(max_steps, **kw):
    return lightning.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no validation loop", "few workers", ...
        yield


def plain_loop(build, steps):
    model = Regressor(build)
    opt, sched = build(model)
    tokens, target = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), target)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lightning_fit_equals_a_plain_loop(name):
    build = BUILDERS[name]
    model = Regressor(build)
    trainer(STEPS).fit(model, loader())
    reference, losses = plain_loop(build, STEPS)
    assert losses[-1] < 0.9 * losses[0]
    for (pname, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=pname)
    opt = model.optimizers().optimizer
    assert isinstance(opt, torch.optim.Optimizer) and opt.state


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lightning_checkpoint_resumes_exactly(name, tmp_path):
    build = BUILDERS[name]
    straight = Regressor(build)
    trainer(STEPS).fit(straight, loader())

    first = Regressor(build)
    run = trainer(HALF)
    run.fit(first, loader())
    path = tmp_path / "half.ckpt"
    run.save_checkpoint(path)
    resumed = Regressor(build)
    with torch.no_grad():  # start from other weights: the checkpoint must restore them
        for p in resumed.parameters():
            p.add_(1.0)
    trainer(STEPS).fit(resumed, loader(), ckpt_path=path)
    for (pname, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), pname

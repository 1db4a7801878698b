"""A torch.compile'd training step containing ``opt.step()`` equals eager, and an LR scheduler
changing a tensor lr does not recompile (pytorch#133898)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import danlu


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize("name", ["lion", "tiger"])
def test_compiled_step_equals_eager_without_recompiling(name):
    x = torch.randn(32, 8)
    y = torch.randn(32, 1)
    params = {}
    frames = []
    for mode in ("eager", "compiled"):
        model = make_model()
        opt = danlu.create_optimizer(name, model, lr=torch.tensor(1e-2))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

        def train_step(model=model, opt=opt):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        counter = CompileCounterWithBackend("inductor")
        step = torch.compile(train_step, backend=counter) if mode == "compiled" else train_step
        for _ in range(5):
            step()
            sched.step()
            frames.append(counter.frame_count) if mode == "compiled" else None
        params[mode] = [p.detach().clone() for p in model.parameters()]
    assert frames[0] > 0
    assert frames[1:] == [frames[0]] * 4, f"recompiled when the lr changed: {frames}"
    for a, b in zip(params["eager"], params["compiled"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

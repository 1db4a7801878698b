"""Train a small model with AdamW, Lion and Tiger and print the losses (a quick smoke demo)."""

import torch
from torch import nn

import danlu


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen)) + 0.1 * torch.randn(512, 1, generator=gen)
    optimizers = {
        "AdamW(lr=1e-2, wd=0.01)": lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, weight_decay=0.01
        ),
        "Lion(lr=1e-3, wd=0.1)": lambda m: danlu.Lion(m.parameters(), lr=1e-3, weight_decay=0.1),
        "Tiger(lr=2e-2, wd=0.01)": lambda m: danlu.Tiger(
            danlu.param_groups(m), lr=2e-2, weight_decay=0.01
        ),
    }
    print(f"{'optimizer':<26}" + "".join(f"{'step ' + str(s):>10}" for s in (0, 50, 100, 200)))
    for label, make_opt in optimizers.items():
        model = make_model(1)
        opt = make_opt(model)
        losses = {}
        for step in range(201):
            loss = nn.functional.mse_loss(model(x), y)
            if step in (0, 50, 100, 200):
                losses[step] = loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{label:<26}" + "".join(f"{v:>10.4f}" for v in losses.values()))


if __name__ == "__main__":
    main()

"""``embedding-drift``: the embedding anomaly of Lion and Tiger (blog: kexue.fm/archives/9736;
docs: the Tiger page and ``danlu.Lazy``) on the user's machine. Rows of tokens seen once drift
toward ∓1/λ under Tiger (the momentum they left never reaches 0, so sign(m) keeps moving them),
next to the blog's countermeasures: lazy updates, Adam for the embeddings, tied embeddings +
HalfSwap."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

import danlu
from danlu.cli.common import (
    Context,
    PeakMemory,
    RunResult,
    RunSpec,
    TaskResult,
    seed_everything,
    state_bytes_per_param,
    warmup_steps,
)
from danlu.cli.sweep import Report, Task
from danlu.diagnostics import embedding_drift

NAME = "embedding-drift"
DESCRIPTION = (
    "Zipf tokens + 16 tokens seen once; Tiger (λ = 0.2, so 1/λ = 5) and the fixes; "
    "max |θ|·λ over the rare rows"
)
COMMON, RARE, DIM, LENGTH, BATCH = 128, 16, 32, 16, 16
VOCAB = COMMON + RARE
LAMBDA, ALPHA = 0.2, 0.03  # a large λ keeps the run short: the limit 1/λ is 5
VARIANTS = {
    "tiger": "Tiger (untied)",
    "tiger+lazy": "Tiger + danlu.Lazy",
    "adam-embeddings": "Adam for embeddings, Tiger for the rest (MultiOptimizer)",
    "tied+halfswap": "Tiger, tied embeddings + HalfSwap",
}


class ZipfLM(nn.Module):
    """Next-token model: embeddings of the current and previous token, a mixing layer and a
    norm; an untied head, or (tied) the embedding table itself behind a HalfSwap."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        std = danlu.nn.tied_embedding_std(VOCAB, DIM) if tied else 0.1
        nn.init.normal_(self.embed.weight, std=std)
        self.mix = nn.Linear(2 * DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.tied = tied
        self.swap = danlu.nn.HalfSwap()
        self.head = None if tied else nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        h = self.norm(torch.tanh(self.mix(torch.cat([e, prev], dim=-1))) + e)
        if self.head is None:
            return self.swap(h) @ self.embed.weight.T
        return self.head(h)


def zipf_batches(seed: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Common tokens with Zipf(1) frequencies (half the next tokens follow a fixed permutation);
    rare token ``COMMON + i`` appears once, in batch i."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, COMMON + 1, dtype=torch.float64)
    follow_map = torch.randperm(COMMON, generator=gen)
    step = 0
    while True:
        x = torch.multinomial(probs / probs.sum(), BATCH * (LENGTH + 1), True, generator=gen)
        x = x.view(BATCH, LENGTH + 1)
        follow = torch.rand(BATCH, LENGTH, generator=gen) < 0.5
        x[:, 1:] = torch.where(follow, follow_map[x[:, :-1]], x[:, 1:])
        if step < RARE:
            x[step % BATCH, LENGTH // 2] = COMMON + step
        step += 1
        yield x[:, :-1].to(device), x[:, 1:].to(device)


def make(variant: str, model: nn.Module) -> torch.optim.Optimizer:
    if variant == "adam-embeddings":
        return danlu.MultiOptimizer.adam_for_embeddings(
            model, lr=ALPHA, weight_decay=LAMBDA, embedding_lr=1e-2
        )
    opt = danlu.Tiger(danlu.param_groups(model, weight_decay=LAMBDA), lr=ALPHA)
    return danlu.Lazy(opt) if variant == "tiger+lazy" else opt


def rare_ratios(model: nn.Module) -> torch.Tensor:
    """|θ|·λ of each rare row's largest entry (1 = at the limit ∓1/λ)."""
    embed = model.get_submodule("embed")
    assert isinstance(embed, nn.Embedding)
    return embed.weight.detach()[COMMON:].abs().amax(dim=1).cpu() * LAMBDA


STEPS, QUICK_STEPS, TIMING_STEPS = 400, 200, 60
#: seconds per step on one core (measured; for the ETA)
STEP_SECONDS = 0.003


class DriftTask(Task):
    name = NAME
    description = DESCRIPTION
    metric = "max |θ|·λ of rare rows"
    higher_is_better = False

    def steps(self, ctx: Context) -> int:
        return ctx.steps or (QUICK_STEPS if ctx.quick else STEPS)

    def _spec(self, ctx: Context, variant: str, steps: int, purpose: str) -> RunSpec:
        return RunSpec(
            task=NAME,
            label=variant,
            optimizer="tiger",
            hparams={"lr": ALPHA, "weight_decay": LAMBDA},
            seed=ctx.seed,
            steps=steps,
            quick=ctx.quick,
            device=str(ctx.device),
            purpose=purpose,
            cost=0.2 + steps * STEP_SECONDS,
        )

    def plan(self, ctx: Context) -> list[RunSpec]:
        return [self._spec(ctx, v, self.steps(ctx), "sweep") for v in VARIANTS]

    def timing_specs(self, ctx: Context, result: TaskResult | None) -> list[RunSpec]:
        steps = min(TIMING_STEPS, self.steps(ctx))
        return [self._spec(ctx, v, steps, "timing") for v in VARIANTS]

    def timing_cost(self, ctx: Context) -> float:
        return sum(s.cost for s in self.timing_specs(ctx, None))

    def execute(self, spec: RunSpec, report: Report) -> RunResult:
        device = torch.device(spec.device)
        variant, steps, timing = spec.label, spec.steps, spec.purpose == "timing"
        every = max(steps // 40, 1)
        seed_everything(spec.seed)
        model = ZipfLM(tied=variant == "tied+halfswap").to(device)
        opt = make(variant, model)
        result = RunResult(
            label=variant,
            hparams=dict(spec.hparams),
            optimizer="tiger",
            seed=spec.seed,
            extra={"description": VARIANTS[variant], "rare_rows": []},
        )
        batches = zipf_batches(spec.seed, device)
        skip = warmup_steps(steps)
        wall = cpu = 0.0
        memory = PeakMemory(device) if timing else contextlib.nullcontext()
        with memory:
            for step in range(1, steps + 1):
                x, y = next(batches)
                t0, c0 = time.perf_counter(), time.thread_time()
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
                loss.backward()
                opt.step()
                loss_value = loss.item()
                if step > skip:
                    wall += time.perf_counter() - t0
                    cpu += time.thread_time() - c0
                result.steps.append(step)
                result.losses.append(loss_value)
                if not timing and (step % every == 0 or step == steps):
                    ratios = rare_ratios(model)
                    result.eval_steps.append(step)
                    result.metrics.append(ratios.max().item())
                    result.extra["rare_rows"].append(ratios.tolist())
                report(1)
        result.state_bytes_per_param = state_bytes_per_param(opt, model)
        if timing:
            result.seconds_per_step = wall / max(steps - skip, 1)
            result.cpu_seconds_per_step = cpu / max(steps - skip, 1)
            if isinstance(memory, PeakMemory):
                result.peak_memory_bytes = memory.peak
            return result
        report_ = embedding_drift(model.embed.weight.detach()[COMMON:], LAMBDA, threshold=0.5)
        result.final_metric = result.metrics[-1]
        result.extra.update(
            mean_ratio=float(rare_ratios(model).mean()),
            rows_past_half=report_.num_drifting,
            report=str(report_),
        )
        return result

    def summarize(
        self, ctx: Context, specs: Sequence[RunSpec], results: Sequence[RunResult]
    ) -> TaskResult:
        return TaskResult(
            name=NAME,
            description=DESCRIPTION,
            metric=self.metric,
            higher_is_better=False,
            runs=list(results),
            settings={
                "steps": self.steps(ctx),
                "lambda": LAMBDA,
                "limit": 1 / LAMBDA,
                "tiger_lr": ALPHA,
                "common_tokens": COMMON,
                "rare_tokens": RARE,
                "dim": DIM,
                "tied_init_std": danlu.nn.tied_embedding_std(VOCAB, DIM),
                "steps_per_unit_growth": math.log(1 / LAMBDA / 0.1) / ALPHA,
            },
            notes=[
                "1.0 means a row sits at the limit ∓1/λ; Tiger's untied rare rows run there.",
                "Lazy updates and Adam for the embeddings keep them near their init.",
                "Tied embeddings give the rows a gradient every step (their momentum is not "
                "frozen), but for a token that is never predicted the softmax push has a "
                "consistent sign, so a sign optimizer still drives the row outward: in our runs "
                "tying does not bound it.",
            ],
            columns=[("rows past ½", "rows_past_half", "d")],
        )


TASK = DriftTask()

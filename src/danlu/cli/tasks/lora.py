"""``lora``: LoRA-GA and LoRA-Pro (blog: kexue.fm/archives/10226 and 10266; docs: lora.md) on
the user's machine. A small char-level transformer pretrained on Python code, then fine-tuned on
prose with full fine-tuning, LoRA, LoRA-GA and LoRA-GA + LoRA-Pro at equal steps; validation
bits per character and trainable parameters. Not in the default run (it takes a few minutes);
``danlu compare --task lora``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from danlu.cli.common import Context, RunResult, RunSpec, TaskResult
from danlu.cli.sweep import Report, Task
from danlu.cli.tasks import lora_experiment

NAME = "lora"
DESCRIPTION = (
    "char-LM pretrained on code, fine-tuned on prose: full, LoRA, LoRA-GA, "
    "LoRA-GA + LoRA-Pro; validation bits/char"
)
#: seconds per fine-tuning step (pretraining and four methods included) on one core
STEP_SECONDS = 0.6


class LoRATask(Task):
    name = NAME
    description = DESCRIPTION
    metric = "validation bits/char"
    higher_is_better = False

    def plan(self, ctx: Context) -> list[RunSpec]:
        steps = ctx.steps or (40 if ctx.quick else 200)
        return [
            RunSpec(
                task=NAME,
                label="lora",
                optimizer="adamw",
                hparams={},
                seed=ctx.seed,
                steps=steps,
                quick=ctx.quick,
                device=str(ctx.device),
                text=ctx.text,
                cost=2.0 + steps * STEP_SECONDS,
            )
        ]

    def execute(self, spec: RunSpec, report: Report) -> RunResult:
        text = None
        if spec.text:
            with open(spec.text, "rb") as f:
                text = f.read(300_000).decode("utf-8", errors="replace")
        result = lora_experiment.run(text, steps=spec.steps, seed=spec.seed, device=spec.device)
        report(spec.steps)
        return RunResult(label="lora", hparams={}, extra={"experiment": result})

    def summarize(
        self, ctx: Context, specs: Sequence[RunSpec], results: Sequence[RunResult]
    ) -> TaskResult:
        (spec,), (raw,) = specs, results
        result = raw.extra["experiment"]
        cfg = result["config"]
        runs = []
        for row in result["rows"]:
            curve = row["curve"]
            lr = cfg["lr_full"] if row["method"] == "full fine-tuning" else cfg["lr_lora"]
            runs.append(
                RunResult(
                    label=row["method"],
                    hparams={"lr": lr},
                    eval_steps=sorted(curve),
                    metrics=[curve[k] for k in sorted(curve)],
                    final_metric=row["val_bpc"],
                    seconds_per_step=row["seconds"] / spec.steps,
                    state_bytes_per_param=math.nan,
                    extra={"trainable_params": row["trainable_params"]},
                )
            )
        return TaskResult(
            name=NAME,
            description=DESCRIPTION,
            metric=self.metric,
            higher_is_better=False,
            runs=runs,
            settings={**cfg, "baseline_val_bpc": result["baseline_val_bpc"]},
            notes=[
                f"before fine-tuning: {result['baseline_val_bpc']:.4f} bits/char; trainable "
                "parameters: "
                + ", ".join(f"{r.label} {r.extra['trainable_params']:,}" for r in runs)
            ],
            columns=[("trainable params", "trainable_params", ",")],
        )


TASK = LoRATask()

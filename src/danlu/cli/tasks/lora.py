"""``lora``: SPEC §10 on the user's machine. A small char-level transformer pretrained on Python
code, then fine-tuned on prose with full fine-tuning, LoRA, LoRA-GA and LoRA-GA + LoRA-Pro at
equal steps; validation bits per character and trainable parameters. Not in the default run
(it takes a few minutes); ``danlu compare --task lora``."""

from __future__ import annotations

import math

from danlu.cli.common import Context, RunResult, TaskResult
from danlu.cli.tasks import lora_experiment

NAME = "lora"
DESCRIPTION = (
    "char-LM pretrained on code, fine-tuned on prose: full, LoRA, LoRA-GA, "
    "LoRA-GA + LoRA-Pro; validation bits/char"
)


def run(ctx: Context) -> TaskResult:
    steps = ctx.steps or (40 if ctx.quick else 200)
    text = None
    if ctx.text:
        with open(ctx.text, "rb") as f:
            text = f.read(300_000).decode("utf-8", errors="replace")
    bar = ctx.progress(f"{NAME} · pretrain + 4 methods", 1)
    result = lora_experiment.run(text, steps=steps, seed=ctx.seed, device=str(ctx.device))
    bar.advance()
    bar.close()
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
                seconds_per_step=row["seconds"] / steps,
                state_bytes_per_param=math.nan,
                extra={"trainable_params": row["trainable_params"]},
            )
        )
    return TaskResult(
        name=NAME,
        description=DESCRIPTION,
        metric="validation bits/char",
        higher_is_better=False,
        runs=runs,
        settings={**cfg, "baseline_val_bpc": result["baseline_val_bpc"]},
        notes=[
            f"before fine-tuning: {result['baseline_val_bpc']:.4f} bits/char; trainable "
            "parameters: " + ", ".join(f"{r.label} {r.extra['trainable_params']:,}" for r in runs)
        ],
    )

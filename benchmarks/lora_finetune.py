"""Fine-tuning a small char-level causal transformer: full, LoRA, LoRA-GA, LoRA-GA + LoRA-Pro
(docs/reference/algorithms.md#lora). The experiment lives in ``danlu.cli.tasks.lora_experiment`` (it
is also the ``lora`` task of ``danlu compare``); this script prints its table.

    python benchmarks/lora_finetune.py [--steps 200] [--seed 0] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from danlu.cli.tasks.lora_experiment import *  # noqa: F403 - the experiment's public names
from danlu.cli.tasks.lora_experiment import format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_table(run(steps=args.steps, seed=args.seed, device=args.device)))


if __name__ == "__main__":
    main()

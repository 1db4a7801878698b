"""benchmarks/lora_finetune.py runs end to end (tiny settings) and reports what it claims."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_finetune.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lora_finetune", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    # small matmuls on an oversubscribed CPU (pytest -n 2 on 2 cores) crawl with 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_reports_every_method(bench, one_thread):
    text = bench.default_text(chars_per_part=6_000)
    result = bench.run(text, steps=2, seed=0, device="cpu", pretrain_steps=2, ga_batches=2)
    cfg = result["config"]
    assert [row["method"] for row in result["rows"]] == [
        "full fine-tuning",
        "LoRA",
        "LoRA-GA",
        "LoRA-GA + LoRA-Pro",
    ]
    # LoRA on q, k, v, o (width→width) and fc1, fc2 (width↔4·width) of every block: r(in+out)
    w, r = cfg["width"], cfg["rank"]
    lora_params = cfg["layers"] * r * (4 * 2 * w + 2 * (w + 4 * w))
    counts = [row["trainable_params"] for row in result["rows"]]
    assert counts == [cfg["total_params"]] + [lora_params] * 3
    assert math.isfinite(result["baseline_val_bpc"]) and result["baseline_val_bpc"] > 0
    for row in result["rows"]:
        assert math.isfinite(row["val_bpc"]) and 0 < row["val_bpc"] < 2 * math.log2(cfg["vocab"])
    table = bench.format_table(result)
    assert "LoRA-GA + LoRA-Pro" in table and "bpc @2" in table
    assert all(sorted(row["curve"]) == [1, 2] for row in result["rows"])

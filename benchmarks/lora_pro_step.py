"""Optimizer-step time of LoRA-Pro (docs/reference/algorithms.md#lora-pro) against plain AdamW on
the same adapters.

Reports ratios measured in the same run (DESIGN.md "Performance"):

* ``LoRAPro(mode="efficient")`` / ``torch.optim.AdamW`` on the LoRA factors: the cost of the
  gradient adjustment (batched r×r eigen-decompositions, one host sync per step);
* a per-adapter adjustment written the way docs/reference/algorithms.md#lora-pro describes the
  reference code (two ``pinv(M + 1e-8 I)`` and a complex ``torch.linalg.eig`` Sylvester solve per
  adapter, then AdamW) / AdamW: what the batched symmetric solve saves;
* ``LoRAPro(mode="full")`` / ``torch.optim.AdamW`` on full weights of the same shapes (full
  fine-tuning): both keep out×in moments.

``python benchmarks/lora_pro_step.py [--adapters 24 --width 512 --rank 16 --device cpu]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

import danlu


def _reference_style_adjust(triples: list[tuple[Tensor, Tensor, float]]) -> None:
    """The reference's recipe per adapter (docs/reference/algorithms.md#lora-pro "Inverses",
    "Sylvester solver")."""
    for A, B, s in triples:
        gA, gB = A.grad, B.grad
        eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
        gram_a, gram_b = A @ A.T, B.T @ B
        gram_a_inv = torch.linalg.pinv(gram_a + 1e-8 * eye)
        gram_b_inv = torch.linalg.pinv(gram_b + 1e-8 * eye)
        rhs = -(1 / s**2) * gram_b_inv @ gA @ A.T
        # X with gram_b X + X gram_a = rhs through complex eigendecompositions
        lam, P = torch.linalg.eig(gram_b)
        mu, Q = torch.linalg.eig(-gram_a)
        core = torch.linalg.solve(P, rhs.to(P.dtype) @ Q)
        X = (P @ (core / (lam[:, None] - mu[None, :])) @ torch.linalg.inv(Q)).real
        new_A = (1 / s**2) * gram_b_inv @ gA + X @ A
        proj = gB - B @ (gram_b_inv @ (B.T @ gB))
        new_B = (1 / s**2) * proj @ gram_a_inv - B @ X
        gA.copy_(new_A)
        gB.copy_(new_B)


def _time(step, repeats: int) -> float:
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def run(
    adapters: int = 24, width: int = 512, rank: int = 16, device: str = "cpu", repeats: int = 10
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    triples = []
    for _ in range(adapters):
        A = torch.nn.Parameter(torch.randn(rank, width, generator=gen).to(device) / width**0.5)
        B = torch.nn.Parameter(torch.randn(width, rank, generator=gen).to(device) / rank**0.5)
        A.grad = torch.randn(rank, width, generator=gen).to(device)
        B.grad = torch.randn(width, rank, generator=gen).to(device)
        triples.append((A, B, 2.0))
    grads = [(A.grad.clone(), B.grad.clone()) for A, B, _ in triples]
    params = [p for A, B, _ in triples for p in (A, B)]

    def restore() -> None:
        for (A, B, _), (gA, gB) in zip(triples, grads, strict=True):
            A.grad.copy_(gA)
            B.grad.copy_(gB)

    adamw = torch.optim.AdamW(params, lr=1e-6)
    efficient = danlu.lora.LoRAPro(triples, lr=1e-6)
    reference = torch.optim.AdamW(params, lr=1e-6)

    def reference_step() -> None:
        restore()
        _reference_style_adjust(triples)
        reference.step()

    def efficient_step() -> None:
        restore()
        efficient.step()

    def adamw_step() -> None:
        restore()
        adamw.step()

    t_adamw = _time(adamw_step, repeats)
    t_eff = _time(efficient_step, repeats)
    t_ref = _time(reference_step, repeats)

    full = danlu.lora.LoRAPro(triples, mode="full", lr=1e-6)
    weights = [torch.nn.Parameter(torch.zeros(width, width, device=device)) for _ in triples]
    for w in weights:
        w.grad = torch.randn(width, width, generator=gen).to(device)
    full_ft = torch.optim.AdamW(weights, lr=1e-6)

    def full_step() -> None:
        restore()
        full.step()

    t_full = _time(full_step, repeats)
    t_full_ft = _time(full_ft.step, repeats)
    return {
        "adamw_ms": 1e3 * t_adamw,
        "lora_pro_efficient_ms": 1e3 * t_eff,
        "reference_style_ms": 1e3 * t_ref,
        "lora_pro_full_ms": 1e3 * t_full,
        "adamw_full_finetune_ms": 1e3 * t_full_ft,
        "efficient_over_adamw": t_eff / t_adamw,
        "reference_style_over_efficient": t_ref / t_eff,
        "full_over_full_finetune_adamw": t_full / t_full_ft,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.adapters, args.width, args.rank, args.device)
    for key, value in result.items():
        print(f"{key:<34}{value:>10.3f}")


if __name__ == "__main__":
    main()

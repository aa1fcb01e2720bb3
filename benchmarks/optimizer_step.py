"""Optimizer step time on the hidden matrices of a GPT (width 512, depth 8 by default).

    python benchmarks/optimizer_step.py [--width 512] [--depth 8] [--steps 5] [--device cpu]

Prints a table: milliseconds per optimizer step (median over --steps, after 2 warm-up
steps) and the ratio to the reference implementation on the same parameters and settings.
Targets (issue 4): Muon ≤ 1.0× torch.optim.Muon.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import Muon


def hidden_matrices(width: int, depth: int, device: str) -> list[torch.Tensor]:
    with torch.device("meta"):
        model = GPT(
            GPTConfig(width=width, depth=depth, n_heads=2, vocab_size=65, block_size=8), _bare=True
        )
    shapes = [
        p.shape for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2
    ]
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen).div_(s[1] ** 0.5).to(device).requires_grad_() for s in shapes
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    params = hidden_matrices(args.width, args.depth, args.device)
    n = sum(p.numel() for p in params)
    reference = time_steps(
        torch.optim.Muon(params, lr=0.02, weight_decay=0.0), args.steps, args.device
    )
    rows.append(("torch.optim.Muon (bf16 NS on CPU)", reference, 1.0))
    for label, kwargs in [
        ("spectral_mup Muon, NS in bf16", {"ns_dtype": torch.bfloat16}),
        ("spectral_mup Muon, default NS dtype", {}),
    ]:
        ours = time_steps(
            Muon(
                hidden_matrices(args.width, args.depth, args.device),
                lr=0.02,
                shape_factor="original",
                **kwargs,
            ),
            args.steps,
            args.device,
        )
        rows.append((label, ours, ours / reference))
    print(
        f"optimizer step on {len(params)} hidden matrices of GPT width {args.width}, depth "
        f"{args.depth} ({n / 1e6:.1f}M parameters), device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"| {'optimizer':<40} | {'ms/step':>8} | {'× reference':>11} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 13}|")
    for label, ms, ratio in rows:
        print(f"| {label:<40} | {ms:>8.1f} | {ratio:>11.2f} |")


if __name__ == "__main__":
    main()

"""Optimizer step time on the matrices of a GPT (width 512, depth 8 by default).

    python benchmarks/optimizer_step.py [--width 512] [--depth 8] [--steps 5] [--device cpu]
        [--optimizers muon,shampoo,soap]

Prints a table: milliseconds per optimizer step and the ratio to the reference
implementation on the same parameters and settings. Muon: the hidden matrices, median over
--steps after 2 warm-up steps. Shampoo and SOAP: every matrix of the GPT (embedding, hidden,
head), mean over --steps × (preconditioner period) steps after the first call, so the
amortized root / eigenbasis refresh is included. References: torch.optim.Muon,
pytorch_optimizer.Shampoo, pytorch_optimizer.SOAP (test extra).
Targets (issue 4): Muon ≤ 1.0× torch.optim.Muon; Shampoo and SOAP ≥ 1.5× faster.
``--optimizers adamw``: the AdamW step build_optimizer makes (torch's fused one where it
exists) against torch.optim.AdamW built by default (its foreach step), on every matrix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import Muon


def hidden_matrices(
    width: int, depth: int, device: str, every_matrix: bool = False
) -> list[torch.Tensor]:
    with torch.device("meta"):
        model = GPT(
            GPTConfig(width=width, depth=depth, n_heads=2, vocab_size=65, block_size=8), _bare=True
        )
    shapes = [
        p.shape
        for n, p in model.named_parameters()
        if p.ndim == 2 and (every_matrix or n.startswith("blocks."))
    ]
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen).div_(s[1] ** 0.5).to(device).requires_grad_() for s in shapes
    ]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str, warmup: int = 2) -> float:
    """Median ms of ``steps`` single steps after ``warmup`` steps."""
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_period(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Mean ms per step over ``steps`` steps after the first (initializing) call."""
    opt.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kronecker_rows(args, kind: str) -> list[tuple[str, float, float]]:
    """Ours vs pytorch_optimizer at equal settings on every GPT matrix."""
    import pytorch_optimizer as po

    from spectral_mup.optim import SOAP, Shampoo

    def params():
        return hidden_matrices(args.width, args.depth, args.device, every_matrix=True)

    if kind == "shampoo":  # Gupta et al. 2018: e = 1/4, sums, roots every `period` steps
        period = args.shampoo_period
        ref = po.Shampoo(params(), lr=1e-3, preconditioning_compute_steps=period, matrix_eps=1e-6)
        ours = Shampoo(params(), lr=1e-3, epsilon=1e-6, precondition_frequency=period)
        label = f"Shampoo (roots every {period})"
    else:  # official defaults: betas 0.95, refresh every 10, decay 0.01
        period = 10
        ref = po.SOAP(params(), lr=3e-3, precondition_frequency=period)
        ours = SOAP(params(), lr=3e-3, precondition_frequency=period)
        label = "SOAP (refresh every 10)"
    steps = args.steps * period
    reference = time_period(ref, steps, args.device)
    mine = time_period(ours, steps, args.device)
    return [
        (f"pytorch_optimizer {label}", reference, 1.0),
        (f"spectral_mup {label}", mine, mine / reference),
    ]


def muon_rows(args) -> list[tuple[str, float, float]]:
    """Ours vs torch.optim.Muon (original shape factor) on the hidden matrices."""
    params = hidden_matrices(args.width, args.depth, args.device)
    reference = time_steps(
        torch.optim.Muon(params, lr=0.02, weight_decay=0.0), args.steps, args.device
    )
    rows = [("torch.optim.Muon (bf16 NS on CPU)", reference, 1.0)]
    for label, kwargs in [
        ("spectral_mup Muon, NS in bf16", {"ns_dtype": torch.bfloat16}),
        ("spectral_mup Muon, default NS dtype", {}),
    ]:
        opt = Muon(
            hidden_matrices(args.width, args.depth, args.device),
            lr=0.02,
            shape_factor="original",
            **kwargs,
        )
        ours = time_steps(opt, args.steps, args.device)
        rows.append((label, ours, ours / reference))
    return rows


def adamw_rows(args) -> list[tuple[str, float, float]]:
    """Ours (build_optimizer: torch's AdamW with its fused step, optim.fused_option) vs
    torch.optim.AdamW as constructed by default (the foreach step), on every GPT matrix."""
    from spectral_mup.optim import fused_option

    def params():
        return hidden_matrices(args.width, args.depth, args.device, every_matrix=True)

    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    reference = time_steps(torch.optim.AdamW(params(), **kw), args.steps, args.device)
    ps = params()
    fused = fused_option(torch.optim.AdamW, {}, [{"params": ps}])
    ours = time_steps(torch.optim.AdamW(ps, **kw, **fused), args.steps, args.device)
    return [
        ("torch.optim.AdamW (default: foreach)", reference, 1.0),
        (f"spectral_mup AdamW ({'fused' if fused else 'foreach'})", ours, ours / reference),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizers", default="muon,shampoo,soap")
    parser.add_argument(
        "--shampoo-period", type=int, default=1, help="Shampoo: steps between roots"
    )
    args = parser.parse_args()
    kinds = args.optimizers.split(",")
    rows = muon_rows(args) if "muon" in kinds else []
    if "adamw" in kinds:
        rows.extend(adamw_rows(args))
    for kind in ("shampoo", "soap"):
        if kind in kinds:
            rows.extend(kronecker_rows(args, kind))
    hidden = hidden_matrices(args.width, args.depth, "meta")
    every = hidden_matrices(args.width, args.depth, "meta", every_matrix=True)
    print(
        f"GPT width {args.width}, depth {args.depth}, device {args.device}, "
        f"{torch.get_num_threads()} threads. Muon: {len(hidden)} hidden matrices "
        f"({sum(p.numel() for p in hidden) / 1e6:.1f}M); Shampoo/SOAP: {len(every)} matrices "
        f"incl. embedding and head ({sum(p.numel() for p in every) / 1e6:.1f}M)"
    )
    print(f"| {'optimizer':<50} | {'ms/step':>8} | {'× reference':>11} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 13}|")
    for label, ms, ratio in rows:
        print(f"| {label:<50} | {ms:>8.1f} | {ratio:>11.2f} |")


if __name__ == "__main__":
    main()

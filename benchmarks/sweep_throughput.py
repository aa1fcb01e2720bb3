"""Sweep throughput, stacked vs one run per task: runs/hour through ``smup sweep`` itself.

Per width, one sweep of the demo's run shape (configs/sweeps/width_base.toml: depth 2,
2 heads, batch 16 × 64, AdamW, μP) over ``--lrs`` LRs × 2 seeds, end to end (process pool,
training, evals, store), trained three ways into fresh stores: one run per task
(``batch_runs = 1``), stacks of ``--k`` runs, and auto (``batch_runs = 0``). Then the
single run's time split (torch profiler, one step): the share in matmul, attention and
GELU/norm kernels — arithmetic a stack cannot remove — and the rest, per-op overhead and
the optimizer, which it can.

    SMUP_DATA_DIR=../shared/data python benchmarks/sweep_throughput.py --widths 16,32,64,128

Run it on a quiet machine: every number is a wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spectral_mup.config import load_config
from spectral_mup.sweep import load_spec, run_sweep
from spectral_mup.train import build_model, build_run_optimizer

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product",
           "aten::gelu", "layer_norm", "aten::_log_softmax")  # fmt: skip


def spec_file(root: Path, width: int, lrs: int, steps: int, batch_runs: int, workers: int) -> Path:
    base = Path("configs/sweeps/width_base.toml").resolve()
    text = f"""[sweep]
name = "w{width}-k{batch_runs}"
base = "{base.as_posix()}"
store = "{(root / f"w{width}-k{batch_runs}.sqlite").as_posix()}"
out_dir = "{(root / f"w{width}-k{batch_runs}").as_posix()}"
workers = {workers}
batch_runs = {batch_runs}

[grid]
optimizer = "adamw"
param = "mup"
width = {width}
lr = {{ log2_min = -10, log2_max = {-10 + lrs - 1}, step = 1 }}
seed = [0, 1]

[budget]
steps = {steps}
"""
    path = root / f"w{width}-k{batch_runs}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def kernel_share(width: int) -> float:
    """Share of one single-run training step spent in arithmetic kernels (1 thread)."""
    from torch.profiler import profile

    cfg = load_config("configs/sweeps/width_base.toml").to_dict()
    cfg["model"]["width"] = width
    from spectral_mup.config import build_config

    run_cfg = build_config(cfg)
    model = build_model(run_cfg, 65)
    opt = build_run_optimizer(run_cfg, model)
    x = torch.randint(0, 65, (run_cfg.train.batch_size, run_cfg.model.block_size))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).view(-1, 65), x.view(-1)).backward()
        opt.step()

    for _ in range(3):
        step()
    with profile() as prof:
        for _ in range(5):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    arithmetic = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS))
    return arithmetic / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16,32,64,128")
    ap.add_argument("--lrs", type=int, default=8, help="LRs per width (× 2 seeds)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sweep_throughput_"))
    print(f"{args.lrs} LRs × 2 seeds per width, {args.steps} steps, {args.workers} workers; "
          "runs/hour end to end")  # fmt: skip
    print("| width | one per task | stacks of K | speedup | auto | speedup | arithmetic share |")
    print("|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        rate = {}
        for batch_runs in (1, args.k, 0):
            spec = load_spec(spec_file(root, width, args.lrs, args.steps, batch_runs, args.workers))
            start = time.perf_counter()
            run_sweep(spec, progress=False)
            rate[batch_runs] = len(spec.runs) * 3600 / (time.perf_counter() - start)
        torch.set_num_threads(1)
        share = kernel_share(width)
        one, k = rate[1], rate[args.k]
        print(f"| {width} | {one:.0f} | {k:.0f} (K={args.k}) | {k / one:.2f}× "
              f"| {rate[0]:.0f} | {rate[0] / one:.2f}× | {share:.0%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

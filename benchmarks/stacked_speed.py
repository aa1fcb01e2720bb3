"""Stacked runs (spectral_mup.train.train_stacked) against one run at a time: seconds per run.

K runs of the demo's shape (configs/demo.toml: depth 4, 2 heads, batch 16 × 128, AdamW) at
one width, differing in LR and seed, for ``--steps`` steps with one eval at the end; the same
K configs trained one by one through train.run (``--singles`` of them, timed, the rest assumed
alike) and then as one stack. One torch thread for both (a sweep worker's share of 2 cores).

    SMUP_DATA_DIR=../shared/data python benchmarks/stacked_speed.py --widths 16,64,128 --k 8

``--profile N`` then profiles one stack per width: its N ops of most self CPU time and the
share of its step in arithmetic kernels (sweep_throughput.KERNELS), which no stacking removes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from spectral_mup.config import build_config, load_config
from spectral_mup.train import run, train_stacked


def configs(width: int, k: int, steps: int, root: Path, tag: str) -> list:
    base = load_config("configs/demo.toml").to_dict()
    base["model"]["width"] = width
    base["train"].update(max_iters=steps, eval_interval=steps, progress=False)
    out = []
    for i in range(k):
        values = {s: dict(v) for s, v in base.items()}
        values["optim"]["lr"] = 2.0 ** (-9 + i % 8)
        values["train"].update(seed=i % 2, out_dir=str(root / f"{tag}{width}_{i}"))
        out.append(build_config(values))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16,64,128")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--singles", type=int, default=2, help="single runs timed per width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="ops listed per stack's profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="stacked_speed_"))
    print(f"| width | K | one by one s/run | stacked s/run | speedup |  ({args.steps} steps)")
    print("|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        singles = configs(width, args.k, args.steps, root, "s")[: args.singles]
        start = time.perf_counter()
        for cfg in singles:
            run(cfg, log=None)
        one = (time.perf_counter() - start) / len(singles)
        stack = configs(width, args.k, args.steps, root, "b")
        start = time.perf_counter()
        train_stacked(stack)
        per = (time.perf_counter() - start) / args.k
        print(f"| {width} | {args.k} | {one:.2f} | {per:.2f} | {one / per:.2f}× |", flush=True)
    for width in (int(w) for w in args.widths.split(",")) if args.profile else ():
        profile_stack(configs(width, args.k, args.steps, root, "p"), args.profile)


def profile_stack(cfgs: list, top: int) -> None:
    from sweep_throughput import KERNELS  # this script's folder is on sys.path
    from torch.profiler import profile

    with profile() as prof:
        train_stacked(cfgs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    kernels = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in KERNELS))
    width, k = cfgs[0].model.width, len(cfgs)
    print(f"\nstack of {k} at width {width}: {kernels / total:.0%} in arithmetic kernels")
    for e in events[:top]:
        print(f"  {e.key[:60]:<60} {100 * e.self_cpu_time_total / total:5.1f}%  {e.count} calls")


if __name__ == "__main__":
    main()

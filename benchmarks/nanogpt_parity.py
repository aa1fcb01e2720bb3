"""Train-step throughput of spectral-mup's training (train.run) against a nanoGPT-equivalent.

The reference is a plain GPT written here to nanoGPT's model.py semantics (nothing fetched,
nothing vendored): learned positions, pre-LayerNorm blocks with biases, fused q/k/v, SDPA
with ``is_causal``, GELU MLP ×4, tied embedding/head, N(0, 0.02) init with c_proj scaled by
1/sqrt(2·depth), and nanoGPT's loop: sample a batch, forward with the loss inside, backward,
clip to 1.0, AdamW (decay and no-decay groups, betas 0.9/0.95; torch's default foreach
step: nanoGPT asks for the fused one on CUDA only) with the LR set per group every step,
``zero_grad(set_to_none=True)``. Ours is ``train.run`` itself (its wall time less its eval
time: the step loop, not model build, data load or the one 1-batch eval at the end) on the
same shapes: SP with tied weights (nanoGPT's architecture exactly) and μP (the sweeps'
default, untied head), in a process set up as ``smup`` sets up its own (malloc keeps freed
memory: ``train.keep_freed_memory``; ``SMUP_KEEP_FREED_MEMORY=0`` times ours without it).

Every trial of every model runs in a fresh process, as a user runs either (run in one
process, the models' times depend on which ran before: up to ±10% on one 2-core VM), and
the order within a trial alternates (ref, SP, μP; then μP, SP, ref). Printed per width:
tokens/s (median over ``--trials``) and ours ÷ reference as the median of the per-trial
ratios, with their range. One thread by default: run it pinned to one idle core.

    SMUP_DATA_DIR=../shared/data taskset -c 1 python benchmarks/nanogpt_parity.py \
        --widths 64,128,256,512

``--profile N`` then lists the N ops of most self CPU time in one run of ours per model and
width (where the two of ours differ).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spectral_mup.config import build_config
from spectral_mup.data import load_dataset
from spectral_mup.train import keep_freed_memory, run


class RefAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = RefAttention(d, heads)
        self.c_fc, self.gelu, self.c_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, block: int, d: int, depth: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(RefBlock(d, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, q in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(q, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def reference_seconds(data, width: int, args) -> float:
    torch.manual_seed(0)
    model = RefGPT(data.vocab_size, args.block, width, args.depth, args.heads)
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [
        {"params": [q for q in params if q.dim() >= 2], "weight_decay": 0.1},
        {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    train = torch.from_numpy(np.asarray(data.train, dtype=np.int64))  # nanoGPT: from a memmap
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for it in range(args.steps):
        ix = torch.randint(len(train) - args.block, (args.batch,), generator=gen)
        x = torch.stack([train[i : i + args.block] for i in ix.tolist()])
        y = torch.stack([train[i + 1 : i + 1 + args.block] for i in ix.tolist()])
        lr = 1e-3 * min(1.0, (it + 1) / 10)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss every log_interval; ours reads it every step
    return time.perf_counter() - start


def ours_seconds(width: int, kind: str, args, root: Path) -> float:
    cfg = build_config(
        {
            "model": {"width": width, "depth": args.depth, "n_heads": args.heads,
                      "block_size": args.block, "tie_weights": kind == "sp"},
            "param": {"kind": kind, "base_width": 64, "base_depth": 2},
            "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1},
            "train": {"batch_size": args.batch, "max_iters": args.steps, "warmup_iters": 10,
                      "eval_interval": args.steps, "eval_iters": 1, "progress": False,
                      "out_dir": tempfile.mkdtemp(prefix=f"{kind}{width}_", dir=root)},
        }
    )  # fmt: skip
    # a fresh out_dir per call: train.run returns a finished run's stored result instead of
    # training again (until 2026-12-03 every trial after the first re-read the first's time)
    result = run(cfg, log=None)
    return result["wall_time"] - result["eval_time"]


MODELS = ("ref", "sp", "mup")


def one_trial(model: str, width: int, args) -> float:
    """Seconds of ``args.steps`` steps of one model, trained in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", model, "--widths", str(width)]
    for key in ("depth", "heads", "batch", "block", "steps", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    width = int(args.widths)
    if args.worker == "ref":
        seconds = reference_seconds(load_dataset(None), width, args)
    else:  # as `smup train` runs it; the run's checkpoint and weights go with the process
        keep_freed_memory()
        with tempfile.TemporaryDirectory(prefix="nanogpt_parity_") as root:
            seconds = ours_seconds(width, args.worker, args, Path(root))
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after the table, profile one run of ours (SP tied, μP) per width and print the "
        "N ops of most self CPU time",
    )
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)  # one trial, in-process
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tokens = args.steps * args.batch * args.block
    print(f"depth {args.depth}, {args.heads} heads, batch {args.batch}×{args.block}, "
          f"{args.steps} steps, {args.threads} thread(s), {args.trials} trials, each model "
          "in a fresh process, order alternating")  # fmt: skip
    print("| width | reference tok/s | ours SP (tied) tok/s | ours ÷ ref (range) "
          "| ours μP tok/s | ours ÷ ref (range) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        times: dict[str, list[float]] = {m: [] for m in MODELS}
        for trial in range(args.trials):
            for model in MODELS if trial % 2 == 0 else MODELS[::-1]:
                times[model].append(one_trial(model, width, args))
        rate = {m: tokens / statistics.median(v) for m, v in times.items()}
        cells = [f"{rate['ref']:.0f}"]
        for model in ("sp", "mup"):
            ratios = [r / o for r, o in zip(times["ref"], times[model], strict=True)]
            spread = f"({min(ratios):.3f}–{max(ratios):.3f})"
            cells += [f"{rate[model]:.0f}", f"{statistics.median(ratios):.3f}× {spread}"]
        print(f"| {width} | " + " | ".join(cells) + " |", flush=True)
    if args.profile:
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="nanogpt_parity_") as root:
            for width in (int(w) for w in args.widths.split(",")):
                for kind in ("sp", "mup"):
                    profile_ours(width, kind, args, Path(root))


def profile_ours(width: int, kind: str, args, root: Path) -> None:
    """Where one run of ours spends its step loop: the top ``args.profile`` ops by self CPU
    time (torch.profiler), after one warm-up run."""
    from torch.profiler import ProfilerActivity, profile

    ours_seconds(width, kind, args, root)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = ours_seconds(width, kind, args, root)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{kind} width {width}: {seconds:.2f} s for {args.steps} steps (profiled)")
    for e in events[: args.profile]:
        share = 100 * e.self_cpu_time_total / total
        print(f"  {e.key[:60]:<60} {share:5.1f}%  {e.count} calls")


if __name__ == "__main__":
    main()

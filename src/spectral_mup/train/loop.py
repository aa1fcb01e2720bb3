"""The single-run training loop (``smup train``; a sweep's lone runs).

Warmup + cosine/linear decay, gradient clipping, periodic eval, early stopping, divergence
reported as a result, atomic checkpoints with exact resume (bit-identical on CPU), DDP or
FSDP2 under torchrun, a progress bar and a JSON result file. Runs that share a shape train
as one stack instead (``stacked.py``); both keep a ``RunState`` per run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import distributed
from ..config import RunConfig, fingerprint
from ..data import load_dataset
from ..distributed import Context
from ..errors import CheckpointError
from ..fileio import save_torch, write_json
from ..optim import get_spec
from .checkpoint import (
    CHECKPOINT,
    FORMAT,
    RESULT,
    SHARDED,
    WEIGHTS,
    check_fingerprint,
    load_checkpoint,
)
from .objective import evaluate, loss_fn, update_hessian
from .schedule import lr_factor
from .setup import autocast, build_model, build_run_optimizer
from .state import RunState


def run(cfg: RunConfig, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train one model; return (and write to ``out_dir/result.json``) the result. Under
    ``torchrun`` every rank calls this; rank 0 logs and writes (distributed.py)."""
    ctx = distributed.setup(cfg.train.parallel, cfg.train.device)
    try:
        return _Run(cfg, ctx, (log if ctx.main else None) or (lambda _msg: None)).train()
    finally:
        ctx.close()


def _device(cfg: RunConfig, ctx: Context) -> torch.device:
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ctx.rank)))
        torch.cuda.set_device(device)
    return device


def _stored_checkpoint(cfg: RunConfig, ctx: Context, path: Path) -> dict[str, Any] | None:
    """The checkpoint this run resumes from (checked against ``cfg``), or None."""
    if not (cfg.train.resume and path.exists()):
        return None
    ckpt = load_checkpoint(path)
    check_fingerprint(ckpt, cfg, path)
    if ctx.sharded and ckpt.get("sharded") is None:
        raise CheckpointError(
            f"{path} was written without FSDP; resume it with train.parallel=ddp or one "
            "process, or use another train.out_dir"
        )
    return ckpt


class _Run:
    """One run: its model, optimizer, schedule, data RNG and ``RunState``, and the steps
    of its loop (``train``)."""

    def __init__(self, cfg: RunConfig, ctx: Context, log: Callable[[str], None]):
        t = self.t = cfg.train
        self.cfg, self.ctx, self.log = cfg, ctx, log
        distributed.check_batch(ctx, t.batch_size, t.grad_accum)
        self.device = _device(cfg, ctx)
        self.data = load_dataset(cfg.data.path or None, vocab_size=cfg.data.vocab_size or None)
        self.out = Path(t.out_dir)
        self.ckpt_path = self.out / CHECKPOINT
        ckpt = _stored_checkpoint(cfg, ctx, self.ckpt_path)
        torch.manual_seed(t.seed)
        self.model = build_model(cfg, self.data.vocab_size).to(self.device)
        if ckpt is not None and ckpt.get("sharded") is None:
            self.model.load_state_dict(ckpt["model"])
        wrapped = distributed.wrap(ctx, self.model, self.device)  # FSDP2 shards in place
        self.opt = build_run_optimizer(cfg, self.model)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))
        self.gen = torch.Generator().manual_seed(t.seed)
        self.state = RunState.of(cfg, self.data.vocab_size)
        # Sophia's curvature estimates
        self.hessian_every = get_spec(cfg.optim.name).curvature_interval(self.opt)
        if ckpt is not None:
            self._restore(ckpt)
        # the bundled models compile as one graph; DDP splits its graph at gradient buckets
        self.fwd = torch.compile(wrapped, fullgraph=ctx.world == 1) if t.compile else wrapped

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("sharded") is not None:
            distributed.load_sharded(self.out / ckpt["sharded"], self.model, self.opt)
        else:
            self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.state.load_state_dict(ckpt["state"], ckpt["history"])
        self.log(f"resumed from {self.ckpt_path} at iteration {self.state.iter}")

    def save_checkpoint(self) -> None:
        ctx, out, state = self.ctx, self.out, self.state
        meta = {
            "format": FORMAT,
            "config": fingerprint(self.cfg),
            "scheduler": self.sched.state_dict(),
            "data_rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": state.history,
            "state": state.state_dict(),
        }
        if ctx.sharded:  # every rank writes its shards, then rank 0 the file naming them
            meta["sharded"] = SHARDED.format(state.iter)
            distributed.save_sharded(ctx, out / meta["sharded"], self.model, self.opt)
        else:
            meta["model"], meta["optimizer"] = self.model.state_dict(), self.opt.state_dict()
        if ctx.main:
            save_torch(self.ckpt_path, meta)
            for old in out.glob(SHARDED.format(0).replace("0" * 8, "*")):
                if old.name != meta.get("sharded"):
                    shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()

    def step(self) -> bool:
        """One optimizer step (and Sophia's curvature estimate when due); False when the
        batch's loss diverged (no step taken)."""
        t, ctx = self.t, self.ctx
        x, y = self.data.get_batch("train", t.batch_size, self.cfg.model.block_size, self.gen)
        x, y = x.to(self.device), y.to(self.device)
        rows = ctx.rows(x.size(0))  # this rank's rows, then micro-batches of them
        xs, ys = x[rows].chunk(t.grad_accum), y[rows].chunk(t.grad_accum)
        self.opt.zero_grad(set_to_none=True)
        total = None
        for i, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
            with distributed.no_sync(ctx, self.fwd, i == t.grad_accum - 1):
                with autocast(self.cfg):
                    loss = loss_fn(self.fwd, xm, ym)
                if t.grad_accum > 1:
                    loss = loss / t.grad_accum
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        loss_value = ctx.mean(total)
        if not self.state.check_train_loss(loss_value):
            self.log(
                f"diverged at iteration {self.state.iter}: "
                f"loss {loss_value:.4g} (ceiling {self.state.ceiling:.3g})"
            )
            return False
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        every, it = self.hessian_every, self.state.iter
        if every and it % every == every - 1:
            update_hessian(self.fwd, self.opt, x, t.grad_clip, autocast(self.cfg), ctx,
                           t.grad_accum)  # fmt: skip
        self.sched.step()
        self.state.record_step(lr, loss_value)
        return True

    def eval(self, train_avg: float, bar: tqdm) -> bool:
        """Evaluate at the current iteration; False when the run stops (diverged, patience)."""
        state, it = self.state, self.state.iter
        eval_start = time.perf_counter()
        val = evaluate(self.fwd, self.data, self.cfg, ctx=self.ctx)
        state.eval_time += time.perf_counter() - eval_start
        win_rate = self.opt.last_win_rate if self.hessian_every else None
        stop = state.record_eval(val, win_rate)
        bar.set_postfix(train=f"{train_avg:.3f}", val=f"{val:.3f}")
        extra = "" if win_rate is None else f" win rate {win_rate:.3f}"
        lr = state.history["lr"][-1]
        self.log(f"iter {it}: train {train_avg:.4f} val {val:.4f} lr {lr:.3g}{extra}")
        if stop == "diverged":
            self.log(f"diverged at iteration {it}: val loss {val:.4g}")
        elif stop == "early_stop":
            since = it - state.best_iter
            self.log(f"early stop at iteration {it}: no val improvement for {since} iterations")
        return stop is None

    def train(self) -> dict[str, Any]:
        t, state = self.t, self.state
        ckpt_every = t.checkpoint_interval or t.eval_interval
        start = time.perf_counter() - state.elapsed
        progress = t.progress and self.ctx.main
        bar = tqdm(total=t.max_iters, initial=state.iter, disable=not progress or None,
                   desc="train", unit="it", dynamic_ncols=True)  # fmt: skip
        self.model.train()
        since_eval: list[float] = []
        paused = False
        while state.iter < t.max_iters and state.active:
            if not self.step():
                break
            since_eval.append(state.history["train_loss"][-1])
            bar.update(1)
            it = state.iter
            if it % t.eval_interval == 0 or it == t.max_iters:
                train_avg = sum(since_eval) / len(since_eval)
                since_eval = []
                if not self.eval(train_avg, bar):
                    break
            if (it % ckpt_every == 0 or it == t.stop_at) and it < t.max_iters:
                state.elapsed = time.perf_counter() - start
                self.save_checkpoint()
            if it == t.stop_at and it < t.max_iters:
                paused = True  # the checkpoint resumes it
                self.log(f"stopped at iteration {it} (train.stop_at); rerun to continue")
                break
        bar.close()
        state.elapsed = time.perf_counter() - start
        return self.finish(paused)

    def finish(self, paused: bool) -> dict[str, Any]:
        """Save the finished run (checkpoint and weights) and write its result."""
        state, ctx = self.state, self.ctx
        if state.status == "ok" and not paused:
            state.finish()
            self.save_checkpoint()
            weights = distributed.full_model_state(ctx, self.model)  # a collective under FSDP2
            if ctx.main:
                save_torch(self.out / WEIGHTS, weights)
        result = state.result(
            self.cfg,
            num_params=sum(p.numel() for p in self.model.parameters()),  # FSDP2: global size
            data=self.data.source,
            wall_time=state.elapsed,
            stop_reason="stop_at" if paused else None,
            eval_time=state.eval_time,
        )
        if ctx.main:
            write_json(self.out / RESULT, result)
        ctx.barrier()
        return result

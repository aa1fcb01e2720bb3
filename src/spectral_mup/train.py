"""The training loop (``smup train``; sweeps call ``run`` too).

Warmup + cosine/linear decay, gradient clipping, periodic eval, early stopping, divergence
detection reported as a result, atomic checkpoints with exact resume (bit-identical on CPU),
a progress bar and a JSON result file.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .config import RunConfig, model_config
from .data import Dataset, load_dataset
from .distributed import Context
from .errors import CheckpointError
from .fileio import save_torch, write_json
from .models import build_model as build_bundled
from .optim import build_optimizer, get_spec, normalize_options

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
WEIGHTS = "model.pt"
_FORMAT = "spectral-mup-checkpoint-v1"
SHARDED = "checkpoint-{:08d}.dcp"  # FSDP2: model and optimizer, beside checkpoint.pt
# train.* keys that change how a run executes, not what it computes: outside a sweep run's
# id (sweep.RUNTIME_KEYS) and free to change between a run and its resume
RUNTIME_KEYS = frozenset(
    {"out_dir", "resume", "progress", "device", "grad_accum", "parallel", "stop_at"}
)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step, instead
    of handing its large blocks back to the OS and faulting them in again, page by page, at
    the next step: large blocks come from the heap and the heap is never trimmed, as a
    caching allocator keeps CUDA memory. (Measured once on the nanoGPT-equivalent loop of
    benchmarks/nanogpt_parity.py, width 128, 30 steps: ~100k page faults without it, ~33k
    with it, 2–3% less time at widths 128–256, nothing at 64; ``SMUP_KEEP_FREED_MEMORY=0``
    times ours without it there.) Process-wide, so the ``smup`` command and its sweep
    workers call it, not ``run``. Does nothing off glibc or with
    ``SMUP_KEEP_FREED_MEMORY=0``; returns whether it applied."""
    import ctypes
    import platform

    if os.environ.get("SMUP_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # an older glibc caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2)
    mmap = libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_threshold, 1 << 25)
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(mmap)


def lr_factor(cfg: RunConfig) -> Callable[[int], float]:
    """LR multiplier at iteration ``it``: linear warmup, then cosine/linear decay to
    ``min_lr_ratio`` at ``max_iters`` (or constant)."""
    t = cfg.train

    def factor(it: int) -> float:
        if it < t.warmup_iters:
            return (it + 1) / (t.warmup_iters + 1)
        if t.schedule == "constant" or t.max_iters <= t.warmup_iters:
            return 1.0
        progress = min(1.0, (it - t.warmup_iters) / (t.max_iters - t.warmup_iters))
        shape = (
            0.5 * (1.0 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        )
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return factor


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The run's bundled model (``model.arch``) at the data's vocabulary size."""
    return build_bundled(model_config(cfg.model, vocab_size), cfg.param)


@functools.cache
def _vocab_size(path: str, vocab_size: int) -> int:
    return load_dataset(path or None, vocab_size=vocab_size or None).vocab_size


def flops_per_token(cfg: RunConfig, vocab_size: int | None = None) -> float:
    """Training FLOPs per token of the run's model (forward + backward, no evaluation):
    6·N for the N weights that multiply activations (every parameter but the embedding
    tables, which are lookups, unless tied to the head) plus 12·depth·block_size·width for
    the attention scores and their weighted sum (nanoGPT's estimate). ``vocab_size``:
    default, that of the run's data (read once per dataset and process)."""
    if vocab_size is None:
        vocab_size = _vocab_size(cfg.data.path, cfg.data.vocab_size)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    roles = model.smup_roles
    n = sum(
        q.numel()
        for name, q in model.named_parameters()
        if roles[name].role != "input" or roles[name].tied_readout is not None  # a tied head
    )
    m = cfg.model
    return 6.0 * n + 12.0 * m.depth * m.block_size * m.width


def run_optimizer_options(cfg: RunConfig) -> dict[str, Any]:
    """The [optim] keys the run's optimizer has (its ε under its own name), set in ``cfg``."""
    o = cfg.optim
    spec = get_spec(o.name)
    given = {key: getattr(o, key, None) for key in spec.config_keys()}  # o.eps: its ε
    options = normalize_options(spec, {k: v for k, v in given.items() if v is not None})
    if spec.curvature and spec.curvature.tokens:  # Sophia: tokens per optimizer step
        options[spec.curvature.tokens] = cfg.train.batch_size * cfg.model.block_size
    return options


def build_run_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    options = run_optimizer_options(cfg)
    return build_optimizer(
        o.name,
        model,
        cfg.param,
        o.lr,
        o.weight_decay,
        decay_vectors=o.decay_vectors,
        spectral_normalize=o.spectral_normalize,
        **options,
    )


# Keys added after run ids existed, at the value that trains the run it was before them:
# there they are left out of the fingerprint, so adding them kept every stored id and
# checkpoint (model.arch: the GPT was the only model; the transferable HPs of issue 13: 1;
# the GPT's model.position: learned positions were the only ones).
LATER_KEYS: dict[tuple[str, str], Any] = {
    ("model", "arch"): "gpt",
    ("model", "position"): "learned",
    **{("param", k): 1.0 for k in ("lr_input", "lr_output", "lr_vector", "readout_scale",
                                   "init_input", "init_output", "attention_mult")},
}  # fmt: skip


def fingerprint(cfg: RunConfig | dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The parts of a config (a ``RunConfig`` or its ``to_dict()``, e.g. a checkpoint's
    stored fingerprint) that identify a run — a checkpoint must agree with them to be
    resumed, and a sweep's run id hashes them: every key but the runtime ones
    (:data:`RUNTIME_KEYS`), none set to ``None`` (an unset option is its default, so adding
    an optional key keeps existing ids and checkpoints), and none of :data:`LATER_KEYS` at
    its old value."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return {
        section: {
            k: v
            for k, v in items.items()
            if v is not None
            and not (section == "train" and k in RUNTIME_KEYS)
            and not ((section, k) in LATER_KEYS and v == LATER_KEYS[section, k])
        }
        for section, items in d.items()
    }


def _autocast(cfg: RunConfig):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(cfg.train.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def update_hessian(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    grad_clip: float = 0.0,
    autocast: contextlib.AbstractContextManager | None = None,
    ctx: Context | None = None,
    grad_accum: int = 1,
) -> None:
    """Gauss–Newton–Bartlett estimate (Sophia): sample labels from the model's own
    predictive distribution, backprop the loss on them, and let the optimizer fold the
    squared gradients into h. ``x`` is the global batch; the uniforms that pick the labels
    are drawn for all of it from the global RNG (saved in checkpoints), so every rank and
    micro-batch split samples what one process does."""
    ctx = ctx or Context()
    u = torch.rand(x.shape, device=x.device)
    rows = ctx.rows(x.size(0))
    x, u = x[rows], u[rows]
    micro = x.size(0) // grad_accum
    opt.zero_grad(set_to_none=True)
    for i in range(grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        with distributed.no_sync(ctx, model, i == grad_accum - 1):
            with autocast or contextlib.nullcontext():
                logits = model(x[part]).float()
            flat = logits.view(-1, logits.size(-1))
            cdf = torch.softmax(flat.detach(), dim=-1).cumsum(-1)
            sampled = torch.searchsorted(cdf, u[part].reshape(-1, 1) * cdf[:, -1:]).view(-1)
            loss = F.cross_entropy(flat, sampled.clamp_(max=flat.size(-1) - 1))
            (loss / grad_accum if grad_accum > 1 else loss).backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.update_hessian()
    opt.zero_grad(set_to_none=True)


def eval_generator(cfg: RunConfig) -> torch.Generator:
    """The generator of a run's eval batches: the same batches at every eval, and no draw
    from the training RNG."""
    return torch.Generator().manual_seed(10_000 + cfg.train.seed)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    cfg: RunConfig,
    split: str = "val",
    ctx: Context | None = None,
) -> float:
    """Mean loss over ``eval_iters`` batches drawn from a fixed seed (the same batches at
    every eval, and no draw from the training RNG); under torchrun each rank takes its rows
    of every batch and the mean is all-reduced."""
    ctx = ctx or Context()
    gen = eval_generator(cfg)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(cfg.train.eval_iters):
        x, y = data.get_batch(split, cfg.train.batch_size, cfg.model.block_size, gen)
        rows = ctx.rows(x.size(0))
        with _autocast(cfg):
            total += loss_fn(model, x[rows].to(cfg.train.device), y[rows].to(cfg.train.device))
    model.train(was_training)
    return ctx.mean(total) / cfg.train.eval_iters


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a corrupt file is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({reason[:120]}); delete it to start over"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CheckpointError(
            f"{path} is not a spectral-mup checkpoint; delete it or use another out_dir"
        )
    return ckpt


def _check_fingerprint(ckpt: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """Raise unless the checkpoint was written by this config (runtime keys aside; the
    stored fingerprint is re-fingerprinted, so a checkpoint written while a key was not yet
    runtime-only still resumes)."""
    theirs, ours = fingerprint(ckpt["config"]), fingerprint(cfg)
    if theirs == ours:
        return
    diff = sorted(
        f"{s}.{k}"
        for s in theirs.keys() | ours.keys()
        for k in theirs.get(s, {}).keys() | ours.get(s, {}).keys()
        if theirs.get(s, {}).get(k) != ours.get(s, {}).get(k)
    )
    raise CheckpointError(
        f"{path} was written by a different config (differs in {', '.join(diff) or 'keys'}); "
        "use another train.out_dir or --train.resume false"
    )


def run(cfg: RunConfig, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train one model; return (and write to ``out_dir/result.json``) the result. Under
    ``torchrun`` every rank calls this; rank 0 logs and writes (distributed.py)."""
    ctx = distributed.setup(cfg.train.parallel, cfg.train.device)
    try:
        return _run(cfg, ctx, log if ctx.main else None)
    finally:
        ctx.close()


def _run(cfg: RunConfig, ctx: Context, log: Callable[[str], None] | None) -> dict[str, Any]:
    log = log or (lambda _msg: None)
    t = cfg.train
    distributed.check_batch(ctx, t.batch_size, t.grad_accum)
    device = torch.device(t.device)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ctx.rank)))
        torch.cuda.set_device(device)
    data = load_dataset(cfg.data.path or None, vocab_size=cfg.data.vocab_size or None)
    out = Path(t.out_dir)
    ckpt_path = out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path) if t.resume and ckpt_path.exists() else None
    if ckpt is not None:
        _check_fingerprint(ckpt, cfg, ckpt_path)

    sharded_ckpt = ckpt is not None and ckpt.get("sharded") is not None
    if ckpt is not None and ctx.sharded and not sharded_ckpt:
        raise CheckpointError(
            f"{ckpt_path} was written without FSDP; resume it with train.parallel=ddp or one "
            "process, or use another train.out_dir"
        )

    torch.manual_seed(t.seed)
    model = build_model(cfg, data.vocab_size).to(device)
    if ckpt is not None and not sharded_ckpt:
        model.load_state_dict(ckpt["model"])
    wrapped = distributed.wrap(ctx, model, device)  # FSDP2 shards ``model`` in place
    opt = build_run_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    gen = torch.Generator().manual_seed(t.seed)
    ceiling = t.loss_ceiling or 2.0 * math.log(data.vocab_size)
    hist: dict[str, list] = {"train_loss": [], "lr": [], "val": [], "win_rate": []}
    hessian_every = get_spec(cfg.optim.name).curvature_interval(opt)  # Sophia's Hessian estimates
    state: dict[str, Any] = {
        "iter": 0,
        "best_val": math.inf,
        "best_iter": 0,
        "elapsed": 0.0,
        "stop_reason": None,
    }
    if ckpt is not None:
        if sharded_ckpt:
            distributed.load_sharded(out / ckpt["sharded"], model, opt)
        else:
            opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        hist = ckpt["history"]
        state = ckpt["state"]
        log(f"resumed from {ckpt_path} at iteration {state['iter']}")
    # the bundled models compile as one graph; DDP splits its graph at gradient buckets
    fwd = torch.compile(wrapped, fullgraph=ctx.world == 1) if t.compile else wrapped

    def save_checkpoint() -> None:
        meta = {
            "format": _FORMAT,
            "config": fingerprint(cfg),
            "scheduler": sched.state_dict(),
            "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": hist,
            "state": dict(state),
        }
        if ctx.sharded:  # every rank writes its shards, then rank 0 the file naming them
            meta["sharded"] = SHARDED.format(state["iter"])
            distributed.save_sharded(ctx, out / meta["sharded"], model, opt)
        else:
            meta["model"], meta["optimizer"] = model.state_dict(), opt.state_dict()
        if ctx.main:
            save_torch(ckpt_path, meta)
            for old in out.glob(SHARDED.format(0).replace("0" * 8, "*")):
                if old.name != meta.get("sharded"):
                    shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()

    status, stop_reason, diverged_at = "ok", state["stop_reason"] or "max_iters", None
    ckpt_every = t.checkpoint_interval or t.eval_interval
    start = time.perf_counter() - state["elapsed"]
    bar = tqdm(
        total=t.max_iters,
        initial=state["iter"],
        disable=not (t.progress and ctx.main) or None,
        desc="train",
        unit="it",
        dynamic_ncols=True,
    )
    model.train()
    since_eval: list[float] = []
    while state["iter"] < t.max_iters and state["stop_reason"] is None:
        x, y = data.get_batch("train", t.batch_size, cfg.model.block_size, gen)
        x, y = x.to(device), y.to(device)
        rows = ctx.rows(x.size(0))  # this rank's rows, then micro-batches of them
        xs, ys = x[rows].chunk(t.grad_accum), y[rows].chunk(t.grad_accum)
        opt.zero_grad(set_to_none=True)
        total = None
        for i, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
            with distributed.no_sync(ctx, fwd, i == t.grad_accum - 1):
                with _autocast(cfg):
                    loss = loss_fn(fwd, xm, ym)
                if t.grad_accum > 1:
                    loss = loss / t.grad_accum
                loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        loss_value = ctx.mean(total)
        if not math.isfinite(loss_value) or loss_value > ceiling:
            status, stop_reason, diverged_at = "diverged", "diverged", state["iter"]
            log(
                f"diverged at iteration {state['iter']}: "
                f"loss {loss_value:.4g} (ceiling {ceiling:.3g})"
            )
            break
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        hist["lr"].append(sched.get_last_lr()[0])
        opt.step()
        if hessian_every and state["iter"] % hessian_every == hessian_every - 1:
            update_hessian(fwd, opt, x, t.grad_clip, _autocast(cfg), ctx, t.grad_accum)
        sched.step()
        state["iter"] += 1
        hist["train_loss"].append(loss_value)
        since_eval.append(loss_value)
        bar.update(1)
        it = state["iter"]
        if it % t.eval_interval == 0 or it == t.max_iters:
            eval_start = time.perf_counter()
            val = evaluate(fwd, data, cfg, ctx=ctx)
            state["eval_time"] = state.get("eval_time", 0.0) + time.perf_counter() - eval_start
            hist["val"].append([it, val])
            if val < state["best_val"]:
                state["best_val"], state["best_iter"] = val, it
            train_avg = sum(since_eval) / len(since_eval)
            since_eval = []
            bar.set_postfix(train=f"{train_avg:.3f}", val=f"{val:.3f}")
            extra = ""
            if hessian_every:
                hist["win_rate"].append([it, opt.last_win_rate])
                extra = f" win rate {opt.last_win_rate:.3f}"
            log(f"iter {it}: train {train_avg:.4f} val {val:.4f} lr {hist['lr'][-1]:.3g}{extra}")
            if not math.isfinite(val) or val > ceiling:
                status, stop_reason, diverged_at = "diverged", "diverged", it
                log(f"diverged at iteration {it}: val loss {val:.4g}")
                break
            if t.patience and it - state["best_iter"] >= t.patience:
                stop_reason = "early_stop"
                log(
                    f"early stop at iteration {it}: "
                    f"no val improvement for {it - state['best_iter']} iterations"
                )
                break
        if (it % ckpt_every == 0 or it == t.stop_at) and it < t.max_iters:
            state["elapsed"] = time.perf_counter() - start
            save_checkpoint()
        if it == t.stop_at and it < t.max_iters:
            stop_reason = "stop_at"  # paused: the checkpoint resumes it
            log(f"stopped at iteration {it} (train.stop_at); rerun to continue")
            break
    bar.close()
    state["elapsed"] = time.perf_counter() - start
    if status == "ok" and stop_reason != "stop_at":
        state["stop_reason"] = stop_reason
        save_checkpoint()
        weights = distributed.full_model_state(ctx, model)  # a collective under FSDP2
        if ctx.main:
            save_torch(out / WEIGHTS, weights)
    tail = hist["train_loss"][-min(len(hist["train_loss"]), t.eval_interval) :]
    final_val = hist["val"][-1][1] if hist["val"] else None
    result = {
        "status": status,
        "stop_reason": stop_reason,
        "iters": state["iter"],
        "best_val_loss": state["best_val"] if math.isfinite(state["best_val"]) else None,
        "best_iter": state["best_iter"],
        "final_val_loss": final_val if final_val is not None and math.isfinite(final_val) else None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "diverged_at": diverged_at,
        "tokens": state["iter"] * t.batch_size * cfg.model.block_size,
        "wall_time": state["elapsed"],
        "eval_time": state.get("eval_time", 0.0),  # of wall_time: the evaluations
        "num_params": sum(p.numel() for p in model.parameters()),  # FSDP2: DTensor's global size
        "data": data.source,
        "config": cfg.to_dict(),
        "history": hist,
    }
    if ctx.main:
        write_json(out / RESULT, result)
    ctx.barrier()
    return result

"""The training objective, shared by the single-run loop, the stacked loop, the probe and
the coordinate check: next-token cross-entropy, its evaluation on fixed validation batches,
and Sophia's curvature estimate (labels sampled from the model's own predictions)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import RunConfig
from ..data import Dataset
from ..distributed import Context
from .setup import autocast


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y``."""
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def run_losses(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``[K]``: each run's mean cross-entropy, for logits of K stacked runs (run-major)."""
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
    )
    return flat.view(k, -1).mean(1)


def sample_labels(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the Gauss–Newton–Bartlett
    estimate's labels): for logits ``[..., V]`` and uniforms ``u`` of shape ``[...]``, the
    first class whose cumulative probability reaches ``u``."""
    cdf = torch.softmax(logits.detach(), dim=-1).cumsum(-1)
    labels = torch.searchsorted(cdf, u.reshape(*cdf.shape[:-1], 1) * cdf[..., -1:])
    return labels.squeeze(-1).clamp_(max=logits.size(-1) - 1)


def update_hessian(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    grad_clip: float = 0.0,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
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
            with autocast_ctx or contextlib.nullcontext():
                logits = model(x[part]).float()
            flat = logits.view(-1, logits.size(-1))
            loss = F.cross_entropy(flat, sample_labels(flat, u[part]))
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
        with autocast(cfg):
            total += loss_fn(model, x[rows].to(cfg.train.device), y[rows].to(cfg.train.device))
    model.train(was_training)
    return ctx.mean(total) / cfg.train.eval_iters

"""What a run is built from: its model, its optimizer (options from the config), its
FLOPs per token, its autocast context, and the process setting for training."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..config import RunConfig, model_config, optimizer_options
from ..data import load_dataset
from ..models import build_model as build_bundled
from ..optim import build_optimizer


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


def build_run_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    options = optimizer_options(cfg)
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


def autocast(cfg: RunConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast on the run's device when ``train.dtype = "bfloat16"``, else nothing."""
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(cfg.train.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

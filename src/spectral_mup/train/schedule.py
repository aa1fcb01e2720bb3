"""The LR schedule: a multiplier of the base LR per iteration."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import RunConfig


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

"""Stacked execution: runs of one shape train K at a time as one stack (``train.stacked``).

``plan(runs, batch_runs, workers)`` groups the runs to train into tasks: runs whose configs
agree outside their optimizer options, seed and per-role LR/init multipliers
(``train.stacked.stack_key``) and that can stack (``train.stacked.check_stackable``: no dropout,
gradient accumulation or compile) share a task of at most K runs; every other run is a task
of its own. An executor trains a task with ``executors.execute_task``: one run through
``train.run``, several through ``train.stacked.train_stacked`` (any optimizer: the LR-linear ones
step the stacked tensors together, the rest each run's own optimizer), falling back to one
run at a time if the stack cannot be built. A stack checkpoints itself (``OUT/stacks/<hash
of its runs>.pt``) at every eval, so a killed sweep's stack resumes where it was, bit for
bit, when the rerun plans the same stack; a run that has a checkpoint from an interrupted
one-run-at-a-time sweep resumes from it alone. A stack's results equal its runs' single-run
results within float rounding
(tests/test_sweep.py::test_stacked_sweep_rows_equal_single_run_rows).

``batch_runs``: 1 trains every run alone; K > 1 stacks up to K; 0 (auto, the default)
stacks where it measured faster. On this project's 2-core CPU, stacking pays only where a
run is per-op overhead, not arithmetic (``python benchmarks/sweep_throughput.py``): below
``CPU_STACK_FLOPS`` training FLOPs per step it stacks up to ``CPU_K`` runs, above it none;
on a GPU it stacks up to ``GPU_K`` (not measured here: no GPU was lent). Auto never makes
fewer tasks than workers out of a group, so no core idles for a stack.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import RunConfig
from ..train import CHECKPOINT, flops_per_token
from ..train.stack import NotBatchable
from ..train.stacked import check_stackable, stack_key
from .spec import Run

CPU_STACK_FLOPS = 3e8  # training FLOPs per step below which a CPU run stacks (auto)
CPU_K = 8
GPU_K = 16


def step_flops(cfg: RunConfig) -> float:
    """Training FLOPs of one step of the run (``train.flops_per_token`` × tokens)."""
    return flops_per_token(cfg) * cfg.train.batch_size * cfg.model.block_size


def auto_k(cfg: RunConfig) -> int:
    """The stack size ``batch_runs = 0`` picks for a run (module docstring)."""
    if cfg.train.device.startswith("cuda"):
        return GPU_K
    return CPU_K if step_flops(cfg) < CPU_STACK_FLOPS else 1


def plan(runs: list[Run], batch_runs: int, workers: int) -> list[list[Run]]:
    """The tasks (lists of runs trained together) for ``runs``, largest first."""
    if batch_runs < 0:
        raise ValueError(f"batch_runs must be >= 0 (0 = auto), got {batch_runs}")
    workers = max(1, workers)
    if batch_runs == 1:
        return [[r] for r in runs]
    groups: dict[str, list[Run]] = {}
    tasks: list[list[Run]] = []
    for r in runs:
        if (Path(r.config.train.out_dir) / CHECKPOINT).exists():
            tasks.append([r])  # killed midway before: it resumes from its checkpoint, alone
        else:
            groups.setdefault(stack_key(r.config), []).append(r)
    for group in groups.values():
        try:
            check_stackable([r.config for r in group])
        except NotBatchable:
            tasks.extend([r] for r in group)
            continue
        k = batch_runs or min(auto_k(group[0].config), math.ceil(len(group) / workers))
        n = math.ceil(len(group) / k)  # tasks of near-equal size
        tasks.extend(group[i::n] for i in range(n))
    return sorted(tasks, key=lambda t: -sum(r.cost for r in t))


def stack_checkpoint(cfgs: list[RunConfig]) -> Path:
    """Where a stack of these runs checkpoints: beside their run dirs, named by them."""
    import hashlib

    names = "\n".join(str(c.train.out_dir) for c in cfgs)
    digest = hashlib.sha256(names.encode()).hexdigest()[:16]
    return Path(cfgs[0].train.out_dir).parent / "stacks" / f"{digest}.pt"

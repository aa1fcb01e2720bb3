"""Data-parallel training under ``torchrun``: DDP or FSDP2 (``train.parallel``), gloo on CPU
and nccl on GPU.

Every rank draws the same global batch from the same generator and trains on its slice
(``train.batch_size`` is the global batch, split over ranks and then over
``train.grad_accum`` micro-batches), so a run on N ranks computes what one process computes
at the same batch: each micro-batch's loss is divided by the number of micro-batches in the
step, gradients are averaged over ranks, and the logged loss is the all-reduced mean. Rank 0
alone logs and writes files. Checkpoints: DDP writes the single-process file (rank 0);
FSDP2 writes a ``torch.distributed.checkpoint`` directory beside it, which DCP reshards on
load (tested: written by 2 ranks, resumed by 2 and by 1). ``train.out_dir`` must be on a
filesystem every rank sees.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    strategy: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # this run created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` rows."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (every rank gets it)."""
        if self.world == 1:
            return value.item()
        total = value.detach().clone().reshape(())
        dist.all_reduce(total)
        return total.item() / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(strategy: str, device: str) -> Context:
    """The run's context: one process, or the ranks ``torchrun`` started (``WORLD_SIZE``);
    ``strategy`` is ``train.parallel`` (``ddp`` or ``fsdp``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return Context()
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        owns = True
    return Context(dist.get_rank(), dist.get_world_size(), strategy, owns)


def check_batch(ctx: Context, batch_size: int, grad_accum: int) -> None:
    parts = ctx.world * grad_accum
    if batch_size % parts:
        raise ConfigError(
            f"train.batch_size {batch_size} does not split into {ctx.world} ranks × "
            f"{grad_accum} micro-batches; make it a multiple of {parts}"
        )


def _block_lists(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (members of ``nn.ModuleList``s): FSDP2's units."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def wrap(ctx: Context, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` for the forward pass: itself, DDP around it, or (FSDP2) sharded in place —
    each block, then the rest — and returned. Roles stay reachable by name (parametrize)."""
    if ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world,))
    for block in _block_lists(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_sync(ctx: Context, fwd: nn.Module, last: bool):
    """Skip the gradient all-reduce on every micro-batch but the step's last."""
    if ctx.strategy == "ddp" and not last:
        return fwd.no_sync()
    if ctx.strategy == "fsdp":
        fwd.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ checkpoints


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def save_sharded(ctx: Context, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Write model and optimizer with ``torch.distributed.checkpoint`` to the directory
    ``path``, whole or not at all (a temporary sibling renamed by rank 0)."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.barrier()
    dcp.save(_state_dicts(model, opt), checkpoint_id=str(tmp))
    ctx.barrier()
    if ctx.main:
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()


def load_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a :func:`save_sharded` directory into ``model``/``opt``, sharded over any number
    of ranks or not sharded at all (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _state_dicts(model, opt)
    with warnings.catch_warnings():  # one process reading shards is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optimizer"])


def full_model_state(ctx: Context, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU (a collective under FSDP2; rank 0 gets it)."""
    if not ctx.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )

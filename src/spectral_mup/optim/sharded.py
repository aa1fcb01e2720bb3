"""FSDP2's sharded parameters (``DTensor``) for the optimizers that need whole matrices.

Elementwise optimizers (AdamW, ADOPT, Lion, Sophia, SGD) and LAMB (whose two norms DTensor
all-reduces) run on the shards as they are. Muon, Shampoo, SOAP and spectral normalization
act on a matrix as an operator, so a shard is never orthogonalized or preconditioned on its
own: the gradient (or momentum) is gathered, every rank computes the same whole-matrix
update — its matrix state (Shampoo's and SOAP's preconditioners) kept whole on every rank —
and each rank writes back its own rows. Gathering costs one all-gather per matrix per step
and the state's memory on every rank; it is exact (the same numbers as one process).
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed
    DTensor, distribute_tensor = (), None


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (an all-gather); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def write_back(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` (a whole-tensor value of ``p``) into the DTensor
    ``p``; every rank holds the same ``full``, so nothing is sent."""
    local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    p.to_local().copy_(local.to_local())

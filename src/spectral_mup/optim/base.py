"""What every optimizer here shares: argument checks, the closure, the loop over
parameters that have a gradient, and zero-initialized state buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .sharded import is_sharded, whole, write_back


def check_hparams(**values: Any) -> None:
    """Reject invalid hyperparameters with a ValueError that names them."""
    for name, value in values.items():
        if name == "betas":
            if not all(0.0 <= b < 1.0 for b in value):
                raise ValueError(f"invalid betas {value}: each must be in [0, 1)")
        elif not value >= 0.0:
            raise ValueError(f"invalid {name} {value}: must be >= 0")


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the loss with gradients enabled (``Optimizer.step`` semantics)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class ParamwiseOptimizer(Optimizer):
    """``step`` runs the closure, then ``update(group, p, grad, state)`` for every parameter
    with a gradient (negated under ``maximize``); subclasses write only the update.

    ``whole_matrices = True`` (an optimizer that treats a matrix as an operator): on FSDP2's
    sharded parameters ``update`` sees the whole parameter and gradient (gathered; its state
    whole on every rank) and each rank keeps its shard of the result (``sharded.py``)."""

    whole_matrices = False

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def zeros(state: dict, p: torch.Tensor, *names: str) -> None:
        """Create the named buffers (zeros like ``p``) and a step counter on first use."""
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                grad = -p.grad if group.get("maximize", False) else p.grad
                if self.whole_matrices and is_sharded(p):
                    full = whole(p)
                    self.update(group, full, whole(grad), self.state[p])
                    write_back(p, full)
                else:
                    self.update(group, p, grad, self.state[p])
        return loss

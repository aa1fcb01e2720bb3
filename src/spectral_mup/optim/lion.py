"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    u = sign(β1·m + (1−β1)·g);  θ ← θ·(1 − lr·λ) − lr·u;  m ← β2·m + (1−β2)·g
Every update entry is ±lr (or 0), so Lion is the purest member of the entrywise family.
"""

from __future__ import annotations

import torch

from .base import ParamwiseOptimizer, check_hparams


class Lion(ParamwiseOptimizer):
    """Lion with the paper's defaults (lr 1e-4, betas (0.9, 0.99)); ``weight_decay`` is
    decoupled and multiplied by the current lr, as in the paper's code."""

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ):
        check_hparams(lr=lr, weight_decay=weight_decay, betas=betas)
        super().__init__(
            params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        )

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        self.zeros(state, p, "exp_avg")
        state["step"] += 1
        exp_avg = state["exp_avg"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.add_(torch.sign(exp_avg.lerp(grad, 1 - beta1)), alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)

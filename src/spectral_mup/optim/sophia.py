"""SophiaG (Liu et al. 2023; official code Liuhong99/Sophia), the Gauss–Newton–Bartlett
variant.

Every step:  θ ← θ·(1 − lr·λ);  m ← β1·m + (1−β1)·g;
             θ ← θ − lr · sign(m) · min(|m| / (ρ·bs·h + 1e-15), 1)
Every k steps the training loop samples labels ŷ from the model's own logits, backprops
the loss on ŷ and calls ``update_hessian()``:  h ← β2·h + (1−β2)·ĝ⊙ĝ.
``bs`` is the number of tokens per optimizer step (the loss is a per-token mean). The
"win rate" is the fraction of coordinates that were not clipped (ratio < 1); the authors
tune ρ to keep it in 0.1–0.5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import ParamwiseOptimizer, check_hparams


class SophiaG(ParamwiseOptimizer):
    """Args:
    lr, betas, rho, weight_decay: official defaults (1e-4, (0.965, 0.99), 0.04, 0.1).
    bs: tokens per step (overridable per call, as in the official ``step(bs=...)``).
    hessian_interval: k, steps between Hessian updates (read by the training loop).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
        hessian_interval: int = 10,
        *,
        maximize: bool = False,
    ):
        check_hparams(lr=lr, rho=rho, weight_decay=weight_decay, betas=betas)
        if hessian_interval < 1:
            raise ValueError(f"invalid hessian_interval {hessian_interval}: must be >= 1")
        defaults = dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs, maximize=maximize
        )
        super().__init__(params, defaults)
        self.hessian_interval = hessian_interval
        self.last_win_rate = float("nan")

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h ← β2·h + (1−β2)·g⊙g from the gradients currently in ``.grad`` (sampled labels)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    self.zeros(state, p, "exp_avg", "hessian")
                    state["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, bs: int | None = None):
        self._bs, self._won, self._total = bs, 0, 0
        loss = super().step(closure)
        self.last_win_rate = self._won / self._total if self._total else float("nan")
        return loss

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        lr, beta1 = group["lr"], group["betas"][0]
        tokens = group["bs"] if self._bs is None else self._bs
        self.zeros(state, p, "exp_avg", "hessian")
        state["step"] += 1
        p.mul_(1 - lr * group["weight_decay"])
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        ratio = (exp_avg.abs() / (group["rho"] * tokens * state["hessian"] + 1e-15)).clamp(None, 1)
        p.addcmul_(exp_avg.sign(), ratio, value=-lr)
        self._won += int((ratio < 1).sum())
        self._total += ratio.numel()

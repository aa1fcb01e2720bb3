"""ADOPT (Taniguchi et al., NeurIPS 2024; official code iShohei220/adopt, with clipping).

Per parameter, on its own first gradient: v ← g², no update. Afterwards:
    ĝ = clamp(g / max(sqrt(v_prev), ε), ±step^¼);  m ← lerp(m, ĝ, 1−β1);  θ ← θ − lr·m;
    v ← β2·v + (1−β2)·g²
Normalizing by the *previous* v is what defines ADOPT. Each parameter keeps its own step
count, so one that first gets a gradient late (an unused branch, an unfrozen layer) is
initialized then, not divided by ε (the official foreach path's edge case).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer


class ADOPT(Optimizer):
    """ADOPT with the official defaults.

    Args:
        lr, betas, eps: as in the paper (eps is a floor on sqrt(v), not an additive term).
        weight_decay: L2 added to the gradient, or decoupled (θ ← θ − lr·λ·θ) when ``decouple``
            (use that when replacing AdamW).
        clip_exponent: clip ĝ to ±step^clip_exponent (official: 0.25); ``None`` disables it.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
        *,
        maximize: bool = False,
    ):
        _check(lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decouple=decouple,
            clip_exponent=clip_exponent,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ADOPT does not support sparse gradients")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if wd != 0 and not group["decouple"]:
                    grad = grad.add(p, alpha=wd)
                step = int(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                if step == 0:
                    exp_avg_sq.addcmul_(grad, grad)
                    continue
                if wd != 0 and group["decouple"]:
                    p.add_(p, alpha=-lr * wd)
                normed = grad.div(torch.clamp(exp_avg_sq.sqrt(), eps))
                if group["clip_exponent"] is not None:
                    clip = step ** group["clip_exponent"]
                    normed.clamp_(-clip, clip)
                exp_avg.lerp_(normed, 1 - beta1)
                p.add_(exp_avg, alpha=-lr)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return loss


def _check(**values) -> None:
    """Reject invalid hyperparameters with a ValueError that names them."""
    for name, value in values.items():
        if name == "betas":
            if not all(0.0 <= b < 1.0 for b in value):
                raise ValueError(f"invalid betas {value}: each must be in [0, 1)")
        elif not value >= 0.0:
            raise ValueError(f"invalid {name} {value}: must be >= 0")

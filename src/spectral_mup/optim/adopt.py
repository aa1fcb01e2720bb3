"""ADOPT (Taniguchi et al., NeurIPS 2024; official code iShohei220/adopt, with clipping).

Per parameter, on its own first gradient: v ← g², no update. Afterwards:
    ĝ = clamp(g / max(sqrt(v_prev), ε), ±step^¼);  m ← lerp(m, ĝ, 1−β1);  θ ← θ − lr·m;
    v ← β2·v + (1−β2)·g²
Normalizing by the *previous* v is what defines ADOPT. Each parameter keeps its own step
count, so one that first gets a gradient late (an unused branch, an unfrozen layer) is
initialized then, not divided by ε (the official foreach path's edge case).
"""

from __future__ import annotations

import torch

from .base import ParamwiseOptimizer, check_hparams


class ADOPT(ParamwiseOptimizer):
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
        check_hparams(lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
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

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        self.zeros(state, p, "exp_avg", "exp_avg_sq")
        if wd != 0 and not group["decouple"]:
            grad = grad.add(p, alpha=wd)
        step = int(state["step"].item())
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        if step == 0:
            exp_avg_sq.addcmul_(grad, grad)
            return
        if wd != 0 and group["decouple"]:
            p.add_(p, alpha=-lr * wd)
        normed = grad.div(torch.clamp(exp_avg_sq.sqrt(), group["eps"]))
        if group["clip_exponent"] is not None:
            clip = step ** group["clip_exponent"]
            normed.clamp_(-clip, clip)
        exp_avg.lerp_(normed, 1 - beta1)
        p.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

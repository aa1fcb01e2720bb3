"""LAMB (You et al., ICLR 2020, Algorithm 2), paper form.

Per tensor:  m̂ = m/(1−β1^t),  v̂ = v/(1−β2^t),  r = m̂/(sqrt(v̂)+ε),  u = r + λθ,
    θ ← θ − lr · φ(‖θ‖)/‖u‖ · u,   φ(z) = clamp(z, φ_min, φ_max) (identity by default),
with the trust ratio set to 1 when ‖θ‖ or ‖u‖ is 0 (zero-initialized tensors). The weight
decay λθ sits inside the normalized direction, so it is not multiplied by lr.
"""

from __future__ import annotations

import torch

from .base import ParamwiseOptimizer, check_hparams


class LAMB(ParamwiseOptimizer):
    """Args:
    lr, betas, eps, weight_decay: BERT defaults (1e-3, (0.9, 0.999), 1e-6, 0.01).
    weight_norm_clamp: ``(φ_min, φ_max)`` bounds on ‖θ‖ in the trust ratio; ``None`` =
        φ(z) = z as in the paper's experiments (implementations often cap at 10).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        weight_norm_clamp: tuple[float, float] | None = None,
        *,
        maximize: bool = False,
    ):
        check_hparams(lr=lr, eps=eps, weight_decay=weight_decay, betas=betas)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            weight_norm_clamp=weight_norm_clamp,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        clamp = group["weight_norm_clamp"]
        self.zeros(state, p, "exp_avg", "exp_avg_sq")
        state["step"] += 1
        t = state["step"].item()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = exp_avg_sq / (1 - beta2**t)
        update = m_hat / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        weight_norm = p.norm()
        phi = weight_norm if clamp is None else weight_norm.clamp(clamp[0], clamp[1])
        update_norm = update.norm()
        trust = torch.where((weight_norm > 0) & (update_norm > 0), phi / update_norm, 1.0)
        state["trust_ratio"] = trust
        p.add_(update * trust, alpha=-group["lr"])

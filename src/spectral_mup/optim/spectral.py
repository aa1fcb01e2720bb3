"""Explicit spectral normalization of updates (Qiu et al. 2025; docs/RULES.md §6).

Wraps any optimizer. After the base optimizer has moved the parameters, each matrix's
update U (= the move, weight decay excluded) is rescaled before it is applied:

    hidden / readout / unknown-role matrices:  U ← U · lr·sqrt(fan_out/fan_in) / (c·σ̂(U))
    input matrices (embeddings):               U ← U · lr / RMS(U)
    vectors:                                   unchanged

σ̂ comes from a warm-started power iteration (5 iterations during the first 50 steps, then
1), floored at ‖U‖_F/sqrt(rank bound), a lower bound on σ_max, so a stale vector can never
blow the update up; c is the layer's forward multiplier (1/m for the readout), so the
*effective* update has spectral norm lr·sqrt(fan_out/fan_in). Decoupled weight decay
θ ← θ·(1 − lr·λ) is applied by the wrapper. Every μP LR multiplier is then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from .sharded import is_sharded, whole, write_back


class SpectralNormalized(Optimizer):
    """Args:
    base: the optimizer whose direction is normalized (its param groups and state are
        shared, so there is one ``state_dict``).
    warmup_steps, warmup_power_iters: power iterations per step early on (then 1).
    """

    def __init__(self, base: Optimizer, warmup_steps: int = 50, warmup_power_iters: int = 5):
        self.base = base
        self.warmup_steps, self.warmup_power_iters = warmup_steps, warmup_power_iters
        super().__init__(base.param_groups, base.defaults)
        self.param_groups, self.state = base.param_groups, base.state

    def __getattr__(self, name: str):
        """Everything else is the base optimizer's: Sophia's ``update_hessian``,
        ``hessian_interval`` and ``last_win_rate`` reach the training loop through the wrapper."""
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.base.param_groups, self.base.state = self.param_groups, self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        before = {
            p: p.detach().clone()
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        }
        decays = [g.get("weight_decay", 0.0) for g in self.param_groups]
        for g in self.param_groups:
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        try:
            loss = self.base.step(closure)
        finally:
            for g, wd in zip(self.param_groups, decays, strict=True):
                if "weight_decay" in g:
                    g["weight_decay"] = wd
        for group, wd in zip(self.param_groups, decays, strict=True):
            lr, role = group["lr"], group.get("role")
            for p in group["params"]:
                if p not in before:
                    continue
                old, current = before[p], p
                if is_sharded(p):  # FSDP2: normalize the whole matrix (sharded.py)
                    old, current = whole(old), whole(p)
                update = current - old
                if p.ndim >= 2 and role == "input":
                    rms = update.pow(2).mean().sqrt()
                    if rms > 0:
                        update = update * (lr / rms)
                elif p.ndim >= 2:  # the (fan_out, fan_in) operator, whatever the storage
                    matrix = update.mT if group.get("transposed") else update.reshape(p.size(0), -1)
                    sigma = self._top_singular_value(p, matrix)
                    if sigma > 0:
                        target = lr * math.sqrt(matrix.size(0) / matrix.size(1))
                        update = update * (target / (group.get("forward_mult", 1.0) * sigma))
                new = old.mul_(1 - lr * wd).add_(update)
                if is_sharded(p):
                    write_back(p, new)
                else:
                    p.copy_(new)
        return loss

    def _top_singular_value(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        m = m.float()
        steps = int(state.get("sn_step", 0))
        state["sn_step"] = steps + 1
        v = state.get("sn_vector")
        if v is None or not (m @ v).any():  # (re)start from the largest row
            v = m[m.norm(dim=1).argmax()].clone()
            if not v.any():
                return m.new_zeros(())  # a zero update stays zero
            v = v / v.norm()
        for _ in range(self.warmup_power_iters if steps < self.warmup_steps else 1):
            w = m.mT @ (m @ v)
            v = w / w.norm()  # w ≠ 0: ‖M·v‖ > 0 for the starting v
        state["sn_vector"] = v
        floor = m.norm() / math.sqrt(min(m.shape))
        return torch.maximum((m @ v).norm(), floor)

"""Per-run LR and weight decay for a stacked model (``stack.py``) under one optimizer.

``SliceLR`` gives every run its own per-tensor LR and weight decay on top of an optimizer
  whose update is linear in the LR and whose state does not depend on it (AdamW, Lion,
  ADOPT, SGD): the wrapped optimizer steps with LR 1 and no decay, and each run's slice of
  the change d is rescaled: ``p ← p·(1 − lr_k·λ_k) + lr_k·d`` (decoupled decay), or, for
  an optimizer whose decay is an L2 term of the gradient (torch's SGD), ``g ← g + λ_k·p``
  before the step and ``p ← p + lr_k·d`` after it.

``tests/test_batched.py`` checks it against K separate optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..optim import record_for_class
from .stack import NotBatchable, Stacked


class SliceLR:
    """Per-run, per-tensor LR and weight decay for a stacked model (module docstring).

    ``optimizer`` was built on the stacked parameters with LR 1 and no weight decay; ``lrs``
    and ``wds`` map each stacked parameter to its K runs' values (``[K]`` tensors), taken
    from each run's own param groups. ``decay`` is ``"decoupled"`` (p·(1 − lr·λ)) or ``"l2"``
    (λ·p added to the gradient); ``first_decay=False``: the optimizer neither moves nor
    decays at its first step (ADOPT). ``factors``: the K runs' LR schedule factors.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lrs: Mapping[nn.Parameter, torch.Tensor],
        wds: Mapping[nn.Parameter, torch.Tensor],
        decay: str = "decoupled",
        *,
        first_decay: bool = True,
    ):
        if decay not in ("decoupled", "l2"):
            raise ValueError(f"decay must be decoupled or l2, got {decay!r}")
        for group in optimizer.param_groups:
            if group["lr"] != 1.0 or group.get("weight_decay", 0.0) != 0.0:
                raise ValueError("SliceLR needs an optimizer built with lr=1, weight_decay=0")
        self.opt, self.decay, self.first_decay = optimizer, decay, first_decay
        self.lrs, self.wds = dict(lrs), dict(wds)
        self.steps = 0
        self.params = [q for g in optimizer.param_groups for q in g["params"]]

    @torch.no_grad()
    def step(self, factors: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """One step; ``factors``: ``[K]`` schedule factors; ``active``: ``[K]`` bools, a
        run that is not active (diverged, stopped) keeps its weights."""

        def per_run(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            return v.to(q.dtype).reshape(-1, *([1] * (q.dim() - 1)))

        old = {}
        for q in self.params:
            if q.grad is None:
                continue
            if active is not None:  # a stopped run's (maybe non-finite) gradient moves nothing
                q.grad.masked_fill_(~per_run(active, q).bool(), 0.0)
            if self.decay == "l2":
                q.grad.add_(q * per_run(self.wds[q], q))
            old[q] = q.detach().clone()
        self.opt.step()
        self.steps += 1
        decays = self.decay == "decoupled" and (self.first_decay or self.steps > 1)
        for q, before in old.items():
            lr = per_run(self.lrs[q] * factors, q)
            d = q - before
            if decays:
                new = before * (1 - lr * per_run(self.wds[q], q)) + lr * d
            else:
                new = before + lr * d
            if active is not None:
                new = torch.where(per_run(active, q).bool(), new, before)
            q.copy_(new)


def slice_hparams(
    stacked: Stacked, groups_per_run: Sequence[Sequence[Mapping[str, Any]]]
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor]]:
    """Per stacked parameter, the K runs' ``lr`` and ``weight_decay`` from each run's own
    param groups (``param_groups``/``build_optimizer`` on the single model, ``names``)."""
    per_name: list[dict[str, tuple[float, float]]] = []
    for groups in groups_per_run:
        per_name.append(
            {n: (g["lr"], g.get("weight_decay", 0.0)) for g in groups for n in g["names"]}
        )
    lrs, wds = {}, {}
    for name, q in stacked.inner.named_parameters():
        try:
            values = [d[name] for d in per_name]
        except KeyError:
            raise NotBatchable(f"parameter {name} is in no param group of some run") from None
        lrs[q] = torch.tensor([v[0] for v in values], dtype=torch.float64)
        wds[q] = torch.tensor([v[1] for v in values], dtype=torch.float64)
    return lrs, wds


_PER_RUN_KEYS = {"params", "names", "lr", "weight_decay", "lr_mult", "initial_lr"}


def _decay_mode(opt: torch.optim.Optimizer) -> tuple[str, bool]:
    """How the optimizer applies weight decay (SliceLR's ``decay`` and ``first_decay``), for
    the optimizers whose update is linear in the LR with LR-free state (their record's
    ``stacking``); NotBatchable for any other."""
    stacking = record_for_class(type(opt)).stacking  # ADOPT: by its decouple option
    if stacking is None:
        raise NotBatchable(f"{type(opt).__name__} steps are not batched (yet): one run per process")
    return stacking.mode(opt.defaults)


def stacked_optimizer(stacked: Stacked, optimizers: Sequence[torch.optim.Optimizer]) -> SliceLR:
    """The optimizer of a stacked model from the K runs' own optimizers (built on their
    single models by ``build_optimizer``): one group per stacked tensor with the runs'
    shared options (ε, betas, …; they must agree) at LR 1 and no decay, wrapped in SliceLR
    with each run's LR and decay of that tensor."""
    if len(optimizers) != stacked.k or len({type(o) for o in optimizers}) != 1:
        raise NotBatchable("one optimizer of one class per stacked run is needed")
    mode, first_decay = _decay_mode(optimizers[0])
    per_run = []
    for opt in optimizers:
        per_run.append({n: g for g in opt.param_groups for n in g.get("names", ())})
    groups = []
    for name, q in stacked.inner.named_parameters():
        try:
            own = [d[name] for d in per_run]
        except KeyError:
            raise NotBatchable(f"parameter {name} is in no named param group of some run") from None
        shared = [{k: v for k, v in g.items() if k not in _PER_RUN_KEYS} for g in own]
        if any(s != shared[0] for s in shared[1:]):
            raise NotBatchable(f"the runs' optimizer options for {name} differ beyond lr and decay")
        groups.append({**shared[0], "params": [q], "lr": 1.0, "weight_decay": 0.0})
    opt = type(optimizers[0])(groups, lr=1.0)
    lrs, wds = slice_hparams(stacked, [o.param_groups for o in optimizers])
    return SliceLR(opt, lrs, wds, mode, first_decay=first_decay)


@torch.no_grad()
def clip_per_run(stacked: Stacked, max_norm: float, active: torch.Tensor) -> None:
    """torch's clip_grad_norm_ for each run alone: its gradients × min(1, max/(‖g‖+1e-6))."""
    grads = [q.grad for q in stacked.parameters() if q.grad is not None]
    if not grads:
        return
    sq = sum(g.double().pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))))

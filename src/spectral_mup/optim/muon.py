"""Muon (Keller Jordan et al. 2024): momentum, then Newton–Schulz orthogonalization, on the
hidden matrices; an AdamW rule for everything else — one optimizer, one ``state_dict``.

Muon groups (``aux=False``):
    m ← lerp(m, g, 1−μ);  u = lerp(g, m, μ) (Nesterov) or m;
    O = NS5(u) per logical sub-block (``split``: k equal row blocks, or a tuple of row
        sizes, e.g. fused Q, K, V with fewer K/V heads), batched over every sub-block of the
        same shape; a ``transposed`` group's weights are stored (fan_in, fan_out) (GPT-2's
        Conv1D) and are orthogonalized as the (fan_out, fan_in) operator they are;
    θ ← θ·(1 − lr·λ) − lr·f(fan_out, fan_in)·O
with the shape factor f: ``"spectral"`` sqrt(fan_out/fan_in) (μP), ``"original"``
sqrt(max(1, fan_out/fan_in)) (torch.optim.Muon) or ``"moonlight"`` 0.2·sqrt(max(fan_out,
fan_in)). NS5 uses the quintic (3.4445, −4.7750, 2.0315), five steps, on X/‖X‖_F, in bf16
on accelerators and fp32 on CPU unless ``ns_dtype`` says otherwise.

AdamW groups (``aux=True``): torch's AdamW step with the group's lr, betas, eps and
weight_decay.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from ..rules import SHAPE_FACTORS
from .base import check_hparams, run_closure
from .sharded import is_sharded, whole, write_back

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate U·Vᵀ of each matrix in ``g`` (shape (..., rows, cols)), returned in the
    iteration's dtype; singular values land in about [0.68, 1.14]. Scale-invariant: the
    input is divided by its Frobenius norm. On accelerators the matrices run as one batch
    (one kernel per product); on CPU one at a time, since 2-D products are faster there
    than batched ones (bf16 ``bmm`` is up to 1.4× slower than a loop of ``addmm``)."""
    x = g.reshape(-1, *g.shape[-2:]).to(dtype or g.dtype)
    if x.device.type == "cpu":
        out = torch.stack([_iterate(m, steps, coefficients, eps) for m in x])
    else:
        out = _iterate(x, steps, coefficients, eps)
    return out.reshape(g.shape)


def _iterate(
    x: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float
) -> torch.Tensor:
    """The quintic iteration on one matrix (2-D) or a batch (3-D), on the wide orientation."""
    a, b, c = coefficients
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


def _logical(t: torch.Tensor, group: dict) -> torch.Tensor:
    """The (fan_out, fan_in) operator a weight (or its update) stands for."""
    return t.mT if group.get("transposed", False) else t.reshape(t.size(0), -1)


def _row_sizes(group: dict, rows: int) -> list[int]:
    """Row sizes of a matrix's logical sub-blocks (``split``: a count or the sizes)."""
    split = group.get("split", 1)  # groups loaded from older checkpoints lack the key
    if isinstance(split, int):
        if rows % split:
            raise ValueError(f"Muon: {rows} rows do not split into {split} equal blocks")
        return [rows // split] * split
    if sum(split) != rows:
        raise ValueError(f"Muon: split sizes {tuple(split)} do not add up to {rows} rows")
    return list(split)


class Muon(Optimizer):
    """Args:
    lr, momentum, nesterov, weight_decay: the Muon part (Keller's defaults: 0.02, 0.95, True).
    shape_factor: ``"spectral"`` (default; μP), ``"original"`` or ``"moonlight"``.
    ns_steps, ns_coefficients, ns_eps, ns_dtype: the Newton–Schulz iteration.
    betas, eps: the AdamW part (groups with ``aux=True``; their lr/weight_decay are per group).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        shape_factor: str = "spectral",
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        check_hparams(lr=lr, weight_decay=weight_decay, eps=eps, betas=betas)
        if shape_factor not in SHAPE_FACTORS:
            raise ValueError(
                f"shape_factor must be one of {sorted(SHAPE_FACTORS)}, got {shape_factor!r}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}: must be in [0, 1)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            shape_factor=shape_factor,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            ns_eps=ns_eps,
            betas=betas,
            eps=eps,
            aux=False,
            split=1,
            transposed=False,
        )
        self.ns_dtype = ns_dtype
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["aux"]:
            for p in group["params"]:
                if p.ndim < 2 or (group.get("transposed", False) and p.ndim != 2):
                    raise ValueError(
                        f"Muon needs matrices; got shape {tuple(p.shape)} "
                        "(route it to the AdamW part: aux=True)"
                    )
                _row_sizes(group, _logical(p, group).size(0))  # raises if the split is wrong

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = run_closure(closure)
        pending = []  # (group, param, first row, one logical block of the update)
        for group in self.param_groups:
            if group["aux"]:
                self._adamw(group)
                continue
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                matrix = _logical(whole(update), group)  # never a shard (sharded.py)
                row = 0
                for size in _row_sizes(group, matrix.size(0)):
                    pending.append((group, p, row, matrix[row : row + size]))
                    row += size
        gathered = {}  # FSDP2 shard → its whole parameter, updated, then written back
        for group, p, row, ortho in self._orthogonalize(pending):
            if is_sharded(p) and p not in gathered:
                gathered[p] = whole(p)
            target = gathered.get(p, p)
            if row == 0:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            rows, cols = ortho.shape
            factor = SHAPE_FACTORS[group["shape_factor"]](cols, rows)
            # the block's rows of the (fan_out, fan_in) view of p, written in place
            view = target.mT if group.get("transposed", False) else target.view(p.size(0), -1)
            view[row : row + rows].add_(ortho, alpha=-group["lr"] * factor)
        for p, full in gathered.items():
            write_back(p, full)
        return loss

    def _orthogonalize(self, pending):
        """NS5 on every block, batched over blocks of the same shape, dtype and settings."""
        batches = defaultdict(list)
        for i, (group, p, _, block) in enumerate(pending):
            dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
            key = (
                tuple(block.shape),
                p.device,
                p.dtype,
                dtype,
                group["ns_steps"],
                group["ns_coefficients"],
                group["ns_eps"],
            )
            batches[key].append(i)
        results = [None] * len(pending)
        for (_, _, _, dtype, steps, coeffs, eps), members in batches.items():
            stacked = torch.stack([pending[i][3].to(dtype) for i in members])
            ortho = newton_schulz(stacked, steps, coeffs, eps, dtype)
            for j, i in enumerate(members):
                results[i] = ortho[j]
        return [(g, p, row, results[i]) for i, (g, p, row, _) in enumerate(pending)]

    def _adamw(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"].item()
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))

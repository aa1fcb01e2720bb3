"""Shampoo (Gupta, Koren & Singer 2018) with the practical extensions of Meta's
DistributedShampoo: blocking, grafting, amortized roots, a start step, decoupled decay.

Every parameter of two or more dimensions is viewed as a matrix G (rows = dim 0, columns =
the rest) and cut into blocks of at most ``block_size`` × ``block_size`` (one block when
``block_size`` is None). Per block, each step:
    L ← β2·L + (1−β2)·G Gᵀ,  R ← β2·R + (1−β2)·Gᵀ G        (β2 = 1: sums, as in the paper)
    every ``precondition_frequency`` steps from ``start_preconditioning_step``:
        L⁻ = (L̂ + εI)^(−e_L),  R⁻ = (R̂ + εI)^(−e_R)  by eigh (fp64 retry on failure),
        L̂ = L/(1 − β2^t) for EMA factors
    Ḡ = m/(1 − β1^t) with m ← β1·m + (1−β1)·g (Ḡ = g when β1 = 0)
    P = L⁻ Ḡ R⁻ — or, before the start step, the grafting direction;
    with grafting, P ← ‖P_graft‖/‖P‖ · P per block (SGD: Ḡ; AdaGrad: Ḡ/(sqrt(Σg²)+ε_g);
    Adam: Ḡ/(sqrt(v/(1−β_g^t))+ε_g)).
    θ ← θ·(1 − lr·λ) − lr·P
Vectors and scalars get the diagonal version, AdaGrad's Ḡ/sqrt(Σg² + ε) (a full n×n factor
per bias would cost an n×n eigendecomposition for no benefit).
"""

from __future__ import annotations

import math

import torch

from .base import ParamwiseOptimizer, check_hparams
from .blocks import as_matrix, block_size_or_none, gather, gram_update_, regions, scatter

GRAFTINGS = ("none", "sgd", "adagrad", "adam")


def inverse_root(matrix: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    """(A + εI)^(−exponent) of symmetric PSD matrices (batched over leading dims) via eigh;
    retried in fp64 when the fp32 eigensolver fails."""
    eye = torch.eye(matrix.size(-1), dtype=matrix.dtype, device=matrix.device)
    try:
        vals, vecs = torch.linalg.eigh(matrix + eps * eye)
    except RuntimeError:
        vals, vecs = torch.linalg.eigh((matrix + eps * eye).double())
    vals = vals.clamp(min=eps)
    return ((vecs * vals.pow(-exponent).unsqueeze(-2)) @ vecs.mT).to(matrix.dtype)


class Shampoo(ParamwiseOptimizer):
    """Args:
    lr, weight_decay: step size and decoupled decay.
    betas: (β1 momentum of the gradient, β2 of the factors; 1.0 = summed factors).
    epsilon: damping added before every root.
    exponents: (e_L, e_R); 1/4 each is Shampoo, 1/2 each is supported.
    precondition_frequency, start_preconditioning_step: amortized roots.
    block_size: cut every matrix into blocks of at most this size (None: no blocking).
    grafting: none | sgd | adagrad | adam, with grafting_beta2 (adam) and grafting_eps.
    """

    whole_matrices = True  # preconditioners need the whole gradient (sharded.py)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.0, 1.0),
        epsilon: float = 1e-12,
        exponents: tuple[float, float] = (0.25, 0.25),
        precondition_frequency: int = 1,
        start_preconditioning_step: int = 1,
        block_size: int | None = None,
        grafting: str = "none",
        grafting_beta2: float = 0.999,
        grafting_eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        check_hparams(lr=lr, epsilon=epsilon, weight_decay=weight_decay, grafting_eps=grafting_eps)
        if not (0.0 <= betas[0] < 1.0 and 0.0 < betas[1] <= 1.0):
            raise ValueError(f"invalid betas {betas}: need 0 <= β1 < 1 and 0 < β2 <= 1")
        if grafting not in GRAFTINGS:
            raise ValueError(f"grafting must be one of {GRAFTINGS}, got {grafting!r}")
        if precondition_frequency < 1 or start_preconditioning_step < 1:
            raise ValueError("precondition_frequency and start_preconditioning_step must be >= 1")
        block_size = block_size_or_none(block_size)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            epsilon=epsilon,
            exponents=tuple(exponents),
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            block_size=block_size,
            grafting=grafting,
            grafting_beta2=grafting_beta2,
            grafting_eps=grafting_eps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        if p.ndim < 2:
            self._diagonal(group, p, grad, state)
            return
        beta1, beta2 = group["betas"]
        g = as_matrix(grad)
        tiles = regions(*g.shape, group["block_size"])
        if not state:
            self.zeros(state, p, "momentum", "graft")
            for i, r in enumerate(tiles):
                eye_l = torch.eye(r.br, dtype=g.dtype, device=g.device)
                eye_r = torch.eye(r.bc, dtype=g.dtype, device=g.device)
                state[f"L{i}"] = g.new_zeros(r.count, r.br, r.br)
                state[f"R{i}"] = g.new_zeros(r.count, r.bc, r.bc)
                state[f"Linv{i}"] = eye_l.expand(r.count, -1, -1).clone()
                state[f"Rinv{i}"] = eye_r.expand(r.count, -1, -1).clone()
        state["step"] += 1
        t = int(state["step"].item())
        if beta1 > 0:
            state["momentum"].lerp_(grad, 1 - beta1)
            filtered = as_matrix(state["momentum"] / (1 - beta1**t))
        else:
            filtered = g
        graft = self._graft_direction(group, state, grad, filtered, t)
        start, freq = group["start_preconditioning_step"], group["precondition_frequency"]
        precondition = t >= start
        recompute = precondition and (t - start) % freq == 0
        e_l, e_r = group["exponents"]
        if group.get("transposed"):  # stored (fan_in, fan_out): the stored rows are fan_in
            e_l, e_r = e_r, e_l
        direction = filtered if graft is None else graft
        if precondition:
            direction = torch.empty_like(g)
        for i, r in enumerate(tiles):
            gb = gather(g, r)
            left, right = state[f"L{i}"], state[f"R{i}"]
            weight = 1.0 if beta2 == 1.0 else 1 - beta2
            gram_update_(left, gb, beta2, weight)
            gram_update_(right, gb.mT, beta2, weight)
            if recompute:
                scale = 1.0 if beta2 == 1.0 else 1.0 / (1 - beta2**t)
                state[f"Linv{i}"] = inverse_root(left * scale, e_l, group["epsilon"])
                state[f"Rinv{i}"] = inverse_root(right * scale, e_r, group["epsilon"])
            if not precondition:
                continue
            block = state[f"Linv{i}"] @ gather(filtered, r) @ state[f"Rinv{i}"]
            if graft is not None:
                ratio = gather(graft, r).flatten(1).norm(dim=1) / block.flatten(1).norm(dim=1)
                block = block * ratio.nan_to_num(0.0, 0.0, 0.0)[:, None, None]
            scatter(direction, r, block)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.reshape(p.shape), alpha=-group["lr"])

    @staticmethod
    def _diagonal(group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        ParamwiseOptimizer.zeros(state, p, "momentum", "diag")
        state["step"] += 1
        t = int(state["step"].item())
        filtered = grad
        if beta1 > 0:
            state["momentum"].lerp_(grad, 1 - beta1)
            filtered = state["momentum"] / (1 - beta1**t)
        if beta2 == 1.0:
            state["diag"].addcmul_(grad, grad)
            second = state["diag"]
        else:
            state["diag"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            second = state["diag"] / (1 - beta2**t)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(filtered, (second + group["epsilon"]).sqrt(), value=-group["lr"])

    @staticmethod
    def _graft_direction(group, state, grad, filtered, t):
        kind = group["grafting"]
        if kind == "none":
            return None
        if kind == "sgd":
            return filtered
        acc = state["graft"]
        if kind == "adagrad":
            acc.addcmul_(grad, grad)
            denom = acc.sqrt()
        else:
            b2 = group["grafting_beta2"]
            acc.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = acc.sqrt() / math.sqrt(1 - b2**t)
        return filtered / denom.add_(group["grafting_eps"]).reshape(filtered.shape)

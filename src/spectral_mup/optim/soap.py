"""SOAP (Vyas et al. 2024, arXiv 2409.11321; nikhilvyas/SOAP): Adam in Shampoo's eigenbasis.

Per parameter, viewed as a matrix G (rows = dim 0, columns = the rest; a vector is one row)
and cut into blocks of at most ``block_size`` × ``block_size`` (one block when None):

- first call only initializes: GG_L = (1−β_s)·G Gᵀ, GG_R = (1−β_s)·Gᵀ G,
  Q = eigenvectors of GG + 1e-30·I in descending order (fp64 retry); no update, t stays 0;
- every later call, t ← t+1:
      G' = Q_Lᵀ G Q_R,   m ← β1 m + (1−β1) G',   v ← β2 v + (1−β2) G'²   (m, v in the basis)
      N = Q_L (m / (sqrt(v) + ε)) Q_Rᵀ          (optionally N ← N / (RMS(N) + 1e-30))
      θ ← θ − lr·sqrt(1−β2^t)/(1−β1^t)·N,  then θ ← θ − lr·λ·θ (decay after the update)
      GG ← β_s GG + (1−β_s) (G Gᵀ | Gᵀ G)
      every f steps: sort diag(Qᵀ GG Q) descending, permute v to match, Q ← QR(GG·Q[:, order]),
      and carry m into the new basis.
A side is preconditioned when its size is > 1 and ≤ ``max_precond_dim``; a vector's only
side when ``precondition_1d``. Unpreconditioned sides use the identity basis (plain Adam).
State is kept in fp32 for bf16/fp16 parameters. Same-shape blocks run batched.
"""

from __future__ import annotations

import math

import torch

from .base import ParamwiseOptimizer, check_hparams
from .blocks import Region, block_size_or_none, gather, gram_update_, regions, scatter

SIDES = ("L", "R")


def eigenbasis(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of (batched) symmetric ``gram`` in descending eigenvalue order."""
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    try:
        _, vecs = torch.linalg.eigh(gram + 1e-30 * eye)
    except RuntimeError:
        _, vecs = torch.linalg.eigh(gram.double() + 1e-30 * eye.double())
    return vecs.flip(-1).to(gram.dtype)


def orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of (batched) ``matrix``, exactly ``torch.linalg.qr(m)[0]``
    (the same Householder reflections), without forming R: 15% faster at 2048×2048."""
    reflectors, tau = torch.geqrf(matrix)
    return torch.linalg.householder_product(reflectors, tau)


class SOAP(ParamwiseOptimizer):
    """Args (official defaults):
    lr, betas (β1, β2), shampoo_beta (β_s; None → β2), eps, weight_decay (decoupled, after
    the update), precondition_frequency (f), max_precond_dim, precondition_1d,
    normalize_grads, correct_bias, block_size (None: no blocking).
    """

    whole_matrices = True  # preconditioners need the whole gradient (sharded.py)

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        block_size: int | None = None,
    ):
        check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
            raise ValueError(f"invalid shampoo_beta {shampoo_beta}: must be in [0, 1)")
        if precondition_frequency < 1:
            raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}")
        block_size = block_size_or_none(block_size)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            block_size=block_size,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _sides(group: dict, p: torch.Tensor, r: Region) -> tuple[bool, bool]:
        limit = group["max_precond_dim"]
        left = p.ndim >= 2 and 1 < r.br <= limit
        right = (p.ndim >= 2 or group["precondition_1d"]) and 1 < r.bc <= limit
        return left, right

    def update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        work = grad.float() if grad.dtype in (torch.bfloat16, torch.float16) else grad
        g = work.reshape(1, -1) if p.ndim < 2 else work.reshape(p.size(0), -1)
        tiles = regions(*g.shape, group["block_size"] if p.ndim >= 2 else None)
        beta1, beta2 = group["betas"]
        beta_s = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        blocks = [gather(g, r) for r in tiles]
        if not state:  # the first call only builds the statistics and the basis
            state["step"] = torch.tensor(0.0)
            for i, (r, gb) in enumerate(zip(tiles, blocks, strict=True)):
                state[f"m{i}"] = torch.zeros_like(gb)
                state[f"v{i}"] = torch.zeros_like(gb)
                for side, on in zip(SIDES, self._sides(group, p, r), strict=True):
                    if on:
                        gram = self._gram(gb, side) * (1 - beta_s)
                        state[f"GG{side}{i}"] = gram
                        state[f"Q{side}{i}"] = eigenbasis(gram)
            return
        state["step"] += 1
        t = int(state["step"].item())
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1 - beta2**t) / (1 - beta1**t)
        whole = len(tiles) == 1 and tiles[0].count == 1  # one block: no scatter copy
        direction = None if whole else torch.empty_like(g)
        for i, (r, gb) in enumerate(zip(tiles, blocks, strict=True)):
            q_l, q_r = state.get(f"QL{i}"), state.get(f"QR{i}")
            m, v = state[f"m{i}"], state[f"v{i}"]
            projected = self._project(gb, q_l, q_r)
            m.lerp_(projected, 1 - beta1)
            v.lerp_(projected.square_(), 1 - beta2)
            normalized = m / v.sqrt().add_(group["eps"])
            back = self._project_back(normalized, q_l, q_r)
            if whole:
                direction = back[0]
            else:
                scatter(direction, r, back)
        if group["normalize_grads"]:
            direction.div_(direction.square().mean().sqrt().add_(1e-30))
        p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        refresh = t % group["precondition_frequency"] == 0
        for i, gb in enumerate(blocks):
            for side in SIDES:
                if f"GG{side}{i}" in state:
                    x = gb if side == "L" else gb.mT
                    gram_update_(state[f"GG{side}{i}"], x, beta_s, 1 - beta_s)
            if refresh:
                self._refresh(state, i)

    @staticmethod
    def _gram(gb: torch.Tensor, side: str) -> torch.Tensor:
        return gb @ gb.mT if side == "L" else gb.mT @ gb

    @staticmethod
    def _project(x: torch.Tensor, q_l, q_r) -> torch.Tensor:
        if q_l is not None:
            x = q_l.mT @ x
        return x @ q_r if q_r is not None else x.clone()

    @staticmethod
    def _project_back(x: torch.Tensor, q_l, q_r) -> torch.Tensor:
        if q_l is not None:
            x = q_l @ x
        return x @ q_r.mT if q_r is not None else x

    def _refresh(self, state: dict, i: int) -> None:
        """One power iteration + QR per side; v follows the new eigenvalue order and m is
        carried into the new basis."""
        q_l, q_r = state.get(f"QL{i}"), state.get(f"QR{i}")
        momentum = self._project_back(state[f"m{i}"], q_l, q_r)
        v = state[f"v{i}"]
        for side, axis in zip(SIDES, (1, 2), strict=True):
            if f"Q{side}{i}" not in state:
                continue
            gram, basis = state[f"GG{side}{i}"], state[f"Q{side}{i}"]
            power = gram @ basis
            order = (basis * power).sum(dim=-2).argsort(dim=-1, descending=True)
            index = order.unsqueeze(1) if axis == 2 else order.unsqueeze(2)
            v = v.gather(axis, index.expand_as(v))
            power = power.gather(2, order.unsqueeze(1).expand_as(power))
            low = power.dtype in (torch.bfloat16, torch.float16)  # no QR kernel for them
            state[f"Q{side}{i}"] = orthonormal_basis(power.float() if low else power).to(
                power.dtype
            )
        state[f"v{i}"] = v
        state[f"m{i}"] = self._project(momentum, state.get(f"QL{i}"), state.get(f"QR{i}"))

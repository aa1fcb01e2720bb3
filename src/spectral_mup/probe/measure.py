"""Measuring: what one probe trajectory's updates are, per tensor and step, and the probe's
trajectories (docs/probe.md).

Each trajectory builds the model at one size (``ProbeSetup``) and takes a few steps; per
tensor and step it records the spectral norm of each update (power iteration; an
embedding's per-token row norm, a vector's ℓ2 norm), its norm on the layer's inputs and its
RMS. The probe's runs: every seed at every width and, at the base width, every depth
(``size_runs``); at the base width again with every gradient × s (``grad_scale_ratios``),
with ε at values that matter (``eps_deviations``), with weight decay and with the weights
doubled (``decay_and_weight_ratios``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import rules
from ..parametrize import Parametrization, canonical_name, smup_attr
from .setup import ProbeSetup, Run

GROUPS = ("input", "hidden", "output", "vector (block)", "vector")
GRAD_SCALE = 8.0  # s in update(s·g) = s^k·update(g)


def spectral_norm(a: torch.Tensor, iters: int = 20) -> float:
    """Largest singular value of a matrix by power iteration on AᵀA (a fixed start vector, so
    repeated calls agree); a vector's norm is its ℓ2 norm."""
    if a.ndim == 1:
        return float(a.norm())
    a = a.reshape(a.shape[0], -1).double()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(a.shape[1], generator=gen, dtype=a.dtype)
    sigma = 0.0
    for _ in range(iters):
        u = a @ v
        norm = float(u.norm())
        if norm == 0.0:
            return 0.0
        v = a.T @ (u / norm)
        sigma = float(v.norm())
        v = v / sigma
    return sigma


@dataclass(frozen=True)
class MeasuredTensor:
    """One measured matrix (a logical row block of a fused tensor) or vector."""

    key: str  # parameter name, plus "#block" for a row block
    param: str
    rows: slice | None
    role: rules.Role
    in_block: bool
    fan_in: int
    fan_out: int
    forward: float  # c, the layer's forward multiplier
    transposed: bool

    @property
    def group(self) -> str:
        return "vector (block)" if self.role == "vector" and self.in_block else self.role


StepNorms = dict[str, tuple[float, float, float]]  # tensor key -> (norm, on the data, RMS)
Trajectory = tuple[list[MeasuredTensor], list[StepNorms], list[dict[str, Any]]]
"""A trajectory's tensors, their norms per measured step and, if kept, its updates."""


def _tensors(model: nn.Module, p: Parametrization) -> list[MeasuredTensor]:
    roles = smup_attr(model, "smup_roles")
    splits = smup_attr(model, "smup_splits") or {}
    out = []
    for name, param in model.named_parameters():
        info = roles[canonical_name(name)]
        c = rules.forward_multiplier(info.role, info.m_in, p.readout) if p.is_mup else 1.0
        split = next((k for pat, k in splits.items() if fnmatch.fnmatchcase(name, pat)), 1)
        if param.ndim < 2 or split == 1:
            sizes = [info.fan_out]
        elif isinstance(split, int):
            sizes = [info.fan_out // split] * split
        else:
            sizes = list(split)
        start = 0
        for i, rows in enumerate(sizes):
            part = slice(start, start + rows) if len(sizes) > 1 else None
            key = f"{name}#{i}" if len(sizes) > 1 else name
            start += rows
            out.append(
                MeasuredTensor(
                    key, name, part, info.role, info.in_block, info.fan_in, rows, c, info.transposed
                )
            )
    return out


def _operator(t: MeasuredTensor, delta: torch.Tensor) -> torch.Tensor:
    """The update of one measured matrix in (fan_out, fan_in) layout."""
    delta = delta.reshape(delta.shape[0], -1)
    if t.transposed:
        delta = delta.T
    return delta[t.rows] if t.rows is not None else delta


def _norm_of(
    t: MeasuredTensor, delta: torch.Tensor, x: torch.Tensor | None
) -> tuple[float, float, float]:
    """(norm, norm on the data, RMS) of one update. The norm is the spectral norm ‖ΔW‖*
    (power iteration); an input layer's inputs are one-hot, so its norm is the RMS over the
    probe batch's tokens of ‖ΔW·e_token‖ (‖ΔW‖* bounds it, and a sign-like V × width update
    reaches the bound only once width ≫ V); a vector's is its ℓ2 norm. The norm on the
    data, ‖ΔW·X‖_F/‖X‖_F over the layer's inputs X on the probe batch, is recorded beside
    it: the spectral condition's ‖ΔW‖* is its bound, reached when updates align with the
    inputs."""
    rms = float(delta.pow(2).mean().sqrt())
    if delta.ndim < 2:
        n = float(delta.norm())
        return n, n, rms
    d = _operator(t, delta)
    if x is not None and not x.is_floating_point():  # token ids: rows of an Embedding
        ids = x.reshape(-1)
        moved = d[ids] if d.shape[0] == t.fan_in else d[:, ids].T
        n = float(moved.pow(2).sum(1).mean().sqrt())
        return n, n, rms
    spectral = spectral_norm(d)
    if x is None:
        return spectral, spectral, rms
    x = x.reshape(-1, x.shape[-1]).to(d.dtype)
    return spectral, float((x @ d.T).norm() / x.norm()), rms


def _trajectory(
    build: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module, Run], torch.optim.Optimizer],
    p: Parametrization,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss: Callable,
    hessian: Callable | None,
    run: Run,
    probe_x: torch.Tensor,
    curvature_interval: Callable[[torch.optim.Optimizer], int] = lambda opt: 0,
) -> Trajectory:
    """Train ``len(batches)`` steps; for each step after the first ``run.skip``, every
    tensor's (norm, norm on the data, RMS) (``_norm_of``, inputs from ``probe_x``) and, with
    ``run.keep``, the updates and the weights they were applied to; ``hessian`` refreshes a
    curvature estimate every ``curvature_interval(opt)`` steps (the optimizer's record)."""
    model = build()
    if run.weight_scale != 1.0:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.mul_(run.weight_scale)
    opt = make_optimizer(model, run)
    hooks = []
    if run.grad_scale != 1.0:
        s = run.grad_scale
        hooks = [q.register_hook(lambda g: g * s) for q in model.parameters()]
    tensors = _tensors(model, p)
    params = dict(model.named_parameters())
    inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for t in tensors:
        owner = t.param.rpartition(".")[0]
        if t.role != "vector" and owner in modules and owner not in inputs:
            inputs[owner] = None  # type: ignore[assignment]
            hooks.append(modules[owner].register_forward_pre_hook(_keep_input(inputs, owner)))
    hessian_every = curvature_interval(opt)
    norms, kept = [], []
    for step, (x, y) in enumerate(batches, start=1):
        with torch.no_grad():
            model(probe_x)  # the layers' inputs on the probe batch, before this step
        seen = {k: v for k, v in inputs.items() if v is not None}
        before = {n: q.detach().clone() for n, q in params.items()}
        opt.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        opt.step()
        if hessian_every and hessian is not None and step % hessian_every == 0:
            hessian(model, opt, x)
        if step <= run.skip:
            continue
        deltas = {n: params[n].detach() - before[n] for n in params}
        norms.append(
            {
                t.key: _norm_of(t, deltas[t.param], seen.get(t.param.rpartition(".")[0]))
                for t in tensors
            }
        )
        if run.keep:
            kept.append({"delta": deltas, "before": before})
    for h in hooks:
        h.remove()
    return tensors, norms, kept


def _keep_input(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        store[name] = args[0].detach()

    return hook


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def trajectory(
    setup: ProbeSetup, width: int, depth: int, seed: int, run: Run, *, first_steps: bool = False
) -> Trajectory:
    """``_trajectory`` of ``setup``'s model at ``width`` × ``depth`` (μP based at the first
    width and depth, α = 1) on seed ``seed``'s batches, measured after the optimizer's
    transient (``setup.skip`` steps) or, with ``first_steps`` (the decay test), from its
    first step."""
    run = replace(run, skip=0 if first_steps else setup.skip)
    p = Parametrization(kind="mup", base_width=setup.widths[0], base_depth=setup.depth0,
                        depth_alpha=1.0)  # fmt: skip
    with _default_dtype(setup.dtype):
        batches = setup.batches_for(seed)[: run.skip + setup.steps]
        return _trajectory(lambda: setup.build(width, depth, p, seed),
                           lambda m, r: setup.make_optimizer(m, r, p), p,
                           batches, setup.loss, setup.hessian, run, setup.probe_x,
                           setup.spec.curvature_interval)  # fmt: skip


def init_eps(setup: ProbeSetup) -> tuple[float, float]:
    """ε values that matter at init: the median over matrices of RMS(G) (compared with
    gradient entries) and of ‖G‖_F²/min(fans) (compared with the eigenvalues of G·Gᵀ)."""
    p = Parametrization(kind="mup", base_width=setup.widths[0], base_depth=setup.depth0)
    with _default_dtype(setup.dtype):
        net = setup.build(setup.widths[0], setup.depth0, p, setup.seeds[0])
        setup.loss(net, *setup.batches_for(setup.seeds[0])[0]).backward()
    grads = [q.grad for q in net.parameters() if q.ndim >= 2 and q.grad is not None]
    entry = statistics.median(float(g.pow(2).mean().sqrt()) for g in grads)
    gram = statistics.median(float(g.pow(2).sum()) / min(g.shape) for g in grads)
    return entry, gram


# ------------------------------------------------------------------------ the probe's runs


def size_runs(setup: ProbeSetup, bar: tqdm) -> tuple[list[dict[str, Any]], dict[int, tuple]]:
    """Every seed's trajectory at every width (depth ``setup.depth0``) and, at the base
    width, at every further depth: one record per tensor and measured step (its norms × c/lr),
    and per seed the base run's (tensors, norms)."""
    widths, lr = setup.widths, setup.lr
    work = [("width", w, setup.depth0, s) for s in setup.seeds for w in widths]
    work += [("depth", widths[0], d, s) for s in setup.seeds for d in setup.depths[1:]]
    records: list[dict[str, Any]] = []
    base_runs: dict[int, tuple] = {}
    for axis, w, d, s in work:
        tensors, norms, _ = trajectory(setup, w, d, s, Run())
        if axis == "width" and w == widths[0]:
            base_runs[s] = (tensors, norms)
        for step, per in enumerate(norms, start=1):
            for t in tensors:
                n, data_n, rms = per[t.key]
                records.append({"axis": axis, "seed": s, "width": w, "depth": d, "step": step,
                                "tensor": t.key, "group": t.group, "in_block": t.in_block,
                                "fan_in": t.fan_in, "fan_out": t.fan_out, "forward": t.forward,
                                "norm": t.forward * n / lr, "data": t.forward * data_n / lr,
                                "rms": rms / lr})  # fmt: skip
        bar.update()
    return records, base_runs


def grad_scale_ratios(setup: ProbeSetup, base_runs: dict[int, tuple], bar: tqdm) -> list[float]:
    """The gradient degree's samples: per seed the base run again with every gradient × s,
    and log(‖Δ_scaled‖/‖Δ‖) per tensor and step (``_log_ratios``)."""
    ratios: list[float] = []
    for s in setup.seeds:
        tensors, base = base_runs[s]
        _, scaled, _ = trajectory(setup, setup.widths[0], setup.depth0, s,
                                  Run(grad_scale=GRAD_SCALE))  # fmt: skip
        bar.update()
        ratios += _log_ratios(tensors, base, scaled)
    return ratios


def eps_deviations(
    setup: ProbeSetup, tensors: Sequence[MeasuredTensor], k: float, bar: tqdm
) -> dict[str, dict[str, float]]:
    """Which scaling of ε keeps update(s·g) = s^k·update(g), at an ε that matters
    (``init_eps``): per role, the deviation from homogeneity (``_deviation``) with ε fixed
    and with ε × s (entry) or × s² (gram), on the first seed's base run."""
    w0, d0, s0 = setup.widths[0], setup.depth0, setup.seeds[0]
    entry0, gram0 = init_eps(setup)
    bar.update()
    devs: dict[str, dict[str, float]] = {}
    for label, eps0, power in (("entry", entry0, 1), ("gram", gram0, 2)):
        _, _, ref = trajectory(setup, w0, d0, s0, Run(eps=eps0, keep=True))
        _, _, fixed = trajectory(setup, w0, d0, s0, Run(eps=eps0, grad_scale=GRAD_SCALE, keep=True))
        _, _, follow = trajectory(
            setup, w0, d0, s0,
            Run(eps=eps0 * GRAD_SCALE**power, grad_scale=GRAD_SCALE, keep=True),
        )  # fmt: skip
        bar.update(3)
        for role in rules.ROLES:
            picked = [t for t in tensors if t.role == role]
            if not picked:
                continue
            want = GRAD_SCALE**k
            d = devs.setdefault(role, {})
            d[f"{label}: ε fixed"] = _deviation(picked, ref, fixed, want)
            d[f"{label}: ε × s^{power}"] = _deviation(picked, ref, follow, want)
    return devs


def decay_and_weight_ratios(
    setup: ProbeSetup, tensors: Sequence[MeasuredTensor], base: list, bar: tqdm
) -> tuple[float, float]:
    """Weight decay and weight following, on matrices at the base width: the decay ratio
    (``_decay_ratio``, λ = 0.1) and ‖ΔW(2W)‖/‖ΔW(W)‖ (median over tensors and steps)."""
    w0, d0, s0 = setup.widths[0], setup.depth0, setup.seeds[0]
    _, _, plain = trajectory(setup, w0, d0, s0, Run(keep=True), first_steps=True)
    _, _, decayed = trajectory(
        setup, w0, d0, s0, Run(weight_decay=0.1, keep=True), first_steps=True
    )
    bar.update()
    decay_ratio = _decay_ratio(tensors, plain, decayed, setup.lr, 0.1)
    _, doubled, _ = trajectory(setup, w0, d0, s0, Run(weight_scale=2.0))
    bar.update()
    matrices = [t for t in tensors if t.role != "vector"]
    weight_ratio = math.exp(statistics.median(_log_ratios(matrices, base, doubled)))
    return decay_ratio, weight_ratio


def _log_ratios(tensors, a, b) -> list[float]:
    """log(‖Δ_b‖/‖Δ_a‖) per tensor and step where both moved."""
    out = []
    for step_a, step_b in zip(a, b, strict=True):
        for t in tensors:
            na, nb = step_a[t.key][0], step_b[t.key][0]
            if na > 0 and nb > 0:
                out.append(math.log(nb / na))
    return out


def _deviation(tensors, ref, other, want: float) -> float:
    """Mean over steps of ‖ΔW_other − want·ΔW_ref‖ / ‖want·ΔW_ref‖ over ``tensors``: 0 when
    the update is homogeneous (a norm-only test misses an ε that only turns the update, as
    under LAMB's trust ratio, which fixes the norm)."""
    out = []
    for a, b in zip(ref, other, strict=True):
        num = den = 0.0
        for t in tensors:
            da, db = a["delta"][t.param], b["delta"][t.param]
            num += float((db - want * da).pow(2).sum())
            den += float((want * da).pow(2).sum())
        if den > 0:
            out.append(math.sqrt(num / den))
    return statistics.fmean(out) if out else 0.0


def _decay_ratio(tensors, plain, decayed, lr: float, lam: float) -> float:
    """Median over matrices of ‖ΔW(λ) − ΔW(0)‖ / (lr·λ·‖W‖) at the first step that moves
    the matrix (before momentum can accumulate the decay term)."""
    out = []
    for t in tensors:
        if t.role == "vector":
            continue
        for a, b in zip(plain, decayed, strict=True):
            if float(a["delta"][t.param].norm()) > 0:
                diff = (b["delta"][t.param] - a["delta"][t.param]).norm()
                out.append(float(diff / (lr * lam * b["before"][t.param].norm())))
                break
    return statistics.median(out) if out else 1.0

"""Derive an optimizer's μP rule by measurement (``smup probe``; RULES.md §2).

μP needs one thing from an optimizer: its update-norm model N, the spectral norm of the
effective update per unit LR as a function of a layer's fans (rules.py). The probe measures
it. It builds the bundled GPT (or any model factory's model) under μP's init and forward
multipliers at several widths and
takes a few real steps with every LR multiplier 1, at a tiny fixed LR and on small batches
(docs/probe.md says why: 1e-6 keeps every width at init, so steps differ only in their
batches; 4 × 32 tokens keep a raw gradient's stable rank from growing with width). Per
tensor and step it records the spectral norm of each update (power iteration; an
embedding's per-token row norm, a vector's ℓ2 norm), its norm on the layer's inputs and its
RMS. The log-log slope of c·‖ΔW‖ against width, per role (input, hidden, output, vector; in
a block or not), over seeds and steps, is the family's width exponent.

Short runs at the base width measure the update's degree k in the gradient scale (every
gradient × s), the eps rule (which scaling of ε — none, s or s² — keeps the update
homogeneous), whether weight decay is torch-style lr·λ·W or sits inside the normalized
direction, and whether the update follows ‖W‖; in-block updates at several depths give k a
second time. Each role's exponents are matched to the nearest known family
(``known_families``); a role that no family fits within ``tolerance`` gets a
``rules.fitted_family``. The result is a ``rules.OptimizerRule`` like the registered ones,
cached as JSON, so that ``build_optimizer("torch.optim.RAdam", …)`` uses it at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import rules
from .errors import ConfigError
from .fileio import atomic_write, write_json
from .optim.probed import (
    FORMAT,
    cache_path,
    cached_rule,
    jsonable,
    known_families,
    load_rule,
    rule_from_json,
    rule_to_json,
)
from .optim.registry import full_options
from .parametrize import Parametrization, canonical_name, smup_attr

__all__ = [
    "FORMAT",
    "GROUPS",
    "ProbeResult",
    "cache_path",
    "cached_rule",
    "derive_rule",
    "full_options",
    "known_families",
    "load_rule",
    "predicted_exponents",
    "probe",
    "rule_from_json",
    "rule_to_json",
    "spectral_norm",
]

_candidates = known_families  # its name before optim.probed

GROUPS = ("input", "hidden", "output", "vector (block)", "vector")
GRAD_SCALE = 8.0  # s in update(s·g) = s^k·update(g)
_TOL_HOMOGENEOUS = 0.02  # relative change of the update below this: homogeneous
_TOL_SENSITIVE = 0.05  # above this: eps changes the update


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


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class _Tensor:
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


def _tensors(model: nn.Module, p: Parametrization) -> list[_Tensor]:
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
                _Tensor(
                    key, name, part, info.role, info.in_block, info.fan_in, rows, c, info.transposed
                )
            )
    return out


def _operator(t: _Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The update of one measured matrix in (fan_out, fan_in) layout."""
    delta = delta.reshape(delta.shape[0], -1)
    if t.transposed:
        delta = delta.T
    return delta[t.rows] if t.rows is not None else delta


def _norm_of(t: _Tensor, delta: torch.Tensor, x: torch.Tensor | None) -> tuple[float, float, float]:
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


@dataclass
class _Run:
    """Knobs of one short trajectory at one size."""

    eps: float | None = None  # the optimizer's ε (absolute; None: its default)
    grad_scale: float = 1.0
    weight_decay: float = 0.0
    weight_scale: float = 1.0  # every matrix × this at init
    keep: bool = False  # keep the updates themselves (weight decay test)
    skip: int = 0  # steps taken before the measured ones (the optimizer's transient)


def _trajectory(
    build: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module, _Run], torch.optim.Optimizer],
    p: Parametrization,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss: Callable,
    hessian: Callable | None,
    run: _Run,
    probe_x: torch.Tensor,
) -> tuple[list[_Tensor], list[dict[str, tuple[float, float, float]]], list[dict[str, Any]]]:
    """Train ``len(batches)`` steps; for each step after the first ``run.skip``, every
    tensor's (norm, norm on the data, RMS) (``_norm_of``, inputs from ``probe_x``) and, with
    ``run.keep``, the updates and the weights they were applied to."""
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
    hessian_every = getattr(opt, "hessian_interval", 0)
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


def _width_exponents(records, widths, metric: str) -> dict[str, list[float]]:
    """Per group: [mean, spread] over (seed, step) of the mean over the group's tensors of
    the log-log slope of ``metric`` against width."""
    by_key: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["axis"] == "width":
            key = (r["seed"], r["step"], r["group"], r["tensor"])
            by_key.setdefault(key, {})[r["width"]] = r[metric]
    samples: dict[str, dict[tuple, list[float]]] = {}
    for (seed, step, group, _), ys in by_key.items():
        if len(ys) == len(widths) and all(v > 0 for v in ys.values()):
            slope = _slope(widths, [ys[w] for w in widths])
            samples.setdefault(group, {}).setdefault((seed, step), []).append(slope)
    out = {}
    for group in GROUPS:
        if group in samples:
            per = [statistics.fmean(v) for v in samples[group].values()]
            out[group] = [statistics.fmean(per), _spread(per)]
    return out


def _keep_input(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        store[name] = args[0].detach()

    return hook


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _spread(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------ result


@dataclass
class ProbeResult:
    """What the probe measured and the rule it derived (``rule``)."""

    optimizer: str
    options: dict[str, Any]
    widths: list[int]
    depths: list[int]
    seeds: list[int]
    steps: int
    lr: float
    exponents: dict[str, list[float]]
    """group → [fitted width exponent of the effective update's norm ‖c·ΔW‖ (``_norm_of``),
    spread over seeds × steps]."""
    data_exponents: dict[str, list[float]]
    """The same for its norm on the data, ‖c·ΔW·X‖/‖X‖."""
    depth_exponents: list[float]
    """[exponent of the in-block raw update norm vs depth (α = 1), spread]: −k predicted."""
    k: list[float]
    """[gradient degree k, spread over tensors and steps]."""
    eps: dict[str, str | None]
    eps_response: dict[str, dict[str, float]]
    decay_ratio: float
    """‖ΔW(λ) − ΔW(0)‖ / (lr·λ·‖W‖): 1 for torch-style decay, else λ is inside the update."""
    weight_ratio: float
    """‖ΔW(2W)‖ / ‖ΔW(W)‖: 2 when the update follows ‖W‖ (LAMB), 1 otherwise."""
    nearest: dict[str, list[Any]]
    """group → [nearest known family, its exponent]."""
    families: dict[str, str]
    """role → the family the rule uses (a known family's name, or "fitted")."""
    rule: rules.OptimizerRule | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    skip: int = 0
    model: str = "gpt"
    """The probed model: a bundled arch, or the factory's name."""

    # ---- output

    def table(self) -> str:
        """Markdown: per group, the fitted exponent ± spread and the nearest known family."""
        lines = [
            f"probe of {self.optimizer} on {self.model} (widths {self.widths}, "
            f"depths {self.depths}, seeds {self.seeds}, {self.steps} steps after {self.skip}, "
            f"lr {self.lr:g}, {self.seconds:.0f} s)",
            "",
            "| group | width exponent of ‖c·ΔW‖/lr | on the data | nearest family | its exponent "
            "| rule uses |",
            "|---|---|---|---|---|---|",
        ]
        for g in GROUPS:
            if g not in self.exponents:
                continue
            (e, s), (fam, fe) = self.exponents[g], self.nearest[g]
            role = "vector" if g.startswith("vector") else g
            se, ss = self.data_exponents.get(g, (math.nan, math.nan))
            lines.append(
                f"| {g} | {e:+.3f} ± {s:.3f} | {se:+.3f} ± {ss:.3f} | {fam} | {fe:+.2f} "
                f"| {self.families[role]} |"
            )
        d, ds = self.depth_exponents
        lines += [
            "",
            f"- gradient degree k = {self.k[0]:.3f} ± {self.k[1]:.3f}"
            + (
                f"; in-block update vs depth (α = 1): {d:+.3f} ± {ds:.3f} (−k)"
                if self.depths
                else ""
            ),
            f"- eps rule: {', '.join(f'{r} {v}' for r, v in self.eps.items())}",
            f"- weight decay: ‖ΔW(λ) − ΔW(0)‖/(lr·λ·‖W‖) = {self.decay_ratio:.3f} → "
            + (
                "inside the direction (λ unchanged)" if self._decay_in() else "lr·λ·W (torch-style)"
            ),
            f"- ‖ΔW(2W)‖/‖ΔW(W)‖ = {self.weight_ratio:.3f} → "
            + ("follows ‖W‖" if self._follows() else "does not follow ‖W‖"),
        ]
        return "\n".join(lines)

    def _decay_in(self) -> bool:
        return not (abs(self.decay_ratio - 1.0) < 0.2)

    def _follows(self) -> bool:
        return abs(self.k[0]) < 0.25 and math.log2(max(self.weight_ratio, 1e-12)) > 0.5

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            **{k: v for k, v in self.__dict__.items() if k not in ("rule", "records")},
        }
        out["options"] = jsonable(self.options)
        out["rule"] = rule_to_json(self.rule) if self.rule is not None else None
        out["records"] = self.records
        return out

    def save_json(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, rederive: bool = False) -> ProbeResult:
        """A saved probe; ``rederive``: derive the rule again from its measurements (after a
        change to the matching, without measuring again)."""
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a probe result (format {FORMAT})")
        names = {f.name for f in fields(cls)} - {"rule"}
        result = cls(**{k: data[k] for k in names if k in data})
        if rederive:
            result.nearest, result.families = {}, {}
            result.rule = derive_rule(result)
        elif data.get("rule"):
            result.rule = rule_from_json(data["rule"])
        return result

    def plot(self, path: str | os.PathLike) -> Path:
        """Update norm vs width per group (seed × step mean), log-log, beside the nearest
        family's slope."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [g for g in GROUPS if g in self.exponents]
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), squeeze=False)
        for ax, g in zip(axes[0], groups, strict=True):
            keys = sorted(
                {r["tensor"] for r in self.records if r["group"] == g and r["axis"] == "width"}
            )
            for key in keys:
                ys = [
                    statistics.fmean(
                        r["norm"] for r in self.records
                        if r["tensor"] == key and r["width"] == w and r["axis"] == "width"
                    )
                    for w in self.widths
                ]  # fmt: skip
                ax.loglog(self.widths, ys, marker="o", lw=1, alpha=0.7)
            e, s = self.exponents[g]
            ax.set_title(
                f"{g}: {e:+.2f} ± {s:.2f}\n"
                f"(nearest {self.nearest[g][0]} {self.nearest[g][1]:+.2f})",
                fontsize=8,
            )
            ax.set_xlabel("width")
            ax.set_xticks(self.widths, [str(w) for w in self.widths], minor=False)
            ax.set_xticks([], minor=True)
        axes[0][0].set_ylabel("‖c·ΔW‖* / lr")
        fig.suptitle(f"smup probe: {self.optimizer}", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        return path


# ---------------------------------------------------------------------- families, rules


def _path_exponent(
    family: rules.UpdateFamily, path: Sequence[_Tensor], widths: Sequence[int]
) -> float:
    """The width exponent a family predicts along one tensor's path (its fans at each width)."""
    ys = [family.norm(t.fan_in, t.fan_out, t.forward, t.role) for t in path]
    return _slope(widths, ys)


def _family_exponents(
    family: rules.UpdateFamily, paths: Mapping[str, list[Sequence[_Tensor]]], widths
) -> dict[str, float]:
    return {
        g: statistics.fmean(_path_exponent(family, path, widths) for path in ps)
        for g, ps in paths.items()
    }


def predicted_exponents(rule: rules.OptimizerRule, result: ProbeResult) -> dict[str, float]:
    """The width exponent of each probed group that ``rule`` predicts along the probe's own
    tensor paths (the probed model's fans at ``result.widths``)."""
    paths = _paths(result.records, result.widths)
    out = {}
    for g, ps in paths.items():
        role = "vector" if g.startswith("vector") else g
        out[g] = statistics.fmean(
            _path_exponent(rule.family(role), path, result.widths) for path in ps
        )
    return out


def _paths(
    records: Sequence[Mapping[str, Any]], widths: Sequence[int]
) -> dict[str, list[list[_Tensor]]]:
    """Per group, each measured tensor's shapes across widths, read from the probe's own
    records (so any probed model, bundled or not, gives its own fans)."""
    first = {}
    for r in records:
        if r["axis"] == "width":
            first.setdefault((r["tensor"], r["width"]), r)
    paths: dict[str, list[list[_Tensor]]] = {}
    for key in dict.fromkeys(k for k, w in first if w == widths[0]):
        if not all((key, w) in first for w in widths):
            continue  # a tensor not present at every width has no path
        path = []
        for w in widths:
            r = first[(key, w)]
            role = "vector" if r["group"].startswith("vector") else r["group"]
            path.append(_Tensor(key, key, None, role, r["in_block"], r["fan_in"], r["fan_out"],
                                r["forward"], False))  # fmt: skip
        paths.setdefault(path[0].group, []).append(path)
    return paths


# ------------------------------------------------------------------------------- probe


def probe(
    optimizer: str | type[torch.optim.Optimizer],
    *,
    options: Mapping[str, Any] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    depths: Sequence[int] = (2, 4, 8),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 5,
    skip: int = 5,
    lr: float = 1e-6,
    arch: str = "gpt",
    n_heads: int = 2,
    batch_size: int = 4,
    block_size: int = 32,
    data: str | None = None,
    model: Callable[[int, int, Parametrization], nn.Module] | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    hessian: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None = None,
    spectral_normalize: bool = False,
    tolerance: float = 0.2,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> ProbeResult:
    """Measure ``optimizer``'s update-norm model and derive its μP rule (module docstring).

    ``optimizer``: a registered name, an import path (``"torch.optim.RAdam"``) or an optimizer
    class; ``options``: its keyword options (defaults: its own). The model is the bundled
    ``arch`` at ``widths`` (heads fixed at ``n_heads``; depth ``depths[0]``) on ``data``
    (Tiny Shakespeare by default), in ``dtype``; ``depths`` at the base width measure the
    in-block depth response (empty: skip).

    Any other model: ``model(width, depth, p)`` returns it built at that size with roles for
    the μP Parametrization ``p`` (a bundled model, or ``spectral_mup.parametrize(m, p,
    base=...)`` against the model at ``p.base_width``, which is ``widths[0]``); ``batches``
    (at least ``skip + steps`` of them; default: Tiny Shakespeare tokens) are its training
    batches, the first one's inputs also the probe batch, and ``loss(model, x, y)`` its loss
    (default: cross-entropy on the logits). ``hessian(model, opt, x)`` refreshes the
    curvature estimate of an optimizer that keeps one (default: ``train.update_hessian``,
    for a language model). ``steps`` steps are measured after ``skip`` steps
    of the optimizer's transient (bias corrections; RAdam is SGD with momentum for its first
    five). Roles whose exponent is farther than ``tolerance`` from every known family get a
    fitted family.
    """
    import time

    from .data import load_dataset
    from .models import build_model, config_class
    from .optim import build_optimizer, get_spec, optimizer_key
    from .train import loss_fn, update_hessian

    start = time.perf_counter()
    name = (
        optimizer
        if isinstance(optimizer, str)
        else f"{optimizer.__module__}.{optimizer.__qualname__}"
    )
    spec = get_spec(name)
    name = optimizer_key(name)
    registered = name in rules.OPTIMIZER_RULES
    options = dict(options or {})
    if "eps" in options and spec.eps_key not in (None, "eps"):
        options[spec.eps_key] = options.pop("eps")
    unknown = sorted(set(options) - set(spec.defaults) - {spec.eps_key})
    if unknown:
        raise ConfigError(
            f"{name} has no option(s) {', '.join(unknown)}; its options: {', '.join(spec.defaults)}"
        )
    if len(set(widths)) < 2 or any(int(w) <= 0 for w in widths):
        raise ConfigError(
            f"the probe needs at least two different positive widths, got {list(widths)}"
        )
    if steps < 2 or skip < 0 or not lr > 0:
        raise ConfigError(
            f"the probe needs steps >= 2, skip >= 0 and lr > 0; got {steps}, {skip}, {lr}"
        )
    widths, depths = sorted(set(int(w) for w in widths)), sorted(set(int(d) for d in depths))
    if len(depths) == 1:
        depths = []
    depth0 = depths[0] if depths else 2
    run_options = {**options}
    if "hessian_interval" in spec.defaults:  # Sophia: refresh the estimate every step
        run_options.setdefault("hessian_interval", 1)
    aux_roles = rules.rule_for(name).auxiliary if registered else ()
    if "adam_lr" in spec.defaults:  # the AdamW part moves at the same unit LR
        run_options["adam_lr"] = lr
    # every LR multiplier 1 under μP's init and forward multipliers: N = sqrt(fo/fi) for all
    unit = rules.OptimizerRule(
        "probe", {"*": rules.FAMILIES["spectral_normalized"]}, eps=None, auxiliary=aux_roles
    )

    def make_optimizer(model: nn.Module, run: _Run, p: Parametrization) -> torch.optim.Optimizer:
        kw = dict(run_options)
        if run.eps is not None:
            kw["eps"] = run.eps
        if "adam_weight_decay" in spec.defaults:
            kw["adam_weight_decay"] = run.weight_decay
        return build_optimizer(name, model, p, lr, run.weight_decay, rule=unit,
                               spectral_normalize=spectral_normalize, **kw)  # fmt: skip

    loss = loss or loss_fn
    hessian = hessian or update_hessian
    if batches is not None:  # floating inputs in the probe's dtype
        batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
        if len(batches) < skip + steps:
            raise ConfigError(
                f"the probe takes {skip + steps} steps (skip + steps) but got {len(batches)} "
                "batches; pass more or lower steps/skip"
            )
        probe_x = batches[0][0]

        def batches_for(seed: int) -> list:
            return batches

    else:
        dataset = load_dataset(data)
        gen = torch.Generator().manual_seed(7)
        probe_x = dataset.get_batch("val", batch_size, block_size, gen)[0]

        def batches_for(seed: int) -> list:
            gen = torch.Generator().manual_seed(1000 + seed)
            return [
                dataset.get_batch("train", batch_size, block_size, gen) for _ in range(skip + steps)
            ]

    if model is None:
        config_cls = config_class(arch)
        if batches is None:
            vocab = dataset.vocab_size
        else:
            vocab = 1 + max(int(t.max()) for b in batches for t in b)

        def model(width: int, depth: int, p: Parametrization) -> nn.Module:
            cfg = config_cls(width=width, depth=depth, n_heads=n_heads, vocab_size=vocab,
                             block_size=block_size)  # fmt: skip
            return build_model(cfg, p)

        model_name = arch
    else:
        model_name = getattr(model, "__qualname__", type(model).__name__)
    factory = model

    def builder(width: int, depth: int, p: Parametrization, seed: int) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            torch.manual_seed(seed)
            built = factory(width, depth, p)
            if smup_attr(built, "smup_roles") is None:
                raise ConfigError(
                    f"the probe's model {model_name} returned a model without roles: build it "
                    "with the Parametrization it is given, or call spectral_mup.parametrize("
                    "model, p, base=...) on it"
                )
            return built.to(dtype)

        return build

    def trajectory(width, depth, seed, run, base_depth=None, first_steps=False):
        # measure after the optimizer's transient; the decay test: its first steps
        run = replace(run, skip=0 if first_steps else skip)
        p = Parametrization(kind="mup", base_width=widths[0], base_depth=base_depth or depth0,
                            depth_alpha=1.0)  # fmt: skip
        with _default_dtype(dtype):
            build = builder(width, depth, p, seed)
            run_batches = batches_for(seed)[: run.skip + steps]
            return _trajectory(build, lambda m, r: make_optimizer(m, r, p), p,
                               run_batches, loss, hessian, run, probe_x)  # fmt: skip

    def init_eps() -> tuple[float, float]:
        """ε values that matter at init: the median over matrices of RMS(G) (compared with
        gradient entries) and of ‖G‖_F²/min(fans) (compared with the eigenvalues of G·Gᵀ)."""
        p = Parametrization(kind="mup", base_width=widths[0], base_depth=depth0)
        with _default_dtype(dtype):
            net = builder(widths[0], depth0, p, seeds[0])()
            loss(net, *batches_for(seeds[0])[0]).backward()
        grads = [q.grad for q in net.parameters() if q.ndim >= 2 and q.grad is not None]
        entry = statistics.median(float(g.pow(2).mean().sqrt()) for g in grads)
        gram = statistics.median(float(g.pow(2).sum()) / min(g.shape) for g in grads)
        return entry, gram

    work = [("width", w, depth0, s) for s in seeds for w in widths]
    work += [("depth", widths[0], d, s) for s in seeds for d in depths[1:]]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(work) + 3 * len(seeds) + 7, desc="probe", disable=not progress or None)
    base_runs: dict[int, tuple] = {}
    for axis, w, d, s in work:
        tensors, norms, _ = trajectory(w, d, s, _Run())
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

    exponents = _width_exponents(records, widths, "norm")
    data_exponents = _width_exponents(records, widths, "data")
    if not exponents:
        raise ConfigError(
            f"{name} made no nonzero update in {steps} steps at lr {lr:g}; raise --steps or --lr"
        )

    # ---- depth: raw in-block matrix updates at the base width vs depth (branch a = m_L^-1)
    depth_exponents = [0.0, 0.0]
    if depths:
        per = []
        keyed: dict[tuple, dict[int, float]] = {}
        for r in records:
            if r["width"] == widths[0] and r["in_block"] and r["group"] == "hidden":
                base_key = r["tensor"].split(".", 2)[-1]  # blocks.<i>.<rest>: pool the blocks
                keyed.setdefault((r["seed"], r["step"], base_key, r["tensor"].split(".")[1]), {})[
                    r["depth"]
                ] = r["norm"]
        pooled: dict[tuple, dict[int, list[float]]] = {}
        for (seed, step, base_key, _), ys in keyed.items():
            for dd, v in ys.items():
                pooled.setdefault((seed, step, base_key), {}).setdefault(dd, []).append(v)
        by_sample: dict[tuple, list[float]] = {}
        for (seed, step, _), ys in pooled.items():
            if len(ys) == len(depths) and all(min(v) > 0 for v in ys.values()):
                means = [statistics.fmean(ys[dd]) for dd in depths]
                by_sample.setdefault((seed, step), []).append(_slope(depths, means))
        per = [statistics.fmean(v) for v in by_sample.values()]
        if per:
            depth_exponents = [statistics.fmean(per), _spread(per)]

    # ---- gradient degree k: the same trajectories with every gradient × s
    ratios: list[float] = []
    for s in seeds:
        tensors, base = base_runs[s]
        _, scaled, _ = trajectory(widths[0], depth0, s, _Run(grad_scale=GRAD_SCALE))
        bar.update()
        ratios += _log_ratios(tensors, base, scaled)
    k = [statistics.fmean(ratios) / math.log(GRAD_SCALE), _spread(ratios) / math.log(GRAD_SCALE)]

    # ---- eps: which scaling of ε keeps update(s·g) = s^k·update(g), at an ε that matters
    s0 = seeds[0]
    tensors, base = base_runs[s0]
    eps_rule: dict[str, str | None] = {}
    eps_response: dict[str, dict[str, float]] = {}
    if spec.eps_key is not None:
        entry0, gram0 = init_eps()
        bar.update()
        devs: dict[str, dict[str, float]] = {}
        for label, eps0, power in (("entry", entry0, 1), ("gram", gram0, 2)):
            _, _, ref = trajectory(widths[0], depth0, s0, _Run(eps=eps0, keep=True))
            _, _, fixed = trajectory(
                widths[0], depth0, s0, _Run(eps=eps0, grad_scale=GRAD_SCALE, keep=True)
            )
            _, _, follow = trajectory(
                widths[0], depth0, s0,
                _Run(eps=eps0 * GRAD_SCALE**power, grad_scale=GRAD_SCALE, keep=True),
            )  # fmt: skip
            bar.update(3)
            for role in rules.ROLES:
                picked = [t for t in tensors if t.role == role]
                if not picked:
                    continue
                want = GRAD_SCALE ** k[0]
                d = devs.setdefault(role, {})
                d[f"{label}: ε fixed"] = _deviation(picked, ref, fixed, want)
                d[f"{label}: ε × s^{power}"] = _deviation(picked, ref, follow, want)
        for role, d in devs.items():
            eps_response[role] = d
            eps_rule[role] = _eps_verdict(d)
    else:
        eps_rule = {role: None for role in rules.ROLES}
        bar.update(7)

    # ---- weight decay and weight following, on matrices at the base width
    _, _, plain = trajectory(widths[0], depth0, s0, _Run(keep=True), first_steps=True)
    _, _, decayed = trajectory(
        widths[0], depth0, s0, _Run(weight_decay=0.1, keep=True), first_steps=True
    )
    bar.update()
    decay_ratio = _decay_ratio(tensors, plain, decayed, lr, 0.1)
    _, doubled, _ = trajectory(widths[0], depth0, s0, _Run(weight_scale=2.0))
    bar.update()
    matrices = [t for t in tensors if t.role != "vector"]
    weight_ratio = math.exp(statistics.median(_log_ratios(matrices, base, doubled)))
    bar.close()

    result = ProbeResult(
        name, jsonable(options), widths, depths, list(seeds), steps, lr, exponents,
        data_exponents, depth_exponents, k, eps_rule, eps_response, decay_ratio,
        weight_ratio, {}, {},
        records=records, model=model_name,
    )  # fmt: skip
    result.rule = derive_rule(result, tolerance=tolerance)
    result.seconds, result.skip = time.perf_counter() - start, skip
    return result


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


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


def _eps_verdict(d: Mapping[str, float]) -> str | None:
    """An eps rule from the deviations from homogeneity: the scaling that restores it where
    a fixed ε breaks it; None when ε does not change the update."""
    for label, power in (("entry", 1), ("gram", 2)):
        fixed, follow = d[f"{label}: ε fixed"], d[f"{label}: ε × s^{power}"]
        if fixed > _TOL_SENSITIVE and follow < _TOL_HOMOGENEOUS:
            return label
    if max(d[f"{label}: ε fixed"] for label in ("entry", "gram")) <= _TOL_SENSITIVE:
        return None
    # ε matters but neither scaling restores homogeneity exactly: the closer one
    return min(("entry", "gram"), key=lambda lab: d[f"{lab}: ε × s^{1 if lab == 'entry' else 2}"])


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


def derive_rule(result: ProbeResult, *, tolerance: float = 0.2) -> rules.OptimizerRule:
    """The rule the measurements imply: per role the nearest known family of the same
    gradient degree k when its exponents are within ``tolerance`` (ties: the first in
    ``known_families`` — equal exponents give equal LR rules), else a fitted family; the
    measured weight-decay and ‖W‖ behaviour replace the family's. A registered optimizer
    keeps its auxiliary roles (Muon's AdamW part). Fills ``result.nearest`` and
    ``result.families``."""
    registered = result.optimizer in rules.OPTIMIZER_RULES
    aux_roles = rules.rule_for(result.optimizer).auxiliary if registered else ()
    paths = _paths(result.records, result.widths)
    k = result.k[0]
    cands = known_families(result.optimizer, result.options)
    order = list(cands)
    predicted = {n: _family_exponents(f, paths, result.widths) for n, f in cands.items()}
    measured = {g: e for g, (e, _) in result.exponents.items()}
    same_k = [n for n in order if abs(cands[n].grad_degree - k) <= 0.25] or order

    def groups_of(role: str) -> list[str]:
        return [g for g in measured if (g.startswith("vector") if role == "vector" else g == role)]

    def dist(n: str, gs: Sequence[str]) -> float:
        return round(max(abs(predicted[n][g] - measured[g]) for g in gs), 2)  # ties: order

    for g in measured:
        best = min(same_k, key=lambda n: (dist(n, [g]), order.index(n)))
        result.nearest[g] = [best, predicted[best][g]]
    flags = {"decay_in_direction": result._decay_in(), "follows_weight": result._follows()}
    entries: dict[str, dict[str, Any]] = {}
    fitted_exp: dict[str, float] = {}
    for r in rules.ROLES:
        gs = groups_of(r)
        if not gs:
            entries[r] = {"known": "entrywise"}  # no such tensor in the probe model
            continue
        e = statistics.fmean(measured[g] for g in gs)
        # the raw update's exponent in the growing fan: remove c^(1+k) (c = 1/m on the readout)
        fitted_exp[r] = e + (1.0 + k) if r == "output" else e
        fits = [n for n in same_k if dist(n, gs) <= tolerance]
        if fits:
            best = min(fits, key=lambda n: (dist(n, gs), order.index(n)))
            entries[r] = {"known": best, **(flags if r != "vector" else {})}
    fitted = {
        "exponents": {r: fitted_exp.get(r, 0.0) for r in rules.ROLES}, "k": k,
        "eps_follows_grad": any(v == "entry" for v in result.eps.values()), **flags,
    }  # fmt: skip
    for r in rules.ROLES:
        entries.setdefault(r, {"fitted": fitted})
        result.families[r] = entries[r].get("known", "fitted")
    data = {
        "name": result.optimizer,
        "families": entries,
        "eps": {r: result.eps.get(r) for r in rules.ROLES},
        "auxiliary": list(aux_roles),
        "options": result.options,
        "source": f"smup probe (widths {result.widths}, seeds {result.seeds})",
    }
    return rule_from_json(data)

"""Transfer statistics of a study: best LR per size (argmin and sub-grid fit), drift in grid
steps, the transferred LR, "wider better"; SP/μP pairs and their comparison rows."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from .data import Cell, Study, StudyKey, common_seeds, paired_argmin

# ----------------------------------------------------------------------------- transfer


@dataclass
class Transfer:
    """The transfer summary of one study (module docstring); sizes are widths or depths."""

    study: str
    key: StudyKey
    sizes: list[int]
    best_lr: dict[int, float | None]  # argmin of the seed-mean
    best_loss: dict[int, float]  # seed-mean at best_lr (NaN when none)
    best_std: dict[int, float]  # seed std at best_lr
    best_n: dict[int, int]  # seeds at best_lr
    at_edge: dict[int, bool]  # best_lr is the smallest or largest LR of the grid
    fit_lr: dict[int, float | None]  # sub-grid optimum (parabola in log2 lr)
    grid_step: float | None  # log2
    drift_steps: float | None  # argmin optimum, in grid steps
    fit_drift_steps: float | None  # sub-grid optimum, in grid steps
    transferred_lr: float | None  # best LR of the narrowest size
    loss_at_transferred: dict[int, float]  # +inf where the cell is not ok, NaN where missing
    wider_better: bool | None
    wider_better_decided: bool | None  # the same by a paired t-test (``lower``); None: undecided
    monotone: bool | None
    min_seeds: int  # fewest ok seeds in the best cell of a size
    # per size: (loss gap from the best LR to its better neighbouring LR, standard error of
    # that gap from the two cells' seed spreads, and from the spread of the per-seed gaps);
    # None without a neighbour or with < 2 shared seeds
    noise: dict[int, tuple[float, float, float] | None] = field(default_factory=dict)
    # per size: is the optimum decided to lie within one grid step of the transferred LR?
    # True / False (a far LR decided better) / None (undecided): ``decided``
    decided: dict[int, bool | None] = field(default_factory=dict)

    def within_noise(self, paired: bool = False) -> list[int]:
        """The sizes whose argmin is less than 2 standard errors better than a neighbour
        (``paired``: the standard error of the per-seed gaps)."""
        i = 2 if paired else 1
        return [s for s, g in self.noise.items() if g is not None and g[0] < 2 * g[i]]

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        def per(d: dict[int, Any]) -> dict[str, Any]:
            return {str(k): num(v) if isinstance(v, float) else v for k, v in d.items()}

        return {
            "study": self.study,
            "sweep": self.key.sweep,
            "arch": self.key.arch,
            "optimizer": self.key.optimizer,
            "param": self.key.param,
            "depth_alpha": self.key.depth_alpha,
            "weight_decay": self.key.weight_decay,
            "hps": dict(self.key.hps),
            "axis": self.key.axis,
            "fixed": {self.key.other: self.key.fixed},
            "sizes": self.sizes,
            "best_lr": per(self.best_lr),
            "best_loss": per(self.best_loss),
            "best_std": per(self.best_std),
            "best_n": per(self.best_n),
            "at_edge": per(self.at_edge),
            "fit_lr": per(self.fit_lr),
            "grid_step_log2": self.grid_step,
            "drift_steps": self.drift_steps,
            "fit_drift_steps": self.fit_drift_steps,
            "transferred_lr": self.transferred_lr,
            "loss_at_transferred": {
                str(k): ("div/fail" if v == math.inf else num(v))
                for k, v in self.loss_at_transferred.items()
            },
            "wider_better": self.wider_better,
            "wider_better_decided": self.wider_better_decided,
            "monotone": self.monotone,
            "min_seeds": self.min_seeds,
            "noise": {
                str(k): None if v is None else {"gap": v[0], "se": v[1], "paired_se": v[2]}
                for k, v in self.noise.items()
            },
            "decided_within_one_step": per(self.decided),
        }


def fit_optimum(column: Sequence[tuple[float, float]], best: float) -> float:
    """Sub-grid optimum: vertex of the parabola through (log2 lr, loss) at the argmin
    ``best`` and its two neighbours in ``column`` ((lr, loss) pairs, LR ascending); the
    argmin itself at the grid edge, next to a non-finite loss, or without curvature."""
    lrs = [lr for lr, _ in column]
    i = lrs.index(best)
    if i == 0 or i == len(column) - 1:
        return best
    pts = column[i - 1 : i + 2]
    if not all(math.isfinite(v) for _, v in pts):
        return best
    x = np.log2([lr for lr, _ in pts])
    a, b, _ = np.polyfit(x, [v for _, v in pts], 2)
    if a <= 0:
        return best
    return float(2.0 ** float(np.clip(-b / (2 * a), x[0], x[2])))


def _drift(lrs: Iterable[float | None], step: float | None) -> float | None:
    logs = [math.log2(lr) for lr in lrs if lr is not None]
    if step is None or len(logs) < 2:
        return None
    return (max(logs) - min(logs)) / step


def _neighbours(study: Study, size: int, lr: float) -> tuple[list[Cell], set[int] | None]:
    """The cells at ``lr`` and its neighbouring LRs in the column (LR ascending), and the
    seeds the ``ok`` ones among them share (they are compared on those: Study.best_lr)."""
    lrs = [c[0] for c in study.column(size)]
    i = lrs.index(lr)
    cells = [study.cells[lrs[j], size] for j in (i - 1, i, i + 1) if 0 <= j < len(lrs)]
    return cells, common_seeds(c for c in cells if c.status == "ok")


def _fit(study: Study, size: int, lr: float) -> float:
    """fit_optimum through the argmin and its neighbours, on the seeds the three share."""
    cells, seeds = _neighbours(study, size, lr)
    column = [(c.lr, float(np.mean(c.on(seeds))) if c.status == "ok" else math.inf)
              for c in cells]  # fmt: skip
    return fit_optimum(column, lr)


def _noise(study: Study, size: int, lr: float | None) -> tuple[float, float, float] | None:
    """(gap, its standard error, its paired standard error) between the best cell of a
    column and the better of its neighbouring LRs, on the seeds the two share; None without
    an ``ok`` neighbour or with fewer than 2 shared seeds. The first standard error treats
    the two cells' seeds as independent samples; the paired one is the spread of the
    per-seed gaps, which leaves out what a seed does to every LR alike (with 2 seeds it
    rests on one degree of freedom)."""
    if lr is None:
        return None
    cells, _ = _neighbours(study, size, lr)
    best = study.cells[lr, size]
    near = []  # (gap, shared seeds' losses of the best and of the neighbour)
    for c in cells:
        seeds = common_seeds((best, c))
        if c is not best and c.status == "ok" and seeds is not None:
            a, b = best.on(seeds), c.on(seeds)
            near.append((float(np.mean(b) - np.mean(a)), a, b))
    if not near:
        return None
    gap, a, b = min(near, key=lambda g: g[0])
    if len(a) < 2:
        return None
    n = len(a)
    diffs = np.subtract(b, a)
    se = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / n)
    return gap, se, paired_se(diffs)


def paired_se(diffs: Sequence[float]) -> float:
    """Standard error of the mean of per-seed loss gaps (≥ 2 of them)."""
    return float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > ½) of Student's t with ``df`` degrees of freedom: the CDF by
    Simpson's rule on the density, inverted by bisection (no SciPy here); ~1e-6 accurate."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs ½ < p < 1 and df ≥ 1, got p={p}, df={df}")
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        u = np.linspace(0.0, x, 4001)
        f = np.exp(c - (df + 1) / 2 * np.log1p(u * u / df))
        h = x / 4000
        return 0.5 + h / 3 * float(f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def lower(a: Cell, b: Cell) -> bool | None:
    """Whether ``ok`` cell ``a``'s loss is below ``b``'s by a one-sided 95% paired t-test
    on the seeds the two share (a seed moves every cell's loss alike): True, False (``b``'s
    is decided lower) or None (undecided, or fewer than 2 shared seeds)."""
    seeds = common_seeds((a, b))
    if seeds is None or len(seeds) < 2:
        return None
    diffs = np.subtract(b.on(seeds), a.on(seeds))
    bound = t_quantile(0.95, len(diffs) - 1) * paired_se(diffs)
    gap = float(np.mean(diffs))
    return True if gap > bound else False if gap < -bound else None


def decided(study: Study, size: int, t_lr: float | None, step: float | None) -> bool | None:
    """Whether the optimum at ``size`` is decided to lie within one grid step of the
    transferred LR ``t_lr``: True when the best of the ``ok`` cells within one step
    (``paired_argmin``) is ``lower`` than both LRs two steps away (a far LR that diverged
    counts as beaten); False when a far LR is lower (or every run within one step diverged);
    None otherwise — undecided: a far LR outside the grid, not yet run or failed, fewer
    than 2 shared seeds, or a gap within the bound. Assumes the loss is unimodal in log LR,
    so the LRs two steps away stand for all farther ones."""
    if t_lr is None or step is None:
        return None
    at = {round(math.log2(lr) / step): lr for lr in study.lrs}
    k = round(math.log2(t_lr) / step)
    near = [study.cell(at[j], size) for j in (k - 1, k, k + 1) if j in at]
    ok = [c for c in near if c is not None and c.status == "ok"]
    best_lr = paired_argmin({c.lr: dict(zip(c.seeds, c.losses, strict=True)) for c in ok})
    verdicts = []
    for j in (k - 2, k + 2):
        far = study.cell(at[j], size) if j in at else None
        if far is None:
            verdicts.append(None)
        elif far.status != "ok":
            verdicts.append(True if far.status == "div" else None)
        elif best_lr is None:  # every run within one step diverged (False) or failed
            verdicts.append(False if near and all(c and c.status == "div" for c in near) else None)
        else:
            verdicts.append(lower(study.cells[best_lr, size], far))
    if False in verdicts:
        return False
    return None if None in verdicts else True


def transfer_summary(study: Study) -> Transfer:
    """Best LR per size, drift in grid steps, the transferred LR and the wider-is-better
    checks of one study (module docstring)."""
    best_lr, best_loss, best_std, best_n, at_edge, fit_lr = {}, {}, {}, {}, {}, {}
    lo, hi = min(study.lrs), max(study.lrs)
    for size in study.sizes:
        lr = study.best_lr(size)
        best_lr[size] = lr
        cell = study.cell(lr, size) if lr is not None else None
        best_loss[size] = cell.mean if cell else math.nan
        best_std[size] = cell.std if cell else math.nan
        best_n[size] = len(cell.losses) if cell else 0
        at_edge[size] = lr is not None and len(study.lrs) > 1 and lr in (lo, hi)
        fit_lr[size] = _fit(study, size, lr) if lr is not None else None
    step = study.grid_step()
    narrow, wide = study.sizes[0], study.sizes[-1]
    t_lr = best_lr[narrow]
    loss_at: dict[int, float] = {}
    wider = monotone = wider_decided = None
    if t_lr is not None:
        for size in study.sizes:
            cell = study.cell(t_lr, size)
            loss_at[size] = cell.value if cell else math.nan
        if len(study.sizes) > 1:
            wider = bool(loss_at[wide] < loss_at[narrow])
            far = study.cell(t_lr, wide)
            if far is not None and far.status != "fail":
                ok = far.status == "ok"
                wider_decided = lower(far, study.cells[t_lr, narrow]) if ok else False
            seq = [v for v in loss_at.values() if not math.isnan(v)]
            monotone = all(b < a for a, b in pairwise(seq))
    return Transfer(
        study=study.key.label(),
        key=study.key,
        sizes=list(study.sizes),
        best_lr=best_lr,
        best_loss=best_loss,
        best_std=best_std,
        best_n=best_n,
        at_edge=at_edge,
        fit_lr=fit_lr,
        grid_step=step,
        drift_steps=_drift(best_lr.values(), step),
        fit_drift_steps=_drift(fit_lr.values(), step),
        transferred_lr=t_lr,
        loss_at_transferred=loss_at,
        wider_better=wider,
        wider_better_decided=wider_decided,
        monotone=monotone,
        min_seeds=min((n for n in best_n.values() if n), default=0),
        noise={size: _noise(study, size, best_lr[size]) for size in study.sizes},
        decided={size: decided(study, size, t_lr, step) for size in study.sizes},
    )


@dataclass
class Pair:
    """The SP and μP studies of one (sweep, model, optimizer, α, weight decay, axis, fixed
    size)."""

    sp: Study | None
    mup: Study | None

    @property
    def key(self) -> StudyKey:
        return (self.mup or self.sp).key  # type: ignore[union-attr]

    def studies(self) -> list[Study]:
        return [s for s in (self.sp, self.mup) if s is not None]


def pair_studies(studies: Sequence[Study]) -> list[Pair]:
    """Match each μP study with the SP study of the same sweep, optimizer, weight decay,
    other swept HPs, axis and fixed size: the one with the same α, else the only one (SP
    ignores α)."""
    by: dict[tuple[Any, ...], dict[str, list[Study]]] = defaultdict(lambda: defaultdict(list))
    for s in studies:
        k = s.key
        by[k.sweep, k.arch, k.optimizer, k.weight_decay, k.hps, k.axis, k.fixed][k.param].append(s)
    pairs = []
    for group in by.values():
        sps, used = group.get("sp", []), set()
        for mup in group.get("mup", []):
            same = [s for s in sps if s.key.depth_alpha == mup.key.depth_alpha]
            sp = same[0] if same else (sps[0] if len(sps) == 1 else None)
            if sp is not None:
                used.add(id(sp))
            pairs.append(Pair(sp, mup))
        pairs += [Pair(sp, None) for sp in sps if id(sp) not in used]
        pairs += [Pair(None, s) for p, ss in group.items() if p not in ("sp", "mup") for s in ss]
    return pairs


def comparison(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """One row per pair: drift (argmin and fitted) and wider-better, SP vs μP."""
    rows = []
    for pair in pairs:
        k = pair.key
        row: dict[str, Any] = {
            "sweep": k.sweep,
            "arch": k.arch,
            "optimizer": k.optimizer,
            "axis": k.axis,
            "fixed": f"{k.other} {k.fixed}",
            "depth_alpha": k.depth_alpha,
            "weight_decay": k.weight_decay,
            "hps": dict(k.hps),
        }
        for name, study in (("sp", pair.sp), ("mup", pair.mup)):
            t = transfer_summary(study) if study else None
            row[f"drift_{name}"] = t.drift_steps if t else None
            row[f"fit_drift_{name}"] = t.fit_drift_steps if t else None
            row[f"wider_better_{name}"] = t.wider_better if t else None
            row[f"monotone_{name}"] = t.monotone if t else None
        rows.append(row)
    return rows

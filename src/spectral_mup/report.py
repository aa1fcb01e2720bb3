"""LR-sweep report: the seed paper's tables and figures from a sweep's run store.

A *study* is one learning-rate sweep along one axis: the runs of one (sweep, model
architecture, optimizer, parametrization, depth α, weight decay) that vary in width at a
fixed depth (axis ``"width"``) or in depth at a fixed width (axis ``"depth"``). Its table
has the layout of the seed paper's Tables 5–20: one row per learning rate (descending, as in
the paper), one column per width (or depth), each cell the seed-mean of the best validation
loss, the best cell of each column marked. Its figure is the paper's Fig. 1: validation loss
against LR, one curve per width, SP and μP side by side.

Cells, over the seeds of one (LR, size):

- ``ok``: every seed that did not fail has a finite best val loss; the cell holds the mean
  and the sample standard deviation (ddof 1; NaN for one seed) over those seeds;
- ``div``: at least one seed diverged (status ``diverged``, or ``ok`` with a non-finite
  loss). An LR at which some seed blows up is not a usable LR, so the whole cell counts
  as diverged and never wins a column; the table shows ``div`` (all seeds) or ``div k/n``;
- ``fail``: every seed failed (a crash, not a result). Failed seeds next to good ones are
  left out of the mean, and the cell shows its seed count ``(n=k)``.

Transfer summary of a study (DESIGN.md, "Reading an LR sweep honestly"):

- best LR per size: argmin over LRs of the seed-mean (``ok`` cells only); and a sub-grid
  optimum, the vertex of the parabola through the seed-means at the argmin and its two
  neighbours in log2(lr) (the argmin itself when it sits at the grid edge or a neighbour
  is not ``ok``);
- grid step: the smallest log2 spacing between the study's LRs;
- drift: (max − min of log2(best LR)) / grid step, "drift in grid steps", on both optima;
- transferred LR: the best LR of the narrowest size (the proxy);
- wider better: loss(widest, transferred LR) < loss(narrowest, transferred LR), and
  monotone: the loss at the transferred LR falls strictly with every size step (a
  non-``ok`` cell counts as +inf; for the depth axis read "deeper" for "wider").

Outputs of :func:`write_report` (all written atomically, and only after everything has
been computed): ``report.md``, ``tables.csv`` (long format, :data:`CSV_COLUMNS`),
``summary.json`` and one ``lr_*.png`` per SP/μP pair of studies.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmupError
from .fileio import atomic_write, write_json

AXES = ("width", "depth")
CSV_COLUMNS = (
    "sweep",
    "optimizer",
    "param",
    "depth_alpha",
    "weight_decay",
    "axis",
    "width",
    "depth",
    "lr",
    "status",
    "n_seeds",
    "n_ok",
    "n_diverged",
    "n_failed",
    "mean_best_val_loss",
    "std_best_val_loss",
    "min_best_val_loss",
    "max_best_val_loss",
    "best_in_column",
    "arch",
)
PARAM_LABEL = {"sp": "SP", "mup": "μP"}


class ReportError(SmupError):
    """The store holds nothing a report can be made of."""


# ----------------------------------------------------------------------------- data


def _lr_key(lr: float) -> float:
    """LRs read back from a store compare equal up to float noise in the 12th digit."""
    return float(f"{float(lr):.12g}")


@dataclass(frozen=True)
class StudyKey:
    sweep: str
    optimizer: str
    param: str  # sp | mup
    depth_alpha: float | None
    weight_decay: float
    axis: str  # width | depth
    fixed: int  # the depth of a width study, the width of a depth study
    arch: str = "gpt"  # the bundled model (config model.arch): never mixed in one study

    @property
    def other(self) -> str:
        return "depth" if self.axis == "width" else "width"

    def label(self, param: bool = True) -> str:
        """E.g. ``s1: adamw μP, α=1, wd=0, width sweep at depth 2`` (``param=False``: no μP)."""
        name = f" {PARAM_LABEL.get(self.param, self.param)}" if param else ""
        alpha = "" if self.depth_alpha is None else f", α={self.depth_alpha:g}"
        arch = "" if self.arch == "gpt" else f"{self.arch} "
        return (
            f"{self.sweep}: {arch}{self.optimizer}{name}{alpha}, wd={self.weight_decay:g}, "
            f"{self.axis} sweep at {self.other} {self.fixed}"
        )


@dataclass
class Cell:
    """The runs of one (LR, size) of a study."""

    lr: float
    size: int
    losses: list[float] = field(default_factory=list)  # best val loss of the ok seeds
    seeds: list[int] = field(default_factory=list)  # seeds of ``losses``
    n_diverged: int = 0
    n_failed: int = 0

    @property
    def n_seeds(self) -> int:
        return len(self.losses) + self.n_diverged + self.n_failed

    @property
    def status(self) -> str:
        if self.n_diverged:
            return "div"
        return "ok" if self.losses else "fail"

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses)) if self.status == "ok" else math.nan

    @property
    def std(self) -> float:
        ok = self.status == "ok" and len(self.losses) > 1
        return float(np.std(self.losses, ddof=1)) if ok else math.nan

    @property
    def value(self) -> float:
        """The seed-mean; +inf for a cell that is not ``ok`` (it never wins a column)."""
        return self.mean if self.status == "ok" else math.inf


@dataclass
class Study:
    key: StudyKey
    lrs: list[float]  # descending, as in the paper
    sizes: list[int]  # ascending
    cells: dict[tuple[float, int], Cell]

    def cell(self, lr: float, size: int) -> Cell | None:
        return self.cells.get((lr, size))

    def column(self, size: int) -> list[tuple[float, float]]:
        """(lr, seed-mean or +inf) of every stored cell of one size, LR ascending."""
        return [
            (lr, self.cells[lr, size].value) for lr in sorted(self.lrs) if (lr, size) in self.cells
        ]

    def best_lr(self, size: int) -> float | None:
        """Argmin over LRs of the seed-mean (an exact tie goes to the smaller LR); None when
        no cell of the column is ``ok``."""
        col = [(v, lr) for lr, v in self.column(size) if math.isfinite(v)]
        return min(col)[1] if col else None

    def is_best(self, lr: float, size: int) -> bool:
        """Whether the cell has the lowest seed-mean of its column (ties all count)."""
        cell = self.cell(lr, size)
        if cell is None or cell.status != "ok":
            return False
        return cell.mean <= min(v for _, v in self.column(size))

    @property
    def max_seeds(self) -> int:
        return max(c.n_seeds for c in self.cells.values())

    def grid_step(self) -> float | None:
        """The smallest log2 spacing between the study's LRs."""
        logs = np.log2(sorted(self.lrs))
        return float(np.min(np.diff(logs))) if len(logs) > 1 else None


def _alpha(value: Any) -> float | None:
    return None if value is None else float(value)


def _arch(row: dict[str, Any]) -> str:
    """The run's model architecture, from its stored config (rows from before Llama: GPT)."""
    config = row.get("config")
    model = config.get("model", {}) if isinstance(config, dict) else {}
    return str(model.get("arch", "gpt"))


def build_studies(rows: Iterable[dict[str, Any]]) -> list[Study]:
    """Group store rows into studies (module docstring). When a group varies in width and
    in depth, it gives one width study per depth with several widths and one depth study
    per width with several depths; a point in neither is a one-column width study."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (
            str(row["sweep"]),
            str(row["optimizer"]),
            str(row["param"]),
            _alpha(row.get("depth_alpha")),
            float(row["weight_decay"]),
            _arch(row),
        )
        groups[key].append(row)
    studies = []
    for key in sorted(groups, key=lambda k: tuple((v is None, v) for v in k)):
        group = groups[key]
        points = {(int(r["width"]), int(r["depth"])) for r in group}
        by_depth, by_width = defaultdict(set), defaultdict(set)
        for w, d in points:
            by_depth[d].add(w)
            by_width[w].add(d)
        plans: list[tuple[str, int]] = []
        if len(by_depth) == 1:  # one depth: a width sweep (or a single point)
            plans = [("width", next(iter(by_depth)))]
        elif len(by_width) == 1:
            plans = [("depth", next(iter(by_width)))]
        else:
            covered = set()
            for d, ws in sorted(by_depth.items()):
                if len(ws) > 1:
                    plans.append(("width", d))
                    covered |= {(w, d) for w in ws}
            for w, ds in sorted(by_width.items()):
                if len(ds) > 1:
                    plans.append(("depth", w))
                    covered |= {(w, d) for d in ds}
            plans += sorted({("width", d) for w, d in points - covered})
        for axis, fixed in plans:
            *fields_, arch = key
            studies.append(_study(StudyKey(*fields_, axis=axis, fixed=fixed, arch=arch), group))
    return studies


def _study(key: StudyKey, rows: list[dict[str, Any]]) -> Study:
    cells: dict[tuple[float, int], Cell] = {}
    for row in rows:
        if int(row[key.other]) != key.fixed:
            continue
        lr, size = _lr_key(row["lr"]), int(row[key.axis])
        cell = cells.setdefault((lr, size), Cell(lr, size))
        loss = row.get("best_val_loss")
        if row["status"] == "failed":
            cell.n_failed += 1
        elif row["status"] == "diverged" or loss is None or not math.isfinite(loss):
            cell.n_diverged += 1
        else:
            cell.losses.append(float(loss))
            cell.seeds.append(int(row["seed"]))
    lrs = sorted({lr for lr, _ in cells}, reverse=True)
    sizes = sorted({s for _, s in cells})
    return Study(key, lrs, sizes, cells)


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
    monotone: bool | None
    min_seeds: int  # fewest ok seeds in the best cell of a size

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
            "monotone": self.monotone,
            "min_seeds": self.min_seeds,
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
        fit_lr[size] = fit_optimum(study.column(size), lr) if lr is not None else None
    step = study.grid_step()
    narrow, wide = study.sizes[0], study.sizes[-1]
    t_lr = best_lr[narrow]
    loss_at: dict[int, float] = {}
    wider = monotone = None
    if t_lr is not None:
        for size in study.sizes:
            cell = study.cell(t_lr, size)
            loss_at[size] = cell.value if cell else math.nan
        if len(study.sizes) > 1:
            wider = bool(loss_at[wide] < loss_at[narrow])
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
        monotone=monotone,
        min_seeds=min((n for n in best_n.values() if n), default=0),
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
    axis and fixed size: the one with the same α, else the only one (SP ignores α)."""
    by: dict[tuple[Any, ...], dict[str, list[Study]]] = defaultdict(lambda: defaultdict(list))
    for s in studies:
        k = s.key
        by[k.sweep, k.arch, k.optimizer, k.weight_decay, k.axis, k.fixed][k.param].append(s)
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
        }
        for name, study in (("sp", pair.sp), ("mup", pair.mup)):
            t = transfer_summary(study) if study else None
            row[f"drift_{name}"] = t.drift_steps if t else None
            row[f"fit_drift_{name}"] = t.fit_drift_steps if t else None
            row[f"wider_better_{name}"] = t.wider_better if t else None
            row[f"monotone_{name}"] = t.monotone if t else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- text


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _yes(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "no")


def cell_text(study: Study, lr: float, size: int) -> str:
    """A table cell: ``mean ± std`` (``(n=k)`` when it has fewer seeds than the study),
    ``div``, ``div k/n``, ``fail`` or ``—`` for no run."""
    cell = study.cell(lr, size)
    if cell is None:
        return "—"
    if cell.status == "div":
        n = cell.n_seeds
        return "div" if cell.n_diverged == n else f"div {cell.n_diverged}/{n}"
    if cell.status == "fail":
        return "fail"
    text = f"{cell.mean:.4f}" + (f" ± {cell.std:.4f}" if len(cell.losses) > 1 else "")
    if cell.n_seeds < study.max_seeds or cell.n_failed:
        text += f" (n={len(cell.losses)})"
    return text


def markdown_table(study: Study) -> str:
    """The paper's layout: rows LR (descending), columns sizes, best per column in bold."""
    head = f"| LR / {study.key.axis} | " + " | ".join(str(s) for s in study.sizes) + " |"
    lines = [head, "|---:|" + "---:|" * len(study.sizes)]
    for lr in study.lrs:
        cells = []
        for size in study.sizes:
            text = cell_text(study, lr, size)
            cells.append(f"**{text}**" if study.is_best(lr, size) else text)
        lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transfer_text(t: Transfer) -> str:
    axis = t.key.axis
    more = "wider" if axis == "width" else "deeper"
    best = ", ".join(
        f"{s}: {_fmt(t.best_lr[s])}"
        + (" (edge)" if t.at_edge[s] else "")
        + f" [fit {_fmt(t.fit_lr[s])}; loss {_fmt(t.best_loss[s], '.4f')}"
        + (f" ± {t.best_std[s]:.4f}" if t.best_n[s] > 1 else "")
        + f", n={t.best_n[s]}]"
        for s in t.sizes
    )
    lines = [
        f"- best LR per {axis}: {best}",
        f"- grid step: {_fmt(t.grid_step)} in log2(lr); drift: {_fmt(t.drift_steps)} grid steps"
        f" (fitted optimum: {_fmt(t.fit_drift_steps, '.2f')})",
        f"- transferred LR (best at {axis} {t.sizes[0]}): {_fmt(t.transferred_lr)}",
    ]
    if t.transferred_lr is not None and len(t.sizes) > 1:
        losses = ", ".join(
            f"{s}: " + ("div/fail" if v == math.inf else _fmt(v, ".4f"))
            for s, v in t.loss_at_transferred.items()
        )
        lines.append(f"- loss at the transferred LR: {losses}")
        lines.append(
            f"- {more} is better at the transferred LR: {_yes(t.wider_better)}"
            f" ({axis} {t.sizes[-1]} vs {t.sizes[0]}); monotone over all {axis}s:"
            f" {_yes(t.monotone)}"
        )
    if any(t.at_edge.values()):
        lines.append("- an optimum at the grid edge may lie outside the grid: extend the LRs")
    if 0 < t.min_seeds < 2:
        lines.append("- a best cell has fewer than 2 seeds: its optimum is within seed noise")
    return "\n".join(lines)


def comparison_table(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header and rows of the SP-vs-μP comparison, as strings."""
    sweeps = len({r["sweep"] for r in rows}) > 1
    archs = len({r["arch"] for r in rows}) > 1
    head = ["optimizer", "axis", "α", "wd", "drift SP", "drift μP"]
    head += ["fit drift SP", "fit drift μP", "wider better SP", "wider better μP"]
    out = [(["sweep"] if sweeps else []) + (["model"] if archs else []) + head]
    for r in rows:
        line = ([r["sweep"]] if sweeps else []) + ([r["arch"]] if archs else [])
        line += [r["optimizer"], f"{r['axis']} ({r['fixed']})", _fmt(r["depth_alpha"], "g")]
        line += [_fmt(r["weight_decay"], "g"), _fmt(r["drift_sp"]), _fmt(r["drift_mup"])]
        line += [_fmt(r["fit_drift_sp"], ".2f"), _fmt(r["fit_drift_mup"], ".2f")]
        line += [_yes(r["wider_better_sp"]), _yes(r["wider_better_mup"])]
        out.append(line)
    return out


def plain_table(table: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest entry; the first left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(row: Sequence[str]) -> str:
        pads = zip(row, widths, strict=True)
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(pads)]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in table)


def markdown_report(
    pairs: Sequence[Pair], figures: dict[int, str], title: str, counts: dict[str, int]
) -> str:
    """report.md: summary, then per pair its figure, tables and transfer summaries.
    ``figures`` maps a pair's index to its PNG file name."""
    table = comparison_table(comparison(pairs))
    md = [f"# LR sweep report: {title}", ""]
    md.append(", ".join(f"{n} {s}" for s, n in counts.items()) + " runs.")
    md += ["", "## Transfer summary", ""]
    md.append("| " + " | ".join(table[0]) + " |")
    md.append("|" + "---|" * len(table[0]))
    md += ["| " + " | ".join(row) + " |" for row in table[1:]]
    md += [
        "",
        "Drift: (max − min of log2 best LR over sizes) / (smallest log2 spacing of the LR grid);"
        " best LR = argmin of the seed-mean, fit = vertex of a parabola in log2(lr) through the"
        " argmin and its neighbours. Wider better: at the transferred LR (best LR of the"
        " narrowest size) the widest (deepest) model has the lower loss.",
        "",
        "Cells: mean ± sample std of the best val loss over seeds (n shown when a cell has"
        " fewer seeds); best per column in bold; `div` = a seed diverged (`div k/n`: k of n),"
        " such a cell never wins; `fail` = every seed failed; `—` = no run.",
    ]
    for i, pair in enumerate(pairs):
        md += ["", f"## {pair.key.label(param=False)}"]
        if i in figures:
            md += ["", f"![{pair.key.optimizer} val loss vs LR]({figures[i]})"]
        for study in pair.studies():
            name = PARAM_LABEL.get(study.key.param, study.key.param)
            md += ["", f"### {name}", "", markdown_table(study), ""]
            md.append(transfer_text(transfer_summary(study)))
    return "\n".join(md) + "\n"


def tables_csv(studies: Sequence[Study]) -> str:
    """Long format, one line per (study, LR, size): :data:`CSV_COLUMNS`. Losses are empty
    for a cell that is not ``ok``; ``best_in_column`` is 1 for the column's best cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for study in studies:
        k = study.key
        for lr in study.lrs:
            for size in study.sizes:
                cell = study.cell(lr, size)
                if cell is None:
                    continue
                ok = cell.status == "ok"
                width, depth = (size, k.fixed) if k.axis == "width" else (k.fixed, size)
                stats = [cell.mean, cell.std, min(cell.losses), max(cell.losses)] if ok else []
                writer.writerow(
                    [k.sweep, k.optimizer, k.param, "" if k.depth_alpha is None else k.depth_alpha]
                    + [k.weight_decay, k.axis, width, depth, repr(lr), cell.status]
                    + [cell.n_seeds, len(cell.losses), cell.n_diverged, cell.n_failed]
                    + [("" if math.isnan(v) else repr(v)) for v in stats]
                    + [""] * (4 - len(stats))
                    + [int(study.is_best(lr, size)), k.arch]
                )
    return buf.getvalue()


# ----------------------------------------------------------------------------- plots


def _ceiling(studies: Sequence[Study]) -> tuple[float, float]:
    """y-limits that keep a plot readable: up to the 90th percentile of the seed-means plus
    a quarter of the range below it (higher losses are drawn clipped at the top)."""
    values = [c.mean for s in studies for c in s.cells.values() if c.status == "ok"]
    if not values:
        return 0.0, 1.0
    lo, q90, hi = float(np.min(values)), float(np.quantile(values, 0.9)), float(np.max(values))
    top = min(hi, q90 + 0.25 * (q90 - lo))
    top = max(top, lo + 1e-3)
    pad = 0.04 * (top - lo)
    return lo - pad, top + pad


def plot_pair(pair: Pair) -> bytes:
    """Fig. 1 of the seed paper for one pair: val loss vs LR (log2 x-axis), one curve per
    size with a min–max seed band, SP and μP side by side sharing the y-axis, the best LR
    of each curve starred, diverged cells as ``x`` and clipped losses as ``^`` at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = pair.studies()
    ylo, ytop = _ceiling(studies)
    fig, axes = plt.subplots(
        1, len(studies), figsize=(4.6 * len(studies), 3.6), squeeze=False, sharex=True, sharey=True
    )
    for ax, study in zip(axes[0], studies, strict=True):
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(study.sizes)))
        for color, size in zip(colors, study.sizes, strict=True):
            cells = [study.cell(lr, size) for lr in sorted(study.lrs)]
            ok = [c for c in cells if c is not None and c.status == "ok"]
            bad = [c for c in cells if c is not None and c.status == "div"]
            x = [c.lr for c in ok]
            y = np.array([c.mean for c in ok])
            ax.plot(x, np.minimum(y, ytop), "o-", ms=3, color=color, label=f"{size}")
            ax.fill_between(
                x,
                np.minimum([min(c.losses) for c in ok], ytop),
                np.minimum([max(c.losses) for c in ok], ytop),
                color=color,
                alpha=0.2,
                lw=0,
            )
            clipped = [(c.lr, ytop) for c in ok if c.mean > ytop]
            if clipped:
                ax.plot(*zip(*clipped, strict=True), "^", ms=5, color=color, mfc="none")
            if bad:
                x_bad = [c.lr for c in bad]
                ax.plot(x_bad, [ytop] * len(bad), "x", ms=7, mew=2, color=color, clip_on=False)
            best = study.best_lr(size)
            if best is not None:
                v = study.cell(best, size).mean  # type: ignore[union-attr]
                ax.plot([best], [min(v, ytop)], "*", ms=12, color=color, mec="black", mew=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylim(ylo, ytop + 0.03 * (ytop - ylo))
        k = study.key
        alpha = "" if k.param == "sp" or k.depth_alpha is None else f" (α={k.depth_alpha:g})"
        drift = transfer_summary(study).drift_steps
        ax.set_title(
            f"{PARAM_LABEL.get(k.param, k.param)}{alpha}: drift {_fmt(drift)} grid steps",
            fontsize=9,
        )
        ax.set_xlabel("learning rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(title=k.axis, fontsize=7, title_fontsize=7)
    axes[0][0].set_ylabel("best val loss (seed mean)", fontsize=8)
    k = pair.key
    seeds = max(s.max_seeds for s in studies)
    fig.suptitle(
        f"{k.optimizer}, wd={k.weight_decay:g}, {k.axis} sweep at {k.other} {k.fixed}, "
        f"{seeds} seed{'s' if seeds > 1 else ''}  (★ best LR, × diverged)",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def figure_names(pairs: Sequence[Pair]) -> list[str]:
    """``lr_<optimizer>_<axis>`` plus whichever of sweep, fixed size, α and wd vary."""
    keys = [p.key for p in pairs]

    def varies(attr: str) -> bool:
        return len({getattr(k, attr) for k in keys}) > 1

    names = []
    for k in keys:
        parts = ["lr"] + ([k.sweep] if varies("sweep") else [])
        parts += ([k.arch] if varies("arch") else []) + [k.optimizer, k.axis]
        if varies("fixed"):
            parts.append(f"{k.other[0]}{k.fixed}")
        if varies("depth_alpha"):
            parts.append(f"a{_fmt(k.depth_alpha, 'g')}")
        if varies("weight_decay"):
            parts.append(f"wd{k.weight_decay:g}")
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)) + ".png")
    seen: dict[str, int] = defaultdict(int)
    out = []
    for name in names:  # a clash only when a sanitized name coincides
        seen[name] += 1
        out.append(name if seen[name] == 1 else name.replace(".png", f"_{seen[name]}.png"))
    return out


# ----------------------------------------------------------------------------- driver


@dataclass
class Report:
    """Everything a report writes, computed in memory."""

    studies: list[Study]
    pairs: list[Pair]
    transfers: list[Transfer]
    comparison: list[dict[str, Any]]
    markdown: str
    csv: str
    figures: dict[str, bytes]

    def summary_json(self, title: str) -> dict[str, Any]:
        return {
            "store": title,
            "comparison": self.comparison,
            "studies": [t.to_json() for t in self.transfers],
        }


def check_rows(rows: Sequence[dict[str, Any]], where: str) -> None:
    """A one-line error for a store a report cannot be made of."""
    if not rows:
        raise ReportError(f"{where} has no runs; run `smup sweep SPEC.toml` into it first")
    if all(r["status"] == "failed" for r in rows):
        errors = [str(r.get("error") or "").strip() for r in rows]
        first = next((e.splitlines()[-1][:200] for e in errors if e), "no error stored")
        raise ReportError(
            f"all {len(rows)} runs in {where} failed (first error: {first}); "
            "fix the cause and rerun the sweep"
        )


def build_report(rows: Sequence[dict[str, Any]], title: str = "runs") -> Report:
    """Tables, summaries and figures of ``rows`` (store row dicts), nothing written."""
    check_rows(rows, title)
    studies = build_studies(rows)
    pairs = pair_studies(studies)
    names = figure_names(pairs)
    figures = {name: plot_pair(pair) for name, pair in zip(names, pairs, strict=True)}
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "diverged", "failed")}
    ordered = [s for p in pairs for s in p.studies()]
    return Report(
        studies=ordered,
        pairs=pairs,
        transfers=[transfer_summary(s) for s in ordered],
        comparison=comparison(pairs),
        markdown=markdown_report(pairs, dict(enumerate(names)), title, counts),
        csv=tables_csv(ordered),
        figures=figures,
    )


def write_report(report: Report, out: str | Path, title: str = "runs") -> list[Path]:
    """Write report.md, tables.csv, summary.json and the PNGs into ``out``; each file
    atomically."""
    out = Path(out)
    paths = [
        atomic_write(out / "report.md", lambda f: f.write(report.markdown.encode())),
        atomic_write(out / "tables.csv", lambda f: f.write(report.csv.encode())),
        write_json(out / "summary.json", report.summary_json(title)),
    ]
    for name, data in report.figures.items():
        paths.append(atomic_write(out / name, lambda f, data=data: f.write(data)))
    return paths


def report_store(
    store: str | Path, out: str | Path | None = None, sweep: str | None = None
) -> tuple[Report, list[Path]]:
    """``smup report``: read the store, build the report, write it (default: ``STEM_report/``
    next to the store, e.g. ``runs/sweeps/demo_report/`` for ``runs/sweeps/demo.sqlite``).
    Nothing is written when the store cannot be reported."""
    from .store import RunStore

    store = Path(store)
    if store.is_dir():
        raise ReportError(f"{store} is a directory; pass the run store file (e.g. runs.db)")
    with RunStore(store, create=False) as db:
        rows = db.rows(sweep)
        sweeps = sorted({r["sweep"] for r in db.rows()}) if sweep and not rows else []
    if sweep and not rows:
        have = ", ".join(sweeps) or "none"
        raise ReportError(f"{store} has no runs of sweep {sweep!r}; sweeps in it: {have}")
    report = build_report(rows, str(store) + (f" (sweep {sweep})" if sweep else ""))
    out = Path(out) if out is not None else store.parent / f"{store.stem}_report"
    return report, write_report(report, out, str(store))

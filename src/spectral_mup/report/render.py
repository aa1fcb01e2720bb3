"""Text renderings: the paper-layout Markdown tables, the transfer summary, the comparison
table, the whole report.md and tables.csv."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from .data import PARAM_LABEL, Study, hp_text
from .stats import Pair, Transfer, comparison, transfer_summary

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


def _decided(v: bool | None) -> str:
    return {True: "yes", False: "no", None: "undecided"}[v]


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
            f" ({axis} {t.sizes[-1]} vs {t.sizes[0]}; decided by a one-sided 95% paired"
            f" t-test: {_decided(t.wider_better_decided)}); monotone over all {axis}s:"
            f" {_yes(t.monotone)}"
        )
    if any(t.at_edge.values()):
        lines.append("- an optimum at the grid edge may lie outside the grid: extend the LRs")
    if 0 < t.min_seeds < 2:
        lines.append("- a best cell has fewer than 2 seeds: its optimum is within seed noise")
    gaps = {s: g for s, g in t.noise.items() if g is not None}
    if gaps:
        text = ", ".join(f"{s}: {g:.4f} vs {se:.4f} (paired {pse:.4f})"
                         for s, (g, se, pse) in gaps.items())  # fmt: skip
        close = t.within_noise()
        verdict = (f"the argmin is within 2 SE of a neighbour at {axis} "
                   f"{', '.join(map(str, close))}: more seeds there, or read the fitted optimum"
                   if close else "every argmin is 2 SE clear of its neighbours")  # fmt: skip
        clear = len(gaps) - len(t.within_noise(paired=True))
        lines.append(f"- seed noise (gap to the better neighbouring LR vs its SE; paired: the "
                     f"SE of the per-seed gaps): {text}; {verdict}; paired, {clear} of "
                     f"{len(gaps)} are 2 SE clear (a paired SE from few seeds is itself "
                     "noisy)")  # fmt: skip
    if t.transferred_lr is not None and len(t.sizes) > 1:
        text = ", ".join(f"{s}: {_decided(v)}" for s, v in t.decided.items())
        lines.append(f"- optimum within one grid step of the transferred LR, decided (the best "
                     f"LR within one step beats both LRs two steps away, one-sided 95% paired "
                     f"t-test on shared seeds): {text}")  # fmt: skip
    return "\n".join(lines)


def comparison_table(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header and rows of the SP-vs-μP comparison, as strings."""
    sweeps = len({r["sweep"] for r in rows}) > 1
    archs = len({r["arch"] for r in rows}) > 1
    hps = any(r.get("hps") for r in rows)
    head = ["optimizer", "axis", "α", "wd"] + (["HPs"] if hps else []) + ["drift SP", "drift μP"]
    axes = {r["axis"] for r in rows}
    bigger = {"width": "wider", "depth": "deeper"}.get(*axes) if len(axes) == 1 else "bigger"
    head += ["fit drift SP", "fit drift μP", f"{bigger} better SP", f"{bigger} better μP"]
    out = [(["sweep"] if sweeps else []) + (["model"] if archs else []) + head]
    for r in rows:
        line = ([r["sweep"]] if sweeps else []) + ([r["arch"]] if archs else [])
        line += [r["optimizer"], f"{r['axis']} ({r['fixed']})", _fmt(r["depth_alpha"], "g")]
        line += [_fmt(r["weight_decay"], "g")]
        if hps:
            line.append(hp_text(r["hps"].items()))
        line += [_fmt(r["drift_sp"]), _fmt(r["drift_mup"])]
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
        " argmin and its neighbours. Wider (deeper, bigger) better: at the transferred LR (best"
        " LR of the narrowest or shallowest size) the widest (deepest) model has the lower loss.",
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

"""Build a report in memory and write its files (``smup report``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, write_json
from .data import ReportError, Study, build_studies
from .plots import figure_names, plot_pair
from .render import markdown_report, tables_csv
from .stats import Pair, Transfer, comparison, pair_studies, transfer_summary

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
    from ..store import RunStore

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

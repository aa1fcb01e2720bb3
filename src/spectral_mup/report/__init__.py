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
  non-``ok`` cell counts as +inf; for the depth axis read "deeper" for "wider"); "wider
  better" is also tested (``stats.lower``: one-sided 95% paired t-test on shared seeds);
- decided: per size, whether the optimum lies within one grid step of the transferred
  LR by a one-sided 95% paired t-test of the best LR within one step against the LRs
  two steps away (``stats.decided``; yes / no / undecided).

Outputs of :func:`write_report` (all written atomically, and only after everything has
been computed): ``report.md``, ``tables.csv`` (long format, :data:`CSV_COLUMNS`),
``summary.json`` and one ``lr_*.png`` per SP/μP pair of studies.

Modules: ``data`` (rows → studies and cells), ``stats`` (drift, fits, transfer, SP/μP
pairs), ``render`` (Markdown and CSV), ``plots`` (figures), ``files`` (build and write).
"""

from .data import (
    AXES,
    PARAM_LABEL,
    Cell,
    ReportError,
    Study,
    StudyKey,
    build_studies,
    paired_argmin,
)
from .files import Report, build_report, check_rows, report_store, write_report
from .plots import figure_names, plot_pair
from .render import (
    CSV_COLUMNS,
    cell_text,
    comparison_table,
    markdown_report,
    markdown_table,
    plain_table,
    tables_csv,
    transfer_text,
)
from .stats import Pair, Transfer, comparison, fit_optimum, pair_studies, transfer_summary

__all__ = [
    "AXES",
    "CSV_COLUMNS",
    "PARAM_LABEL",
    "Cell",
    "Pair",
    "Report",
    "ReportError",
    "Study",
    "StudyKey",
    "Transfer",
    "build_report",
    "build_studies",
    "cell_text",
    "check_rows",
    "comparison",
    "comparison_table",
    "figure_names",
    "fit_optimum",
    "markdown_report",
    "markdown_table",
    "pair_studies",
    "paired_argmin",
    "plain_table",
    "plot_pair",
    "report_store",
    "tables_csv",
    "transfer_summary",
    "transfer_text",
    "write_report",
]

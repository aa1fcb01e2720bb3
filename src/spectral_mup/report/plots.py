"""The report's figures: val loss against LR, one curve per size, SP and μP side by side."""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .data import PARAM_LABEL, Study
from .render import _fmt
from .stats import Pair, transfer_summary

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

"""The report's data model: store rows grouped into studies (one LR sweep along one axis)
of cells (seed statistics at one LR and size); the rules are in the package docstring."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SmupError

AXES = ("width", "depth")
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
    hps: tuple[tuple[str, Any], ...] = ()  # other swept config keys (hp_keys) and values

    @property
    def other(self) -> str:
        return "depth" if self.axis == "width" else "width"

    def label(self, param: bool = True) -> str:
        """E.g. ``s1: adamw μP, α=1, wd=0, width sweep at depth 2`` (``param=False``: no μP)."""
        name = f" {PARAM_LABEL.get(self.param, self.param)}" if param else ""
        alpha = "" if self.depth_alpha is None else f", α={self.depth_alpha:g}"
        arch = "" if self.arch == "gpt" else f"{self.arch} "
        hps = f", {hp_text(self.hps, ', ')}" if self.hps else ""
        return (
            f"{self.sweep}: {arch}{self.optimizer}{name}{alpha}, wd={self.weight_decay:g}{hps}, "
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

    def on(self, seeds: Set[int] | None) -> list[float]:
        """The losses of ``seeds`` (all of them for None)."""
        return _on(dict(zip(self.seeds, self.losses, strict=True)), seeds)


def paired_argmin(losses: Mapping[float, Mapping[int, float]]) -> float | None:
    """The LR of lowest seed-mean loss among ``losses`` ({lr: {seed: loss}}, finite losses
    only), an exact tie to the smaller LR; None for no LR.

    LRs are compared on the seeds they share, since a seed shifts every LR's loss alike
    (measured: ±0.03–0.05 between seeds 0 and 1 of the Llama width sweeps). Where some LRs
    have more seeds (``smup sweep --near-best``: the next seed only near the optimum of the
    seeds so far), the argmin on the seeds every LR has is taken first, then again on the
    winner's seeds among the LRs that have them, until the winner has no seed beyond those
    compared. With the same seeds everywhere this is the plain argmin; with no seed shared
    by all, each LR's own mean."""
    cands = {lr: by for lr, by in losses.items() if by}
    if not cands:
        return None
    seeds = set.intersection(*(set(by) for by in cands.values())) or None
    while True:
        best = min(cands, key=lambda lr: (float(np.mean(_on(cands[lr], seeds))), lr))
        if seeds is None or set(cands[best]) == seeds:
            return best
        seeds = set(cands[best])
        cands = {lr: by for lr, by in cands.items() if seeds <= set(by)}


def _on(by_seed: Mapping[int, float], seeds: Set[int] | None) -> list[float]:
    return [v for s, v in by_seed.items() if seeds is None or s in seeds]


def common_seeds(cells: Iterable[Cell]) -> set[int] | None:
    """The seeds every one of ``cells`` holds, or None where they share none: comparisons
    between cells are made on these (paired), as a seed moves every LR's loss alike."""
    sets = [set(c.seeds) for c in cells]
    common = set.intersection(*sets) if sets else set()
    return common or None


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
        """Argmin over LRs of the seed-mean, compared on shared seeds (``paired_argmin``);
        None when no cell of the column is ``ok``."""
        ok = [self.cells[lr, size] for lr, v in self.column(size) if math.isfinite(v)]
        return paired_argmin({c.lr: dict(zip(c.seeds, c.losses, strict=True)) for c in ok})

    def is_best(self, lr: float, size: int) -> bool:
        """Whether the cell is its column's ``best_lr``."""
        return lr == self.best_lr(size)

    @property
    def max_seeds(self) -> int:
        return max(c.n_seeds for c in self.cells.values())

    def grid_step(self) -> float | None:
        """The smallest log2 spacing between the study's LRs."""
        logs = np.log2(sorted(self.lrs))
        return float(np.min(np.diff(logs))) if len(logs) > 1 else None


def hp_text(hps: Iterable[tuple[str, Any]], sep: str = " ", short: bool = True) -> str:
    """``lr_input=0.5 readout_scale=2``: swept config keys and values (``short``: without
    the section)."""

    def one(k: str, v: Any) -> str:
        name = k.split(".", 1)[-1] if short else k
        return f"{name}={v:g}" if isinstance(v, float) else f"{name}={v}"

    return sep.join(one(k, v) for k, v in hps)


def _alpha(value: Any) -> float | None:
    return None if value is None else float(value)


def _arch(row: dict[str, Any]) -> str:
    """The run's model architecture, from its stored config (rows from before Llama: GPT)."""
    config = row.get("config")
    model = config.get("model", {}) if isinstance(config, dict) else {}
    return str(model.get("arch", "gpt"))


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A stored config as ``{"section.key": value}``."""
    if not isinstance(config, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat_config(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    """A stored run's config as ``{"section.key": value}``, only the keys that identify it
    (``train.fingerprint``): rows stored before a config key existed compare equal to rows
    that hold it at the value that trains them the same (``LATER_KEYS``, unset options)."""
    from ..config import fingerprint

    config = row.get("config")
    sections = isinstance(config, dict) and all(isinstance(v, dict) for v in config.values())
    return flat_config(fingerprint(config) if sections else config)


def hp_keys(rows: Sequence[dict[str, Any]], flats: Sequence[dict[str, Any]]) -> list[str]:
    """The config keys besides the LR and the seed that a group of runs sweeps: those whose
    value differs between two runs of the same width and depth (a key that follows the
    width, such as a derived hidden size, is not one; runtime keys never are). ``flats``:
    the rows' ``_identity``."""
    from ..config import RUNTIME_KEYS

    fixed = {"optim.lr", "train.seed", *(f"train.{k}" for k in RUNTIME_KEYS)}
    keys = {k for flat in flats for k in flat} - fixed
    values: dict[tuple[int, int, str], set[str]] = defaultdict(set)
    for row, flat in zip(rows, flats, strict=True):
        for k in keys:  # a key a row lacks is unset there (None), not unknown
            values[int(row["width"]), int(row["depth"]), k].add(
                json.dumps(flat.get(k), sort_keys=True)
            )
    return sorted({k for (_, _, k), seen in values.items() if len(seen) > 1})


def build_studies(rows: Iterable[dict[str, Any]]) -> list[Study]:
    """Group store rows into studies (module docstring). When a group varies in width and
    in depth, it gives one width study per depth with several widths and one depth study
    per width with several depths; a point in neither is a one-column width study. Runs that
    differ in another swept config key (``hp_keys``: ``param.lr_input``, …) are other studies."""
    base: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (
            str(row["sweep"]),
            str(row["optimizer"]),
            str(row["param"]),
            _alpha(row.get("depth_alpha")),
            float(row["weight_decay"]),
            _arch(row),
        )
        base[key].append(row)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for key, group in base.items():
        flats = [_identity(row) for row in group]
        names = hp_keys(group, flats)
        for row, flat in zip(group, flats, strict=True):
            groups[(*key, tuple((k, flat.get(k)) for k in names))].append(row)
    studies = []

    def order(k: tuple) -> tuple:
        return (*((v is None, v) for v in k[:-1]), json.dumps(k[-1], default=str))

    for key in sorted(groups, key=order):
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
            *fields_, arch, hps = key
            study_key = StudyKey(*fields_, axis=axis, fixed=fixed, arch=arch, hps=hps)
            studies.append(_study(study_key, group))
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

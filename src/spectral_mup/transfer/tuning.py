"""Tuning one side of a tuned transfer (``Side``: a model, an optimizer, a parametrization).

Its candidates are configurations, each trained on every seed of its spec (``_candidate``:
runs that differ only in their seed). The ``Tuner`` ranks them by seed-mean best val loss,
trains the best again on more seeds (``rerank``), line-searches the winner's LR
(``refine_lr``) and says what it found (``Outcome``); ``Cost`` is what runs cost to train.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..sweep import Run, SweepSpec, run_id
from .runs import Sweeper, placed

Rows = dict[str, dict[str, Any]]  # store rows by run id


@dataclass(frozen=True)
class Side:
    """What one side of a tuned transfer tunes: a model, an optimizer and a parametrization
    with its depth α (0 for SP)."""

    arch: str
    optimizer: str
    param: str
    depth_alpha: float

    @classmethod
    def of(cls, run: Run) -> Side:
        c = run.config
        alpha = float(c.param.depth_alpha) if c.param.kind == "mup" else 0.0
        return cls(c.model.arch, c.optim.name, c.param.kind, alpha)

    @property
    def label(self) -> str:
        return "μP" if self.param == "mup" else "SP"


def split(runs: list[Run]) -> dict[Side, list[Run]]:
    """``runs`` by side, in the order each side first appears."""
    groups: dict[Side, list[Run]] = {}
    for r in runs:
        groups.setdefault(Side.of(r), []).append(r)
    return groups


@dataclass(frozen=True)
class Cost:
    """What some runs cost to train: their training FLOPs and summed wall time."""

    flops: float = 0.0
    seconds: float = 0.0

    @classmethod
    def of(cls, runs: list[Run], rows: Rows) -> Cost:
        from ..train import flops_per_token

        flops = seconds = 0.0
        for r in runs:
            row = rows.get(r.id) or {}
            flops += (row.get("tokens") or 0) * flops_per_token(r.config)
            seconds += row.get("wall_time") or 0.0
        return cls(flops, seconds)


@dataclass(frozen=True)
class Outcome:
    """What tuning one side found."""

    runs: list[Run]  # every tuning run: the candidates', then the reranked and LR-line ones
    winner: Run  # one run of the winning candidate
    loss: float  # the winner's seed-mean best val loss over every seed it was trained on
    trials: int  # candidates (each over the spec's seeds)
    rows: Rows  # the store rows of every run trained so far

    @property
    def cost(self) -> Cost:
        """The tuning compute: every tuning run's."""
        return Cost.of(self.runs, self.rows)

    def measured(self, where: SweepSpec, seeds: list[int]) -> list[Run]:
        """The winner on ``seeds`` (placed under ``where``), or, with none, its own tuning
        runs (one per seed it was trained on)."""
        if seeds:
            return [_variant(where, self.winner, seed=s) for s in seeds]
        return [r for r in self.runs if _candidate(r) == _candidate(self.winner)]


@dataclass(frozen=True)
class Tuner:
    """How a side is tuned once its candidates are ranked (``run_tuned_transfer``'s
    ``rerank`` and ``refine_lr``), and how its runs train."""

    sweeper: Sweeper
    rerank: int  # the best candidates trained again …
    rerank_seeds: list[int]  # … on these seeds (none when rerank is 0)
    refine_lr: int  # K: the winner's LR × 2^±1 … 2^±K

    def tune(
        self, where: SweepSpec, name: str, groups: dict[Side, list[Run]], rows: Rows
    ) -> dict[Side, Outcome]:
        """Each side of ``groups`` (its candidates' runs, their store rows in ``rows``)
        tuned: its reranked and LR-line runs train under ``where`` as the sweeps
        ``<name>-rerank`` and ``<name>-lr``."""
        extra = {side: self._reranked(where, runs, rows) for side, runs in groups.items()}
        rows = self._train(where, f"{name}-rerank", extra, rows)
        pools = {}
        for side, runs in groups.items():
            reranked = {_candidate(r) for r in extra[side]}
            pools[side] = [r for r in runs if not reranked or _candidate(r) in reranked]
            pools[side] += extra[side]
        # LR line search at the winner's other HPs, on every seed the winner has
        bests = {side: _winner(side, pool, rows)[0] for side, pool in pools.items()}
        kept = {side: [r for r in pools[side] if _candidate(r) == _candidate(best)]
                for side, best in bests.items()}  # fmt: skip
        lines = {side: self._lr_line(where, best, kept[side]) for side, best in bests.items()}
        rows = self._train(where, f"{name}-lr", lines, rows)
        out = {}
        for side, runs in groups.items():
            win, loss = _winner(side, kept[side] + lines[side], rows)
            every = [*runs, *extra[side], *lines[side]]
            out[side] = Outcome(every, win, loss, len(_means(runs, rows)), rows)
        return out

    def _reranked(self, where: SweepSpec, runs: list[Run], rows: Rows) -> list[Run]:
        """The ``rerank`` best candidates of ``runs`` (none that diverged) on the rerank
        seeds."""
        return [_variant(where, _first(runs, c), seed=s)
                for c, loss in _ranked(runs, rows)[:self.rerank] if math.isfinite(loss)
                for s in self.rerank_seeds]  # fmt: skip

    def _lr_line(self, where: SweepSpec, best: Run, kept: list[Run]) -> list[Run]:
        """``best`` at its LR × 2^k, k = ±1 … ±refine_lr, on the seed of each of ``kept``."""
        steps = [k for k in range(-self.refine_lr, self.refine_lr + 1) if k]
        return [_variant(where, best, seed=r.config.train.seed, lr=best.config.optim.lr * 2.0**k)
                for k in steps for r in kept]  # fmt: skip

    def _train(self, where: SweepSpec, name: str, extra: dict[Side, list[Run]], rows: Rows) -> Rows:
        """``rows`` and those of the runs of ``extra``, trained as the sweep ``name``."""
        if not any(extra.values()):
            return rows
        runs = [r for rs in extra.values() for r in rs]
        return {**rows, **self.sweeper.sweep(runs, name, where)}


def _candidate(run: Run) -> str:
    """Runs that differ only in their seed are one candidate configuration."""
    cfg = run.config
    return run_id(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=0)))


def _first(runs: list[Run], candidate: str) -> Run:
    return next(r for r in runs if _candidate(r) == candidate)


def _winner(side: Side, pool: list[Run], rows: Rows) -> tuple[Run, float]:
    """The best candidate of ``pool`` (one of its runs) and its seed-mean."""
    best, loss = _ranked(pool, rows)[0]
    if not math.isfinite(loss):
        raise ConfigError(f"every candidate of {side.optimizer} {side.label} diverged or failed")
    return _first(pool, best), loss


def _means(runs: list[Run], rows: Rows) -> dict[str, float]:
    """Seed-mean best val loss per candidate; inf for one with a diverged, failed or missing
    seed (never best)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        row = rows.get(r.id)
        ok = row is not None and row["status"] == "ok" and row["best_val_loss"] is not None
        by.setdefault(_candidate(r), []).append(float(row["best_val_loss"]) if ok else math.inf)
    return {c: statistics.fmean(v) if all(map(math.isfinite, v)) else math.inf
            for c, v in by.items()}  # fmt: skip


def _ranked(runs: list[Run], rows: Rows) -> list[tuple[str, float]]:
    """(candidate, seed-mean) from best to worst, ties by candidate id."""
    means = _means(runs, rows)
    return sorted(means.items(), key=lambda cm: (cm[1], cm[0]))


def _variant(spec: SweepSpec, run: Run, *, seed: int | None = None, lr: float | None = None) -> Run:
    """The same configuration with another seed and/or LR (its own id and run dir)."""
    cfg = run.config
    train = cfg.train if seed is None else dataclasses.replace(cfg.train, seed=seed)
    optim = cfg.optim if lr is None else dataclasses.replace(cfg.optim, lr=lr)
    point = {**run.point, **({} if seed is None else {"seed": seed})}
    if lr is not None:
        point["optim.lr" if "optim.lr" in point else "lr"] = lr
    return placed(spec, dataclasses.replace(cfg, train=train, optim=optim), point)

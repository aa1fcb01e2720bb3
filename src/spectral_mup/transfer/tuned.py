"""``smup transfer --tune``: every swept HP tuned on the proxy under μP, SP tuned at the
target, each side's tuning compute counted, the sides paired by seed."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import write_json
from ..report.data import flat_config, hp_text
from ..sweep import Run, SweepSpec, load_spec
from .runs import AtTarget, Sweeper, prepare, target_run
from .tuning import Cost, Outcome, Rows, Side, Tuner, split


@dataclass(frozen=True)
class Tuned(AtTarget):
    """One side of a tuned transfer: its best configuration, where it was tuned, its losses
    and what the tuning cost."""

    optimizer: str
    param: str
    depth_alpha: float
    tuned_at: tuple[int, int]  # (width, depth) of the tuning runs
    trials: int  # distinct configurations tried (each over the spec's seeds)
    hps: dict[str, Any]  # the winner's values of every key the candidates differ in
    tuned_loss: float  # the winner's seed-mean best val loss where it was tuned
    target_losses: list[float | None]  # per seed at the target (None: diverged or failed)
    tuning_flops: float  # training FLOPs of every tuning run
    tuning_seconds: float  # their summed wall time
    final_flops: float  # the target runs trained after tuning (μP); 0 when tuned there (SP)
    final_seconds: float
    arch: str = "gpt"
    target_seeds: list[int] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class TunedResult:
    sides: list[Tuned]
    proxy: tuple[int, int]
    target: tuple[int, int]
    path: Path

    def lines(self) -> list[str]:
        head = (
            f"proxy width {self.proxy[0]} depth {self.proxy[1]} → target width "
            f"{self.target[0]} depth {self.target[1]}; tuning compute = training FLOPs "
            "(6N + 12·L·T·d per token) and summed wall time of the tuning runs"
        )
        lines = [head, "| model | optimizer | param | tuned at | trials | best HPs | tuned val "
                 "| target val | tuning PFLOP | tuning s | final PFLOP |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in self.sides:
            finite = [v for v in t.target_losses if v is not None]
            spread = statistics.stdev(finite) if len(finite) > 1 else math.nan
            target = (f"{t.target_loss:.4f}" + (f" ± {spread:.3f}" if math.isfinite(spread) else "")
                      if math.isfinite(t.target_loss) else "div/fail")  # fmt: skip
            hps = hp_text(t.hps.items())
            lines.append(
                f"| {t.arch} | {t.optimizer} | {'μP' if t.param == 'mup' else 'SP'} "
                f"| {t.tuned_at[0]}×{t.tuned_at[1]} | {t.trials} | {hps} | {t.tuned_loss:.4f} "
                f"| {target} | {t.tuning_flops / 1e15:.3f} | {t.tuning_seconds:.0f} "
                f"| {t.final_flops / 1e15:.3f} |"
            )
        for g in paired_gaps(self.sides):
            lines.append(
                f"{g['arch']} {g['optimizer']}: SP − μP at the target, paired by seed: "
                f"{g['mean']:+.4f} ± {g['se']:.4f} (SE, {g['n']} seeds; "
                f"{g['mean'] / g['se'] if g['se'] > 0 else math.inf:+.1f} SE)"
            )
        return lines


def paired_gaps(sides: list[Tuned]) -> list[dict[str, Any]]:
    """SP − μP target loss paired by seed, per model and optimizer whose two sides were
    measured on the same seeds with none diverged: mean, standard error, number of pairs."""
    out = []
    for mup in (s for s in sides if s.param == "mup"):
        for sp in (s for s in sides if s.param == "sp"):
            same = (sp.arch, sp.optimizer, sp.target_seeds) == (
                mup.arch, mup.optimizer, mup.target_seeds)  # fmt: skip
            pairs = list(zip(sp.target_losses, mup.target_losses, strict=True)) if same else []
            if len(pairs) < 2 or any(a is None or b is None for a, b in pairs):
                continue
            d = [a - b for a, b in pairs]  # type: ignore[operator]
            out.append({"arch": mup.arch, "optimizer": mup.optimizer, "n": len(d),
                        "mean": statistics.fmean(d),
                        "se": statistics.stdev(d) / math.sqrt(len(d))})  # fmt: skip
    return out


def _swept(runs: list[Run]) -> list[str]:
    """The config keys in which the candidates differ (the seed and the run dir aside)."""
    values: dict[str, set[str]] = {}
    for r in runs:
        cfg = r.config
        train = dataclasses.replace(cfg.train, seed=0, out_dir="")
        for k, v in flat_config(dataclasses.replace(cfg, train=train).to_dict()).items():
            values.setdefault(k, set()).add(repr(v))
    return sorted(k for k, vs in values.items() if len(vs) > 1)


def run_tuned_transfer(
    spec_path: str | Path,
    target_width: int,
    target_depth: int | None = None,
    *,
    proxy_width: int | None = None,
    proxy_depth: int | None = None,
    sp: bool = False,
    sp_spec: str | Path | None = None,
    rerank: int = 0,
    rerank_seeds: int = 2,
    refine_lr: int = 0,
    eval_seeds: int = 0,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> TunedResult:
    """Tune every swept HP (the spec's grid and [search] trials: LR, per-role multipliers,
    init, …) on the proxy under μP and train the target with the winner; with ``sp``, tune
    SP *at the target* over the same candidates (the spec's SP runs, resized), or, with
    ``sp_spec``, over that spec's SP runs resized to the target (e.g. an LR grid for SP
    while μP searches several HPs). Each side reports its tuning compute (training FLOPs
    and wall time of its tuning runs).

    ``rerank`` > 0: each side's best ``rerank`` candidates are trained again with
    ``rerank_seeds`` more seeds and the winner is the best of them over all their seeds (a
    noisy search's first ranking picks its winner partly by seed luck); these runs count as
    tuning. ``refine_lr`` = K > 0: then the winner's LR × 2^±1 … 2^±K, its other HPs kept,
    on every seed the winner has — a line search along the HP the loss is most sensitive
    to, which a random search over several HPs samples coarsely — and the best of these is
    the winner (tuning too). ``eval_seeds`` > 0: both sides' winners are measured at the
    target on that many fresh seeds, after every seed the tuning used — SP's loss is then
    free of the selection bias of its own tuning seeds, and the sides pair by seed
    (``paired_gaps``)."""
    if rerank < 0 or rerank_seeds < 1 or eval_seeds < 0 or refine_lr < 0:
        raise ConfigError(
            "--rerank, --refine-lr and --eval-seeds take counts ≥ 0, --rerank-seeds ≥ 1"
        )
    spec, proxies, target_depth = prepare(
        spec_path, target_width, target_depth, proxy_width, proxy_depth, sp and sp_spec is None
    )
    p_width, p_depth = proxies[0].config.model.width, proxies[0].config.model.depth
    target = (target_width, target_depth)
    mup = [r for r in proxies if r.config.param.kind == "mup"]
    sp_from, sp_targets = _sp_candidates(spec, proxies, target, sp=sp, sp_spec=sp_spec)
    # extra seeds come after every seed either side's spec uses: reranking, then evaluation
    last = max(r.config.train.seed for r in [*mup, *sp_targets])
    more = list(range(last + 1, last + 1 + rerank_seeds)) if rerank else []
    fresh = list(range(last + 1 + len(more), last + 1 + len(more) + eval_seeds))
    tuner = Tuner(Sweeper(executor, workers, address, progress), rerank, more, refine_lr)
    sides = _mup_sides(tuner, spec, mup, (p_width, p_depth), target, fresh)
    if sp:
        sides += _sp_sides(tuner, sp_from, sp_targets, target, fresh)
    # one file per spec and protocol: two searches sharing a store keep their own results
    protocol = "".join(f"_{flag}{n}" for flag, n in (
        ("rerank", f"{rerank}x{rerank_seeds}" if rerank else 0), ("lr", refine_lr),
        ("eval", eval_seeds)) if n)  # fmt: skip
    name = f"tuned_transfer_{spec.name}_{target_width}x{target_depth}{protocol}.json"
    out = spec.store.parent / name
    write_json(out, {"spec": str(spec.path), "proxy": {"width": p_width, "depth": p_depth},
                     "target": {"width": target_width, "depth": target_depth},
                     "rerank": {"top": rerank, "seeds": more}, "refine_lr": refine_lr,
                     "eval_seeds": fresh,
                     "sides": [s.to_json() for s in sides],
                     "paired": paired_gaps(sides)})  # fmt: skip
    return TunedResult(sides, (p_width, p_depth), target, out)


def _sp_candidates(
    spec: SweepSpec,
    proxies: list[Run],
    target: tuple[int, int],
    *,
    sp: bool,
    sp_spec: str | Path | None,
) -> tuple[SweepSpec, list[Run]]:
    """The spec SP's candidates come from (``sp_spec``, or the proxies' own) and those
    candidates resized to the target; none without ``sp``."""
    sp_from = spec if sp_spec is None else load_spec(sp_spec)
    if sp_spec is not None:
        if not sp:
            raise ConfigError("--sp-spec names SP's candidates; pass --sp with it")
        sizes = {(r.config.model.width, r.config.model.depth) for r in sp_from.runs}
        if len(sizes) > 1:
            raise ConfigError(f"{sp_from.path} sweeps several sizes {sorted(sizes)}; keep one")
    sp_pool = proxies if sp_spec is None else sp_from.runs
    sp_targets = [target_run(sp_from, r, *target)
                  for r in sp_pool if r.config.param.kind == "sp"] if sp else []  # fmt: skip
    if sp and not sp_targets:
        raise ConfigError(f"{sp_from.path} has no SP runs (grid param); add param = ['sp']")
    return sp_from, sp_targets


def _mup_sides(
    tuner: Tuner,
    spec: SweepSpec,
    mup: list[Run],
    proxy: tuple[int, int],
    target: tuple[int, int],
    fresh: list[int],
) -> list[Tuned]:
    """μP tuned on the proxy, each side's winner trained at the target: on the ``fresh``
    seeds, or with none on the seeds it was tuned on."""
    sweeper = tuner.sweeper
    tuned = tuner.tune(spec, spec.name, split(mup), sweeper.sweep(mup, spec.name, spec))
    finals = {side: [target_run(spec, r, *target) for r in outcome.measured(spec, fresh)]
              for side, outcome in tuned.items()}  # fmt: skip
    runs = [t for ts in finals.values() for t in ts]
    target_rows = sweeper.sweep(runs, f"{spec.name}-transfer", spec)
    return [_tuned(side, outcome, tuned_at=proxy, targets=finals[side], rows=target_rows,
                   final=Cost.of(finals[side], target_rows))
            for side, outcome in tuned.items()]  # fmt: skip


def _sp_sides(
    tuner: Tuner,
    sp_from: SweepSpec,
    sp_targets: list[Run],
    target: tuple[int, int],
    fresh: list[int],
) -> list[Tuned]:
    """SP tuned at the target, each side's winner measured there on the ``fresh`` seeds,
    or with none on its own tuning seeds (no further runs)."""
    sweeper = tuner.sweeper
    name = f"{sp_from.name}-sp-at-target"
    at_target = tuner.tune(sp_from, f"{sp_from.name}-sp", split(sp_targets),
                           sweeper.sweep(sp_targets, name, sp_from))  # fmt: skip
    sides = []
    for side, outcome in at_target.items():
        evals = outcome.measured(sp_from, fresh)
        if fresh:
            eval_rows = sweeper.sweep(evals, f"{sp_from.name}-sp-eval", sp_from)
            final = Cost.of(evals, eval_rows)
        else:  # measured on its own tuning seeds
            eval_rows, final = outcome.rows, Cost()
        sides.append(_tuned(side, outcome, tuned_at=target, targets=evals, rows=eval_rows,
                            final=final))  # fmt: skip
    return sides


def _tuned(
    side: Side,
    outcome: Outcome,
    *,
    tuned_at: tuple[int, int],
    targets: list[Run],
    rows: Rows,
    final: Cost,
) -> Tuned:
    """The report of ``side``: ``outcome`` found where it was tuned, ``targets`` measured
    the winner (their rows in ``rows``, their compute ``final``)."""
    flat = flat_config(outcome.winner.config.to_dict())
    done = [rows.get(t.id) for t in targets]
    tuning = outcome.cost
    return Tuned(
        optimizer=side.optimizer, param=side.param, depth_alpha=side.depth_alpha,
        tuned_at=tuned_at, trials=outcome.trials,
        hps={k: flat[k] for k in _swept(outcome.runs) if k in flat}, tuned_loss=outcome.loss,
        target_losses=[row["best_val_loss"] if row and row["status"] == "ok" else None
                       for row in done],
        target_seeds=[t.config.train.seed for t in targets],
        tuning_flops=tuning.flops, tuning_seconds=tuning.seconds, final_flops=final.flops,
        final_seconds=final.seconds, arch=side.arch,
    )  # fmt: skip

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
from ..store import RunStore
from ..sweep import Run, SweepSpec, load_spec, run_id, run_sweep
from .runs import _AtTarget, _placed, _prepare, _target_run


@dataclass(frozen=True)
class Tuned(_AtTarget):
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


def _candidate(run: Run) -> str:
    """Runs that differ only in their seed are one candidate configuration."""
    cfg = run.config
    return run_id(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=0)))


def _side(run: Run) -> tuple[str, str, str, float]:
    c = run.config
    alpha = float(c.param.depth_alpha) if c.param.kind == "mup" else 0.0
    return c.model.arch, c.optim.name, c.param.kind, alpha


def _means(runs: list[Run], rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seed-mean best val loss per candidate; inf for one with a diverged, failed or missing
    seed (never best)."""
    by: dict[str, list[float]] = {}
    for r in runs:
        row = rows.get(r.id)
        ok = row is not None and row["status"] == "ok" and row["best_val_loss"] is not None
        by.setdefault(_candidate(r), []).append(float(row["best_val_loss"]) if ok else math.inf)
    return {c: statistics.fmean(v) if all(map(math.isfinite, v)) else math.inf
            for c, v in by.items()}  # fmt: skip


def _ranked(runs: list[Run], rows: dict[str, dict[str, Any]]) -> list[tuple[str, float]]:
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
    return _placed(spec, dataclasses.replace(cfg, train=train, optim=optim), point)


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
    from ..train import flops_per_token

    if rerank < 0 or rerank_seeds < 1 or eval_seeds < 0 or refine_lr < 0:
        raise ConfigError(
            "--rerank, --refine-lr and --eval-seeds take counts ≥ 0, --rerank-seeds ≥ 1"
        )
    spec, proxies, target_depth = _prepare(
        spec_path, target_width, target_depth, proxy_width, proxy_depth, sp and sp_spec is None
    )
    p_width, p_depth = proxies[0].config.model.width, proxies[0].config.model.depth
    mup = [r for r in proxies if r.config.param.kind == "mup"]
    sp_from = spec if sp_spec is None else load_spec(sp_spec)
    if sp_spec is not None:
        if not sp:
            raise ConfigError("--sp-spec names SP's candidates; pass --sp with it")
        sizes = {(r.config.model.width, r.config.model.depth) for r in sp_from.runs}
        if len(sizes) > 1:
            raise ConfigError(f"{sp_from.path} sweeps several sizes {sorted(sizes)}; keep one")
    sp_pool = proxies if sp_spec is None else sp_from.runs
    sp_targets = [_target_run(sp_from, r, target_width, target_depth)
                  for r in sp_pool if r.config.param.kind == "sp"] if sp else []  # fmt: skip
    if sp and not sp_targets:
        raise ConfigError(f"{sp_from.path} has no SP runs (grid param); add param = ['sp']")
    # extra seeds come after every seed either side's spec uses: reranking, then evaluation
    last = max(r.config.train.seed for r in [*mup, *sp_targets])
    more = list(range(last + 1, last + 1 + rerank_seeds)) if rerank else []
    fresh = list(range(last + 1 + len(more), last + 1 + len(more) + eval_seeds))

    def sweep(runs: list[Run], name: str, where: SweepSpec = spec) -> dict[str, dict[str, Any]]:
        run_sweep(dataclasses.replace(where, name=name, runs=runs), executor=executor,
                  workers=workers, address=address, progress=progress)  # fmt: skip
        with RunStore(where.store, create=False) as store:
            ids = {r.id for r in runs}
            return {row["id"]: row for row in store.rows() if row["id"] in ids}

    def cost(runs: list[Run], rows: dict[str, dict[str, Any]]) -> tuple[float, float]:
        flops = seconds = 0.0
        for r in runs:
            row = rows.get(r.id) or {}
            flops += (row.get("tokens") or 0) * flops_per_token(r.config)
            seconds += row.get("wall_time") or 0.0
        return flops, seconds

    def tune(
        groups: dict[tuple, list[Run]], rows: dict[str, dict[str, Any]], where: SweepSpec, name: str
    ) -> dict[tuple, tuple[list[Run], Run, float, int, dict[str, Any]]]:
        """Per side: (its tuning runs, rerank and LR refinement included, the winning run,
        the winner's seed-mean, the number of candidates, the rows of every run so far)."""

        def first(runs: list[Run], candidate: str) -> Run:
            return next(r for r in runs if _candidate(r) == candidate)

        def winner(side: tuple, pool: list[Run]) -> tuple[Run, float]:
            best, loss = _ranked(pool, rows)[0]
            if not math.isfinite(loss):
                raise ConfigError(
                    f"every candidate of {side[1]} {'μP' if side[2] == 'mup' else 'SP'} "
                    "diverged or failed"
                )
            return first(pool, best), loss

        def train(extra: dict[tuple, list[Run]], suffix: str) -> None:
            nonlocal rows
            if any(extra.values()):
                runs = [r for rs in extra.values() for r in rs]
                rows = {**rows, **sweep(runs, f"{name}-{suffix}", where)}

        extra = {side: [_variant(where, first(runs, c), seed=s)
                        for c, loss in _ranked(runs, rows)[:rerank] if math.isfinite(loss)
                        for s in more]
                 for side, runs in groups.items()}  # fmt: skip
        train(extra, "rerank")
        pools = {}
        for side, runs in groups.items():
            reranked = {_candidate(r) for r in extra[side]}
            pools[side] = [r for r in runs if not reranked or _candidate(r) in reranked]
            pools[side] += extra[side]
        # LR line search at the winner's other HPs, on every seed the winner has
        steps = [k for k in range(-refine_lr, refine_lr + 1) if k]
        bests = {side: winner(side, pool)[0] for side, pool in pools.items()}
        kept = {side: [r for r in pools[side] if _candidate(r) == _candidate(best)]
                for side, best in bests.items()}  # fmt: skip
        lines = {side: [_variant(where, best, seed=r.config.train.seed,
                                 lr=best.config.optim.lr * 2.0**k)
                        for k in steps for r in kept[side]]
                 for side, best in bests.items()}  # fmt: skip
        train(lines, "lr")
        out = {}
        for side, runs in groups.items():
            line = kept[side] + lines[side]
            win, loss = winner(side, line)
            every = [*runs, *extra[side], *lines[side]]
            out[side] = (every, win, loss, len(_means(runs, rows)), rows)
        return out

    def split(runs: list[Run]) -> dict[tuple, list[Run]]:
        groups: dict[tuple, list[Run]] = {}
        for r in runs:
            groups.setdefault(_side(r), []).append(r)
        return groups

    sides: list[Tuned] = []
    tuned = tune(split(mup), sweep(mup, spec.name), spec, spec.name)
    finals = {side: [_target_run(spec, r, target_width, target_depth) for r in
                     ([_variant(spec, winner, seed=s) for s in fresh] if fresh else
                      [r for r in runs if _candidate(r) == _candidate(winner)])]
              for side, (runs, winner, *_) in tuned.items()}  # fmt: skip
    target_rows = sweep([t for ts in finals.values() for t in ts], f"{spec.name}-transfer")
    for side, (runs, winner, loss, n, rows) in tuned.items():
        final = cost(finals[side], target_rows)
        sides.append(_tuned(side, (p_width, p_depth), n, runs, winner, loss, finals[side],
                            target_rows, cost(runs, rows), final))  # fmt: skip
    if sp:
        name = f"{sp_from.name}-sp-at-target"
        at_target = tune(split(sp_targets), sweep(sp_targets, name, sp_from), sp_from,
                         f"{sp_from.name}-sp")  # fmt: skip
        for side, (runs, winner, loss, n, rows) in at_target.items():
            if fresh:
                evals = [_variant(sp_from, winner, seed=s) for s in fresh]
                eval_rows = sweep(evals, f"{sp_from.name}-sp-eval", sp_from)
                final = cost(evals, eval_rows)
            else:  # measured on its own tuning seeds
                evals = [r for r in runs if _candidate(r) == _candidate(winner)]
                eval_rows, final = rows, (0.0, 0.0)
            sides.append(_tuned(side, (target_width, target_depth), n, runs, winner, loss,
                                evals, eval_rows, cost(runs, rows), final))  # fmt: skip
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
    return TunedResult(sides, (p_width, p_depth), (target_width, target_depth), out)


def _tuned(side, tuned_at, n, runs, winner, loss, targets, rows, tuning, final) -> Tuned:
    flat = flat_config(winner.config.to_dict())
    done = [rows.get(t.id) for t in targets]
    return Tuned(
        optimizer=side[1], param=side[2], depth_alpha=side[3], tuned_at=tuned_at, trials=n,
        hps={k: flat[k] for k in _swept(runs) if k in flat}, tuned_loss=loss,
        target_losses=[row["best_val_loss"] if row and row["status"] == "ok" else None
                       for row in done],
        target_seeds=[t.config.train.seed for t in targets],
        tuning_flops=tuning[0], tuning_seconds=tuning[1], final_flops=final[0],
        final_seconds=final[1], arch=side[0],
    )  # fmt: skip

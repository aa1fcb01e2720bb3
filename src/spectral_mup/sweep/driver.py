"""The sweep driver: run what the store lacks, write each result as it arrives."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SmupError
from ..report.data import hp_text
from ..store import RESULTS, RunStore
from ..train import CHECKPOINT, WEIGHTS
from .executors import available_cores, check_reachable, import_ray, run_local, run_ray
from .spec import EXECUTORS, Run, SweepSpec
from .stacks import plan

_WEIGHT_FILES = (CHECKPOINT, WEIGHTS)


@dataclass
class SweepSummary:
    name: str
    store: Path
    total: int
    skipped: int  # stored with a result (ok or diverged): not run again
    retried: int = 0  # stored as failed: run again, the retry replaces the row
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "diverged": 0, "failed": 0})
    lost: int = 0  # runs whose worker process died: not stored, rerun the sweep to retry
    wall_time: float = 0.0

    @property
    def ran(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        c = self.counts
        text = (
            f"sweep {self.name}: {c['ok']} ok, {c['diverged']} diverged, {c['failed']} failed, "
            f"{self.skipped} skipped (already stored) of {self.total} runs in "
            f"{self.wall_time:.1f}s; store {self.store}"
        )
        if self.retried:
            text += f"; {self.retried} retried (stored as failed before)"
        if self.lost:
            text += f"; {self.lost} lost to a dead worker process: rerun to retry them"
        return text


def row_for(sweep: str, run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """The store row (``store.COLUMNS``) of a finished run."""
    cfg = run.config
    return {
        "id": run.id,
        "sweep": sweep,
        "optimizer": cfg.optim.name,
        "param": cfg.param.kind,
        "depth_alpha": float(cfg.param.depth_alpha),
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "seed": cfg.train.seed,
        "status": result["status"],
        "best_val_loss": result.get("best_val_loss"),
        "final_val_loss": result.get("final_val_loss"),
        "train_loss": result.get("final_train_loss"),
        "diverged_step": result.get("diverged_at"),
        "iters": result.get("iters"),
        "tokens": result.get("tokens"),
        "wall_time": result.get("wall_time"),
        "error": result.get("error"),
        "config": cfg.to_dict(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- the driver


def stored_statuses(store: Path) -> dict[str, str]:
    """The ids in an existing store and their statuses (empty when there is no store;
    never creates one)."""
    if not store.is_file():
        return {}
    with RunStore(store, create=False) as s:
        return s.statuses()


def run_sweep(
    spec: SweepSpec,
    *,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    batch_runs: int | None = None,
) -> SweepSummary:
    """Run every run of ``spec`` whose id is not stored with a result (``ok`` or
    ``diverged``): new runs and retries of ``failed`` ones; write each row as it arrives
    (a retry's row replaces the failed one). ``executor``, ``workers``, ``address`` and
    ``batch_runs`` (runs of one shape stacked per task, ``sweep.stacks``; 0 = auto, 1 =
    one run per task) override the spec's."""
    how = _Execution.of(spec, executor, workers, address, batch_runs)
    start = time.perf_counter()
    with RunStore(spec.store) as store:
        stored = store.statuses()
        todo = sorted(
            (r for r in spec.runs if stored.get(r.id) not in RESULTS), key=lambda r: -r.cost
        )
        summary = SweepSummary(
            spec.name,
            spec.store,
            len(spec.runs),
            skipped=len(spec.runs) - len(todo),
            retried=sum(r.id in stored for r in todo),
        )
        if todo:
            from tqdm import tqdm

            bar = tqdm(
                total=len(todo),
                desc=f"sweep {spec.name}",
                unit="run",
                disable=not progress or None,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            try:
                how.execute(todo, _Recorder(spec, store, summary, bar))
            finally:
                bar.close()
    summary.wall_time = time.perf_counter() - start
    return summary


@dataclass(frozen=True)
class _Execution:
    """Where and how a sweep's runs execute (the spec's settings, or their overrides)."""

    spec: SweepSpec
    executor: str
    workers: int
    address: str | None
    batch_runs: int

    @classmethod
    def of(cls, spec, executor, workers, address, batch_runs) -> _Execution:
        """The settings, checked (a Ray address is checked before the store is created)."""
        executor = executor or spec.executor
        if executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {executor!r}; use local or ray")
        workers = spec.workers if workers is None else workers
        if workers < 0:
            raise ConfigError(f"--workers must be >= 0 (0 = auto), got {workers}")
        address = address or spec.address
        batch_runs = spec.batch_runs if batch_runs is None else batch_runs
        if batch_runs < 0:
            raise ConfigError(
                f"--batch-runs must be >= 0 (0 = auto, 1 = one run), got {batch_runs}"
            )
        if executor == "ray" and not import_ray().is_initialized():
            check_reachable(address)
        return cls(spec, executor, workers, address, batch_runs)

    def execute(self, todo: list[Run], on_result: Callable[[Run, Any], None]) -> None:
        if self.executor == "ray":
            tasks = plan(todo, self.batch_runs, self.workers or 1)
            run_ray(tasks, self.workers, on_result, address=self.address,
                    cpus_per_run=self.spec.cpus_per_run)  # fmt: skip
        else:
            n = min(self.workers or available_cores(), len(todo))
            tasks = plan(todo, self.batch_runs, n)
            run_local(tasks, min(n, len(tasks)), on_result)


class _Recorder:
    """Stores each finished run's row as it arrives (and drops its weights unless the
    spec keeps them), counts it in the summary and advances the progress bar."""

    def __init__(self, spec: SweepSpec, store: RunStore, summary: SweepSummary, bar: Any):
        self.spec, self.store, self.summary, self.bar = spec, store, summary, bar

    def __call__(self, run: Run, result: dict[str, Any] | None) -> None:
        summary = self.summary
        if result is None:
            summary.lost += 1
        else:
            self.store.add(row_for(self.spec.name, run, result))
            summary.counts[result["status"]] += 1
            if not self.spec.keep_weights and result["status"] != "failed":
                for name in _WEIGHT_FILES:  # stored: this run never trains again
                    (Path(run.config.train.out_dir) / name).unlink(missing_ok=True)
        self.bar.update(1)
        self.bar.set_postfix({k: v for k, v in summary.counts.items() if v}, refresh=False)


def describe(run: Run) -> str:
    c = run.config
    alpha = "" if c.param.kind == "sp" else f" α={c.param.depth_alpha:g}"
    arch = "" if c.model.arch == "gpt" else f"{c.model.arch} "
    return (
        f"{run.id}  {arch}{c.optim.name} {c.param.kind}{alpha} width={c.model.width} "
        f"depth={c.model.depth} lr={c.optim.lr:.4g} wd={c.optim.weight_decay:g} "
        f"seed={c.train.seed} iters={c.train.max_iters}"
        + "".join(f" {hp_text([(k, v)], short=False)}" for k, v in run.point.items()
                  if "." in k or k == "trial")
    )  # fmt: skip


def _state(status: str | None) -> str:
    """A run's dry-run state from its stored status: stored (a result), retry or todo."""
    return "stored" if status in RESULTS else "retry" if status else "todo"


def dry_run_lines(spec: SweepSpec) -> list[str]:
    """One line per run (``stored``: a result, skipped; ``retry``: stored as failed, run
    again; ``todo``: new) and a count line; writes nothing."""
    try:
        stored = stored_statuses(spec.store)
    except (SmupError, sqlite3.Error) as exc:
        raise SmupError(f"cannot read the store {spec.store}: {exc}") from None
    states = [_state(stored.get(r.id)) for r in spec.runs]
    lines = [f"{state:<6}  {describe(r)}" for state, r in zip(states, spec.runs, strict=True)]
    done, retry = states.count("stored"), states.count("retry")
    again = f" ({retry} retried: stored as failed)" if retry else ""
    lines.append(
        f"sweep {spec.name}: {len(spec.runs)} runs, {done} already stored, "
        f"{len(spec.runs) - done} to run{again}; store {spec.store}, run dirs {spec.out_dir}/<id>"
    )
    return lines

"""``smup sweep SPEC.toml``: a grid of training runs into a SQLite run store.

A sweep spec is a TOML file with four tables::

    [sweep]
    name = "demo"                      # default: the spec file's stem
    base = "../demo.toml"              # RunConfig TOML every run starts from (relative to
                                       # the spec file); default: the built-in defaults
    store = "runs/sweeps/demo.sqlite"  # default runs/sweeps/NAME.sqlite (relative to the cwd)
    out_dir = "runs/sweeps/demo"       # per-run train dirs OUT/<run_id>/; default runs/sweeps/NAME
    workers = 0                        # runs at once; 0 = auto (min(#runs, cores) locally)
    executor = "local"                 # local | ray (the CLI's --executor wins)
    address = ""                       # Ray cluster address ("" = start a local Ray / RAY_ADDRESS)
    cpus_per_run = 0                   # Ray: CPUs per task; 0 = cluster CPUs // workers, or 1
    keep_weights = false               # keep OUT/<id>/checkpoint.pt and model.pt once stored

    [grid]                             # every key optional; a scalar is one value
    optimizer = ["adamw"]              # optim.name
    arch = ["gpt"]                     # model.arch: gpt | llama (the base config's model keys
                                       # the other architecture lacks must hold defaults)
    param = ["sp", "mup"]              # param.kind
    depth_alpha = [1.0]                # param.depth_alpha, μP only: SP runs use α = 0
    width = [64, 128, 256, 512]        # model.width
    depth = [2]                        # model.depth
    lr = { log2_min = -12, log2_max = -4, step = 1 }   # optim.lr: 2^-12 … 2^-4, or a list
    weight_decay = [0.0]               # optim.weight_decay (a list or a log2 table)
    seed = [0, 1]                      # train.seed

    [budget]                           # per run
    steps = 300                        # train.max_iters
    # tokens = 1_000_000               # or: max_iters = ceil(tokens / (batch_size·block_size))
    # patience = 100                   # train.patience (early stop)

    [overrides]                        # any RunConfig key, dotted
    "train.eval_interval" = 50

A grid key left out takes the base config's value. μP runs scale from the base config's
``param.base_width`` and ``param.base_depth`` (the proxy: tune there, transfer to the
grid's widths and depths), which stay fixed across the grid, as in the seed paper.

Every run's config is built (and so validated by ``RunConfig``) before anything runs or
is written: a bad spec is one ``ConfigError`` and no store. Each run has a deterministic id
(:func:`run_id`: a hash of its config), trains in ``OUT/<id>/`` through
:func:`spectral_mup.train.run` (quietly), and its result becomes one row of the
:class:`~spectral_mup.store.RunStore`, written by this driver only, as the run finishes.
Rerunning a spec skips the ids stored with a result (``ok`` or ``diverged``); a run killed
midway resumes from its last checkpoint (bit-exact), so an interrupted sweep ends with the
same rows as an uninterrupted one. A diverged run is a result (status ``diverged``); a run
that raises is stored as ``failed`` with its error, and the sweep goes on; a rerun retries
the failed runs (fix the cause first) and each retry replaces its failed row.

Executors: ``local`` (a process pool with the cores split between workers; one worker runs
in-process) and ``ray`` (the same run function as a Ray task; results come back to the
driver, which writes the store). On a multi-node Ray cluster, ``out_dir`` must be on a
shared filesystem for killed runs to resume, and every node needs the data
(``SMUP_DATA_DIR`` is passed on to the tasks).

Disk: once a run's result is stored the run never trains again, so its checkpoint and
weights are deleted (``OUT/<id>/result.json``, with the loss history, stays) unless
``keep_weights = true``; a failed run's directory is left as it is, to inspect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import train
from .config import RunConfig, _resolve_key, build_config, load_config, retarget_model, tomllib
from .errors import ConfigError, SmupError
from .optim import optimizer_key, resolve_rule
from .store import RESULTS, RunStore
from .train import CHECKPOINT, WEIGHTS

EXECUTORS = ("local", "ray")
# keys that change how a run executes, not what it computes: not part of its id, and free
# to change between a run and its resume (train.RUNTIME_KEYS, one list for both)
RUNTIME_KEYS = {("train", key) for key in train.RUNTIME_KEYS}
# grid key -> RunConfig key, in the order the grid is expanded
GRID_KEYS: dict[str, tuple[str, str]] = {
    "optimizer": ("optim", "name"),
    "param": ("param", "kind"),
    "depth_alpha": ("param", "depth_alpha"),
    "arch": ("model", "arch"),
    "depth": ("model", "depth"),
    "width": ("model", "width"),
    "weight_decay": ("optim", "weight_decay"),
    "lr": ("optim", "lr"),
    "seed": ("train", "seed"),
}
_LOG2_KEYS = ("lr", "weight_decay")  # grid keys that take { log2_min, log2_max, step }
_TABLES = ("sweep", "grid", "budget", "overrides")
_SWEEP_KEYS = (
    "name",
    "base",
    "store",
    "out_dir",
    "workers",
    "executor",
    "address",
    "cpus_per_run",
    "keep_weights",
)
_WEIGHT_FILES = (CHECKPOINT, WEIGHTS)
_BUDGET_KEYS = ("steps", "tokens", "patience")
_SET_BY_SWEEP = {
    ("train", "out_dir"): "[sweep] out_dir (each run trains in OUT/<run_id>)",
    ("train", "progress"): "nothing (per-run progress is always off; the sweep has its own bar)",
    ("train", "resume"): "nothing (runs always resume from their checkpoint)",
}


@dataclass(frozen=True)
class Run:
    """One point of the grid: its id, its full config and the grid values that made it."""

    id: str
    config: RunConfig
    point: dict[str, Any]

    @property
    def cost(self) -> float:
        """Relative compute, to start the largest runs first."""
        m, t = self.config.model, self.config.train
        return m.width * m.width * m.depth * t.max_iters * t.batch_size * m.block_size


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    name: str
    store: Path
    out_dir: Path
    runs: list[Run]
    workers: int = 0
    executor: str = "local"
    address: str | None = None
    cpus_per_run: int = 0
    keep_weights: bool = False


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


# ----------------------------------------------------------------------------- run ids


def canonical_config(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config a run id hashes: :func:`spectral_mup.train.fingerprint` (every key but the
    runtime-only ones, :data:`RUNTIME_KEYS`), sorted."""
    return {
        section: dict(sorted(items.items()))
        for section, items in sorted(train.fingerprint(cfg).items())
    }


def run_id(cfg: RunConfig) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of :func:`canonical_config`: the
    same config gives the same id on every machine, any other config another id."""
    text = json.dumps(canonical_config(cfg), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- the spec


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep spec and build (validate) the config of every run; writes nothing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep spec {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"sweep spec {path} is not UTF-8 text") from None
    _only(raw, _TABLES, f"{path}: unknown table", "tables")
    for table in _TABLES:
        if not isinstance(raw.get(table, {}), dict):
            raise ConfigError(f"{path}: [{table}] must be a table, e.g. [{table}] on its own line")
    sweep = raw.get("sweep", {})
    _only(sweep, _SWEEP_KEYS, f"{path}: unknown key in [sweep]", "keys")
    name = _string(sweep, "name", path.stem, path)
    if not name.strip():
        raise ConfigError(f"{path}: sweep.name is empty; give the sweep a name")
    base = _string(sweep, "base", "", path)
    store = Path(_string(sweep, "store", f"runs/sweeps/{name}.sqlite", path))
    out_dir = Path(_string(sweep, "out_dir", f"runs/sweeps/{name}", path))
    workers = _count(sweep, "workers", path)
    cpus_per_run = _count(sweep, "cpus_per_run", path)
    executor = _string(sweep, "executor", "local", path)
    if executor not in EXECUTORS:
        raise ConfigError(f"{path}: sweep.executor must be local or ray, got {executor!r}")
    address = _string(sweep, "address", "", path) or None
    keep_weights = sweep.get("keep_weights", False)
    if not isinstance(keep_weights, bool):
        raise ConfigError(f"{path}: sweep.keep_weights must be true or false")

    try:
        base_cfg = load_config(path.parent / base if base else None)
    except ConfigError as exc:
        raise ConfigError(f"{path}: sweep.base: {exc}") from None
    values = base_cfg.to_dict()
    grid = _grid(raw.get("grid", {}), path)
    given = {GRID_KEYS[k] for k in grid}
    overridden = _apply_overrides(values, raw.get("overrides", {}), given, path)
    budget = raw.get("budget", {})
    _only(budget, _BUDGET_KEYS, f"{path}: unknown key in [budget]", "keys")
    _apply_budget(values, budget, overridden, path)

    runs: dict[str, Run] = {}
    names = list(grid)
    for combo in itertools.product(*(grid[k] for k in names)):
        point = dict(zip(names, combo, strict=True))
        run_values = {s: dict(items) for s, items in values.items()}
        for key, value in point.items():
            section, option = GRID_KEYS[key]
            run_values[section][option] = value
        if run_values["param"]["kind"] == "sp":
            run_values["param"]["depth_alpha"] = 0.0  # α is a μP rule; SP runs are not repeated
            point.pop("depth_alpha", None)
        run_values["model"] = retarget_model(run_values["model"], base_cfg.model.arch)
        run_values["train"].update(out_dir="", progress=False, resume=True)
        if isinstance(run_values["optim"]["name"], str):  # one id for "AdamW" and "adamw"
            run_values["optim"]["name"] = optimizer_key(run_values["optim"]["name"])
        try:
            cfg = build_config(run_values)
        except ConfigError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"{path}: run {{{where}}}: {exc}") from None
        if budget.get("tokens") is not None:
            per_step = cfg.train.batch_size * cfg.model.block_size
            iters = max(1, math.ceil(budget["tokens"] / per_step))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=iters))
        if "." in cfg.optim.name:  # an imported optimizer: its probed rule must exist now
            resolve_rule(cfg.optim.name, **train.run_optimizer_options(cfg))
        rid = run_id(cfg)
        if rid not in runs:
            section = dataclasses.replace(cfg.train, out_dir=str(out_dir / rid))
            runs[rid] = Run(rid, dataclasses.replace(cfg, train=section), point)
    return SweepSpec(
        path=path,
        name=name,
        store=store,
        out_dir=out_dir,
        runs=list(runs.values()),
        workers=workers,
        executor=executor,
        address=address,
        cpus_per_run=cpus_per_run,
        keep_weights=keep_weights,
    )


def restrict(spec: SweepSpec, only: Iterable[str]) -> SweepSpec:
    """The runs of ``spec`` whose grid point matches every ``KEY=VALUE`` of ``only`` (a value
    compares as text, or as a number where both are numbers: ``lr=0.0078125``)."""
    runs = spec.runs
    for item in only:
        key, sep, text = item.partition("=")
        if not sep or key not in GRID_KEYS:
            raise ConfigError(
                f"--only needs KEY=VALUE with KEY a grid key ({', '.join(GRID_KEYS)}); got {item!r}"
            )
        runs = [r for r in runs if key in r.point and _same(r.point[key], text)]
        if not runs:
            raise ConfigError(f"--only {item} matches no run of {spec.path}")
    return dataclasses.replace(spec, runs=runs)


def _same(value: Any, text: str) -> bool:
    if str(value).lower() == text.lower():
        return True
    try:
        return not isinstance(value, str) and float(value) == float(text)
    except ValueError:
        return False


def _only(table: dict[str, Any], allowed: Iterable[str], what: str, kind: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{what} {unknown[0]!r}; valid {kind}: {', '.join(allowed)}")


def _string(table: dict[str, Any], key: str, default: str, path: Path) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f'{path}: sweep.{key} must be a string, e.g. {key} = "..."')
    return value


def _count(table: dict[str, Any], key: str, path: Path) -> int:
    value = table.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: sweep.{key} must be an integer >= 0 (0 = auto), got {value!r}")
    return value


def _grid(table: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    _only(table, GRID_KEYS, f"{path}: unknown key in [grid]", "keys")
    if not table:
        raise ConfigError(
            f"{path}: the [grid] table is empty; give at least one of {', '.join(GRID_KEYS)} "
            "(one run is `smup train`)"
        )
    grid: dict[str, list[Any]] = {}
    for key in GRID_KEYS:  # a fixed expansion order, whatever the order in the file
        if key not in table:
            continue
        value = table[key]
        if isinstance(value, dict):
            if key not in _LOG2_KEYS:
                raise ConfigError(f"{path}: grid.{key} must be a value or a list of values")
            values = _log2_range(key, value, path)
        elif isinstance(value, list):
            values = value
        else:
            values = [value]
        if not values:
            raise ConfigError(f"{path}: grid.{key} is an empty list; give at least one value")
        for v in values:
            if isinstance(v, list | dict):
                raise ConfigError(f"{path}: grid.{key} must be a flat list of values, got {v!r}")
        if key == "optimizer":
            values = [optimizer_key(v) if isinstance(v, str) else v for v in values]
        if key == "param":
            bad = [v for v in values if v not in ("sp", "mup")]
            if bad:
                raise ConfigError(f"{path}: grid.param values are sp or mup, got {bad[0]!r}")
        grid[key] = list(dict.fromkeys(values))  # drop repeats, keep order
    return grid


def _log2_range(key: str, table: dict[str, Any], path: Path) -> list[float]:
    needed = ("log2_min", "log2_max", "step")
    example = f"{key} = {{ log2_min = -12, log2_max = -4, step = 1 }}"
    if set(table) != set(needed):
        raise ConfigError(
            f"{path}: grid.{key} as a table needs exactly log2_min, log2_max and step, "
            f"e.g. {example}"
        )
    lo, hi, step = (table[k] for k in needed)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (lo, hi, step)):
        raise ConfigError(f"{path}: grid.{key} log2_min, log2_max and step must be numbers")
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(step)) or step <= 0:
        raise ConfigError(f"{path}: grid.{key} step must be a number > 0, e.g. {example}")
    if lo > hi:
        raise ConfigError(f"{path}: grid.{key} log2_min {lo} is above log2_max {hi}; swap them")
    count = math.floor((hi - lo) / step + 1e-9) + 1
    if count > 1000:
        raise ConfigError(f"{path}: grid.{key} has {count} values; use a larger step")
    return [2.0 ** (lo + i * step) for i in range(count)]


def _flatten(table: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _apply_overrides(
    values: dict[str, dict[str, Any]],
    table: dict[str, Any],
    grid_keys: set[tuple[str, str]],
    path: Path,
) -> set[tuple[str, str]]:
    """Set the [overrides] keys in ``values``; return them as (section, key)."""
    by_config = {v: k for k, v in GRID_KEYS.items()}
    done = set()
    for key, value in _flatten(table):
        try:
            section, name = _resolve_key(key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [overrides]: {exc}") from None
        if (section, name) in _SET_BY_SWEEP:
            raise ConfigError(
                f"{path}: [overrides] {section}.{name} is set by the sweep; "
                f"set {_SET_BY_SWEEP[section, name]} instead"
            )
        if (section, name) in grid_keys:
            raise ConfigError(
                f"{path}: {section}.{name} is in both [grid] ({by_config[section, name]}) "
                "and [overrides]; keep one"
            )
        values[section][name] = value
        done.add((section, name))
    return done


def _apply_budget(
    values: dict[str, dict[str, Any]],
    budget: dict[str, Any],
    overridden: set[tuple[str, str]],
    path: Path,
) -> None:
    for key in _BUDGET_KEYS:
        value = budget.get(key)
        if value is None:
            continue
        least = 0 if key == "patience" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{path}: budget.{key} must be an integer >= {least}, got {value!r}")
    if budget.get("steps") is not None and budget.get("tokens") is not None:
        raise ConfigError(f"{path}: give budget.steps or budget.tokens, not both")
    for key, option in (("steps", "max_iters"), ("tokens", "max_iters"), ("patience", "patience")):
        if budget.get(key) is not None and ("train", option) in overridden:
            raise ConfigError(
                f"{path}: train.{option} is in both [budget] ({key}) and [overrides]; keep one"
            )
    if budget.get("steps") is not None:
        values["train"]["max_iters"] = budget["steps"]
    if budget.get("patience") is not None:
        values["train"]["patience"] = budget["patience"]


# ----------------------------------------------------------------------------- one run


def _train_run(cfg: RunConfig) -> dict[str, Any]:
    return train.run(cfg, log=None)


def execute(cfg: RunConfig) -> dict[str, Any]:
    """Train one run; never raises for an ordinary exception: a failure is a result
    (status ``failed``, ``error`` = exception type and first line of its message)."""
    try:
        result = _train_run(cfg)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return {"status": "failed", "error": error[:500]}
    keep = (
        "status",
        "best_val_loss",
        "final_val_loss",
        "final_train_loss",
        "diverged_at",
        "iters",
        "tokens",
        "wall_time",
    )
    return {k: result.get(k) for k in keep}


def _execute_with_threads(cfg: RunConfig, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    return execute(cfg)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- executors

OnResult = Callable[[Run, dict[str, Any] | None], None]  # None: the run was lost


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def run_local(runs: list[Run], workers: int, on_result: OnResult) -> None:
    """A spawn process pool of ``workers`` processes, each with cores // workers torch
    threads; one worker runs in this process."""
    threads = max(1, available_cores() // workers)
    if workers == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for run in runs:
                on_result(run, execute(run.config))
        finally:
            torch.set_num_threads(before)
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_threads,
        initargs=(threads,),
    )
    # SIGTERM (kill, pkill, a scheduler's stop) would end this process at once and orphan
    # the workers, which then train on for hours: turn it into an exit that stops them
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main else None
    try:
        futures: dict[Future, Run] = {pool.submit(execute, run.config): run for run in runs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except BrokenProcessPool:
                    result = None
                on_result(futures[future], result)
    except BaseException:
        # Ctrl-C or a store error: stop the runs in flight (they resume from their
        # checkpoints next time) instead of waiting for them to finish
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
    pool.shutdown(wait=True)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SmupError(
            "--executor ray needs Ray: pip install 'spectral-mup[ray]' (or use --executor local)"
        ) from None
    return ray


def _check_reachable(address: str | None) -> None:
    """Fail fast on a cluster address nothing listens at (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise SmupError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix --address"
        ) from None


def run_ray(
    runs: list[Run],
    workers: int,
    on_result: OnResult,
    *,
    address: str | None = None,
    cpus_per_run: int = 0,
) -> None:
    """Each run a Ray task (``num_cpus`` = ``cpus_per_run``, else the cluster's CPUs //
    ``workers``, else 1), at most ``workers`` in flight; results return to the driver."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        _check_reachable(address)
        kwargs: dict[str, Any] = {
            "address": address,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if address is None:
            kwargs["include_dashboard"] = False
        env = {k: os.environ[k] for k in ("SMUP_DATA_DIR",) if os.environ.get(k)}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "a local Ray instance"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SmupError(f"cannot start or reach Ray at {where}: {reason}") from None
        started = True
    try:
        if cpus_per_run:
            cpus = cpus_per_run
        elif workers:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        else:
            cpus = 1
        task = ray.remote(num_cpus=cpus, max_retries=0)(_execute_with_threads)
        limit = workers or len(runs)
        queue = list(runs)
        in_flight: dict[Any, Run] = {}
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                run = queue.pop(0)
                in_flight[task.remote(run.config, cpus)] = run
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                run = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError:  # the worker died; the task is not a result
                    result = None
                on_result(run, result)
    finally:
        if started:
            ray.shutdown()


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
) -> SweepSummary:
    """Run every run of ``spec`` whose id is not stored with a result (``ok`` or
    ``diverged``): new runs and retries of ``failed`` ones; write each row as it arrives
    (a retry's row replaces the failed one). ``executor``, ``workers`` and ``address``
    override the spec's."""
    executor = executor or spec.executor
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use local or ray")
    workers = spec.workers if workers is None else workers
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 = auto), got {workers}")
    address = address or spec.address
    if executor == "ray" and not import_ray().is_initialized():
        _check_reachable(address)  # before the store is created
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

            def on_result(run: Run, result: dict[str, Any] | None) -> None:
                if result is None:
                    summary.lost += 1
                else:
                    store.add(row_for(spec.name, run, result))
                    summary.counts[result["status"]] += 1
                    if not spec.keep_weights and result["status"] != "failed":
                        for name in _WEIGHT_FILES:  # stored: this run never trains again
                            (Path(run.config.train.out_dir) / name).unlink(missing_ok=True)
                bar.update(1)
                bar.set_postfix({k: v for k, v in summary.counts.items() if v}, refresh=False)

            try:
                if executor == "ray":
                    run_ray(
                        todo,
                        workers,
                        on_result,
                        address=address,
                        cpus_per_run=spec.cpus_per_run,
                    )
                else:
                    n = workers or min(len(todo), available_cores())
                    run_local(todo, min(n, len(todo)), on_result)
            finally:
                bar.close()
    summary.wall_time = time.perf_counter() - start
    return summary


def describe(run: Run) -> str:
    c = run.config
    alpha = "" if c.param.kind == "sp" else f" α={c.param.depth_alpha:g}"
    arch = "" if c.model.arch == "gpt" else f"{c.model.arch} "
    return (
        f"{run.id}  {arch}{c.optim.name} {c.param.kind}{alpha} width={c.model.width} "
        f"depth={c.model.depth} lr={c.optim.lr:.4g} wd={c.optim.weight_decay:g} "
        f"seed={c.train.seed} iters={c.train.max_iters}"
    )


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

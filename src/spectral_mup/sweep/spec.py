"""A sweep spec (``smup sweep SPEC.toml``) read into runs, each with a deterministic id.

The spec's format and what a sweep does with it: ``spectral_mup.sweep`` (the package's
docstring).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RUNTIME_KEYS as RUNTIME_KEYS_OF_TRAIN
from ..config import (
    RunConfig,
    build_config,
    fingerprint,
    load_config,
    optimizer_options,
    resolve_key,
    retarget_model,
    tomllib,
)
from ..errors import ConfigError
from ..optim import optimizer_key, resolve_rule
from ..report.data import paired_argmin

EXECUTORS = ("local", "ray")
# keys that change how a run executes, not what it computes: not part of its id, and free
# to change between a run and its resume (config.RUNTIME_KEYS, one list for both)
RUNTIME_KEYS = {("train", key) for key in RUNTIME_KEYS_OF_TRAIN}
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
_LOG2_KEYS = ("lr", "weight_decay")  # short grid keys that take { log2_min, log2_max, step }
_LOG2_FIELDS = ("log2_min", "log2_max", "step")
_TABLES = ("sweep", "grid", "search", "budget", "overrides")
_SEARCH_KEYS = ("trials", "seed")  # the rest of [search] are the sampled config keys
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
    "batch_runs",
)
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
    batch_runs: int = 0  # runs stacked per task (sweep.stacks): 0 = auto, 1 = none


# ----------------------------------------------------------------------------- run ids


def canonical_config(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config a run id hashes: :func:`spectral_mup.config.fingerprint` (every key but the
    runtime-only ones, :data:`RUNTIME_KEYS`), sorted."""
    return {
        section: dict(sorted(items.items())) for section, items in sorted(fingerprint(cfg).items())
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
    batch_runs = _count(sweep, "batch_runs", path)
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
    grid = _grid(raw.get("grid", {}), path, search="search" in raw)
    trials = _search(raw.get("search"), set(map(config_key, grid)), path)
    given = {config_key(k): f"[grid] ({k})" for k in grid}
    given |= {config_key(k): f"[search] ({k})" for k in trials[0]}
    overridden = _apply_overrides(values, raw.get("overrides", {}), given, path)
    budget = raw.get("budget", {})
    _only(budget, _BUDGET_KEYS, f"{path}: unknown key in [budget]", "keys")
    _apply_budget(values, budget, overridden, path)

    runs: dict[str, Run] = {}
    names = list(grid)
    combos = itertools.product(*(grid[k] for k in names))
    for combo, (trial, sample) in itertools.product(combos, enumerate(trials)):
        point = dict(zip(names, combo, strict=True)) | sample
        settings = dict(point)
        if sample:
            point["trial"] = trial
        cfg = _run_config(values, settings, point, base_cfg.model.arch, budget, path)
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
        batch_runs=batch_runs,
    )


def _run_config(
    values: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    point: dict[str, Any],
    base_arch: str,
    budget: dict[str, Any],
    path: Path,
) -> RunConfig:
    """The config of the run at grid ``point`` (its config keys ``settings``, and the
    search trial; an SP run's ``depth_alpha`` is dropped from it: α is a μP rule) over the
    base ``values``, its token ``budget`` applied and an imported optimizer's probed rule
    checked."""
    run_values = {s: dict(items) for s, items in values.items()}
    for key, value in settings.items():
        section, option = config_key(key)
        run_values[section][option] = value
    if run_values["param"]["kind"] == "sp":
        run_values["param"]["depth_alpha"] = 0.0  # α is a μP rule; SP runs are not repeated
        point.pop("depth_alpha", None)
    run_values["model"] = retarget_model(run_values["model"], base_arch)
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
        resolve_rule(cfg.optim.name, **optimizer_options(cfg))
    return cfg


def restrict(spec: SweepSpec, only: Iterable[str]) -> SweepSpec:
    """The runs of ``spec`` whose grid point matches every ``KEY=VALUE`` of ``only`` (a value
    compares as text, or as a number where both are numbers: ``lr=0.0078125``)."""
    runs = spec.runs
    for item in only:
        key, sep, text = item.partition("=")
        if not sep or not (key in GRID_KEYS or key == "trial" or "." in key):
            raise ConfigError(
                f"--only needs KEY=VALUE with KEY a grid key ({', '.join(GRID_KEYS)}), a swept "
                f"dotted config key or trial; got {item!r}"
            )
        runs = [r for r in runs if key in r.point and _same(r.point[key], text)]
        if not runs:
            raise ConfigError(f"--only {item} matches no run of {spec.path}")
    return dataclasses.replace(spec, runs=runs)


def near_best(spec: SweepSpec, steps: int, rows: dict[str, dict[str, Any]]) -> SweepSpec:
    """The runs of ``spec`` at most ``steps`` LR grid steps from their group's best LR, a
    group being the runs that differ only in LR and seed, and its best LR the argmin of the
    seed-mean best val loss over the stored ``rows`` (by run id), compared on shared seeds as
    ``smup report`` does (``report.paired_argmin``; a diverged seed makes an LR never best).
    A group with an LR not yet finished keeps every run: it cannot be judged. For spending
    more seeds where they decide the optimum (``--near-best``)."""
    if steps < 0:
        raise ConfigError(f"--near-best takes a number of LR grid steps ≥ 0, got {steps}")
    if any("lr" not in r.point for r in spec.runs):
        raise ConfigError(f"--near-best needs an LR grid ([grid] lr) in {spec.path}")
    groups: dict[str, list[Run]] = {}
    for r in spec.runs:
        rest = {k: v for k, v in r.point.items() if k not in ("lr", "seed")}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(r)
    keep: set[str] = set()
    for runs in groups.values():
        losses: dict[float, dict[int, float]] = {}
        for r in runs:
            row = rows.get(r.id)
            if row is None or row["status"] not in ("ok", "diverged"):
                continue
            ok = row["status"] == "ok" and row["best_val_loss"] is not None
            loss = float(row["best_val_loss"]) if ok else math.inf
            losses.setdefault(r.point["lr"], {})[r.point.get("seed", 0)] = loss
        lrs = sorted({r.point["lr"] for r in runs})
        if set(losses) != set(lrs):
            keep.update(r.id for r in runs)
            continue
        finite = {lr: by for lr, by in losses.items() if all(map(math.isfinite, by.values()))}
        best_lr = paired_argmin(finite)
        best = lrs.index(best_lr) if best_lr is not None else 0
        near = {lr for i, lr in enumerate(lrs) if abs(i - best) <= steps}
        keep.update(r.id for r in runs if r.point["lr"] in near)
    return dataclasses.replace(spec, runs=[r for r in spec.runs if r.id in keep])


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


def config_key(key: str) -> tuple[str, str]:
    """The RunConfig (section, key) a grid or search key sets: a short grid key
    (:data:`GRID_KEYS`) or any dotted config key (``"param.lr_input"``)."""
    return GRID_KEYS[key] if key in GRID_KEYS else resolve_key(key)


def _sweepable(key: str, path: Path, table: str) -> str:
    """``key`` as the grid names it: its short name when it has one, else section.key."""
    if key in GRID_KEYS:
        return key
    if "." not in key:
        raise ConfigError(
            f"{path}: unknown key in [{table}] {key!r}; use a grid key "
            f'({", ".join(GRID_KEYS)}) or a quoted dotted config key, e.g. "param.lr_input"'
        )
    try:
        section, name = resolve_key(key)
    except ConfigError as exc:
        raise ConfigError(f"{path}: [{table}] {exc}") from None
    short = {v: k for k, v in GRID_KEYS.items()}.get((section, name))
    if short is not None:
        return short
    if (section, name) in _SET_BY_SWEEP or (section, name) in RUNTIME_KEYS:
        raise ConfigError(
            f"{path}: [{table}] {section}.{name} does not change what a run computes; "
            "it cannot be swept"
        )
    return f"{section}.{name}"


def _dotted(table: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Keys of a grid or search table, nested tables flattened to dotted keys (a log2 range
    table is a value)."""
    for key, value in table.items():
        if isinstance(value, dict) and not set(value) <= {*_LOG2_FIELDS, "min", "max"}:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _grid(table: dict[str, Any], path: Path, *, search: bool = False) -> dict[str, list[Any]]:
    if not table and not search:
        raise ConfigError(
            f"{path}: the [grid] table is empty; give at least one of {', '.join(GRID_KEYS)} "
            "or a dotted config key (one run is `smup train`)"
        )
    given: dict[str, Any] = {}
    for key, value in _dotted(table):
        name = _sweepable(key, path, "grid")
        if name in given:
            raise ConfigError(f"{path}: grid key {name} is given twice ({key!r}); keep one")
        given[name] = value
    order = [k for k in GRID_KEYS if k in given] + [k for k in given if k not in GRID_KEYS]
    grid: dict[str, list[Any]] = {}
    for key in order:  # a fixed expansion order for the short keys, then the file's
        value = given[key]
        if isinstance(value, dict):
            if key in GRID_KEYS and key not in _LOG2_KEYS:
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


def _search(
    table: dict[str, Any] | None, in_grid: set[tuple[str, str]], path: Path
) -> list[dict[str, Any]]:
    """The [search] table's trials: ``trials`` samples (seeded by ``seed``, default 0) of
    every other key — ``{ log2_min, log2_max }`` log-uniform, ``{ min, max }`` uniform, a
    list: one of its values — rounded to 4 significant digits. No table: one empty trial."""
    if table is None:
        return [{}]
    trials, seed = table.get("trials"), table.get("seed", 0)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"{path}: search.trials must be an integer >= 1, got {trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{path}: search.seed must be an integer, got {seed!r}")
    space: dict[str, Any] = {}
    for key, value in _dotted({k: v for k, v in table.items() if k not in _SEARCH_KEYS}):
        name = _sweepable(key, path, "search")
        if config_key(name) in in_grid:
            raise ConfigError(f"{path}: {name} is in both [grid] and [search]; keep one")
        space[name] = _distribution(name, value, path)
    if not space:
        raise ConfigError(
            f"{path}: [search] samples nothing; add a key, e.g. "
            '"param.lr_input" = { log2_min = -2, log2_max = 2 }'
        )
    rng = random.Random(seed)
    return [{k: space[k](rng) for k in sorted(space)} for _ in range(trials)]


def _distribution(key: str, value: Any, path: Path) -> Callable[[random.Random], Any]:
    def rounded(x: float) -> float:
        return float(f"{x:.4g}")

    if isinstance(value, list) and value and not any(isinstance(v, list | dict) for v in value):
        return lambda rng: rng.choice(value)
    if isinstance(value, dict) and set(value) in ({"log2_min", "log2_max"}, {"min", "max"}):
        lo, hi = value.get("log2_min", value.get("min")), value.get("log2_max", value.get("max"))
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (lo, hi)):
            raise ConfigError(f"{path}: search.{key} bounds must be numbers")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ConfigError(f"{path}: search.{key} needs finite bounds with min <= max")
        if "log2_min" in value:
            return lambda rng: rounded(2.0 ** rng.uniform(lo, hi))
        return lambda rng: rounded(rng.uniform(lo, hi))
    raise ConfigError(
        f"{path}: search.{key} must be a non-empty list of values, "
        "{ log2_min = A, log2_max = B } (log-uniform) or { min = A, max = B } (uniform)"
    )


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
    grid_keys: dict[tuple[str, str], str],
    path: Path,
) -> set[tuple[str, str]]:
    """Set the [overrides] keys in ``values``; return them as (section, key)."""
    done = set()
    for key, value in _flatten(table):
        try:
            section, name = resolve_key(key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [overrides]: {exc}") from None
        if (section, name) in _SET_BY_SWEEP:
            raise ConfigError(
                f"{path}: [overrides] {section}.{name} is set by the sweep; "
                f"set {_SET_BY_SWEEP[section, name]} instead"
            )
        if (section, name) in grid_keys:
            raise ConfigError(
                f"{path}: {section}.{name} is in both {grid_keys[section, name]} "
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

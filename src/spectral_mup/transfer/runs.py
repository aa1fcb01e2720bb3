"""Proxy and target runs: which runs of a spec are the proxy, and each one's run at the target
size, placed in the spec's store and run dirs like any run of a sweep; how they train
(``Sweeper``); and what a transferred setting shows at the target (``AtTarget``)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from ..store import RunStore
from ..sweep import Run, SweepSpec, load_spec, run_id, run_sweep


class AtTarget:
    """What the target runs of a transferred setting show (``target_losses``, per seed)."""

    target_losses: list[float | None]

    @property
    def target_loss(self) -> float:
        """Seed-mean best val loss at the target; inf when any seed diverged or failed."""
        if not self.target_losses or any(v is None for v in self.target_losses):
            return math.inf
        return statistics.fmean(v for v in self.target_losses if v is not None)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        out["target_loss"] = self.target_loss if math.isfinite(self.target_loss) else None
        return out


def _proxy_runs(spec: SweepSpec, width: int | None, depth: int | None) -> list[Run]:
    widths = sorted({r.config.model.width for r in spec.runs})
    depths = sorted({r.config.model.depth for r in spec.runs})
    for name, given, sizes in (("width", width, widths), ("depth", depth, depths)):
        if given is None and len(sizes) > 1:
            raise ConfigError(
                f"{spec.path} sweeps {name}s {sizes}; pass --proxy-{name} to pick the proxy"
            )
        if given is not None and given not in sizes:
            raise ConfigError(f"--proxy-{name} {given} is not in the spec's {name}s {sizes}")
    width = widths[0] if width is None else width
    depth = depths[0] if depth is None else depth
    return [r for r in spec.runs if (r.config.model.width, r.config.model.depth) == (width, depth)]


def placed(spec: SweepSpec, cfg: RunConfig, point: dict[str, Any]) -> Run:
    """``cfg`` as a run of ``spec``: its own id and run dir under the spec's out_dir."""
    rid = run_id(cfg)
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, out_dir=str(spec.out_dir / rid))
    )
    return Run(rid, cfg, point)


def target_run(spec: SweepSpec, proxy: Run, width: int, depth: int) -> Run:
    cfg = dataclasses.replace(proxy.config, model=proxy.config.model.resized(width, depth))
    return placed(spec, cfg, {**proxy.point, "width": width, "depth": depth})


def prepare(
    spec_path: str | Path,
    target_width: int,
    target_depth: int | None,
    proxy_width: int | None,
    proxy_depth: int | None,
    sp: bool,
) -> tuple[SweepSpec, list[Run], int]:
    """The spec, its proxy runs and the target depth, every input checked and every target
    config built (so validated) before anything trains."""
    spec = load_spec(spec_path)
    proxies = _proxy_runs(spec, proxy_width, proxy_depth)
    depth = proxies[0].config.model.depth if target_depth is None else target_depth
    if target_width <= 0 or depth <= 0:
        raise ConfigError("--target-width and --target-depth must be positive integers")
    kinds = {r.config.param.kind for r in proxies}
    if "mup" not in kinds:
        raise ConfigError(f"{spec.path} has no μP runs (grid param); add param = ['mup']")
    if sp and "sp" not in kinds:
        raise ConfigError(f"--sp needs SP runs in {spec.path}; add 'sp' to the grid's param")
    for proxy in proxies:
        target_run(spec, proxy, target_width, depth)
    return spec, proxies, depth


@dataclass(frozen=True)
class Sweeper:
    """Trains runs through the sweep driver, with the CLI's executor settings, and reads
    their rows back from the store."""

    executor: str | None
    workers: int | None
    address: str | None
    progress: bool

    def sweep(self, runs: list[Run], name: str, where: SweepSpec) -> dict[str, dict[str, Any]]:
        """``runs`` trained as the sweep ``name`` of ``where`` (stored ones are skipped): the
        store row of each, by run id."""
        run_sweep(dataclasses.replace(where, name=name, runs=runs), executor=self.executor,
                  workers=self.workers, address=self.address, progress=self.progress)  # fmt: skip
        with RunStore(where.store, create=False) as store:
            ids = {r.id for r in runs}
            return {row["id"]: row for row in store.rows() if row["id"] in ids}

"""``smup transfer`` without ``--tune``: the proxy's best LR per setting, trained at the
target (steps 1–4 of the package docstring)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import write_json
from ..report import Study, StudyKey, build_studies
from ..sweep import Run, SweepSpec
from .runs import AtTarget, Sweeper, prepare, target_run


@dataclass(frozen=True)
class Arm(AtTarget):
    """One transferred setting: the proxy's optimum and the target's result with it."""

    optimizer: str
    param: str
    depth_alpha: float
    weight_decay: float
    lr: float
    proxy_loss: float
    proxy_std: float
    target_losses: list[float | None]  # per seed; None where the run diverged or failed
    target_status: list[str]
    arch: str = "gpt"  # the bundled model (model.arch)


@dataclass(frozen=True)
class TransferResult:
    arms: list[Arm]
    proxy: tuple[int, int]  # (width, depth)
    target: tuple[int, int]
    path: Path  # the JSON written

    def lines(self) -> list[str]:
        return comparison_lines(self.arms, self.proxy, self.target)


def run_transfer(
    spec_path: str | Path,
    target_width: int,
    target_depth: int | None = None,
    *,
    proxy_width: int | None = None,
    proxy_depth: int | None = None,
    sp: bool = False,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> TransferResult:
    """Steps 1–4 of the package docstring."""
    spec, proxies, target_depth = prepare(
        spec_path, target_width, target_depth, proxy_width, proxy_depth, sp
    )
    p_width, p_depth = proxies[0].config.model.width, proxies[0].config.model.depth
    target = (target_width, target_depth)
    sweeper = Sweeper(executor, workers, address, progress)
    rows = sweeper.sweep(proxies, spec.name, spec)
    chosen = [
        _Choice.of(study, p_width if study.key.axis == "width" else p_depth, spec, proxies, target)
        for study in build_studies(list(rows.values()))
        if study.key.param != "sp" or sp
    ]
    targets = [t for choice in chosen for t in choice.targets]
    by_id = sweeper.sweep(targets, f"{spec.name}-transfer", spec)
    arms = [choice.arm(by_id) for choice in chosen]
    out = spec.store.parent / f"transfer_{target_width}x{target_depth}.json"
    write_json(
        out,
        {
            "spec": str(spec.path),
            "proxy": {"width": p_width, "depth": p_depth},
            "target": {"width": target_width, "depth": target_depth},
            "arms": [a.to_json() for a in arms],
        },
    )
    return TransferResult(arms, (p_width, p_depth), target, out)


@dataclass(frozen=True)
class _Choice:
    """The proxy's best LR of one study (its seed-mean and spread there) and the target
    runs that train it, one per seed."""

    key: StudyKey
    lr: float
    proxy_loss: float
    proxy_std: float
    targets: list[Run]

    @classmethod
    def of(
        cls,
        study: Study,
        size: int,
        spec: SweepSpec,
        proxies: list[Run],
        target: tuple[int, int],
    ) -> _Choice:
        """``study``'s best LR at the proxy ``size``; an error when every LR diverged."""
        key = study.key
        lr = study.best_lr(size)
        if lr is None:
            raise ConfigError(
                f"every proxy LR of {key.optimizer} {key.param} diverged or failed; widen the "
                "LR grid downwards"
            )
        cell = study.cell(lr, size)
        seeds = [
            r
            for r in proxies
            if r.config.optim.lr == lr
            and r.config.param.kind == key.param
            and r.config.optim.name == key.optimizer
            and r.config.optim.weight_decay == key.weight_decay
            and r.config.model.arch == key.arch
            and (key.param == "sp" or r.config.param.depth_alpha == key.depth_alpha)
        ]
        targets = [target_run(spec, r, *target) for r in seeds]
        return cls(key, lr, cell.value, cell.std, targets)

    def arm(self, rows: dict[str, dict[str, Any]]) -> Arm:
        """The transferred setting, its target runs' store rows in ``rows``."""
        key = self.key
        done = [rows.get(t.id) for t in self.targets]
        return Arm(
            optimizer=key.optimizer,
            param=key.param,
            depth_alpha=float(key.depth_alpha or 0.0),
            weight_decay=key.weight_decay,
            lr=self.lr,
            proxy_loss=self.proxy_loss,
            proxy_std=self.proxy_std,
            target_losses=[
                row["best_val_loss"] if row and row["status"] == "ok" else None for row in done
            ],
            target_status=[row["status"] if row else "lost" for row in done],
            arch=key.arch,
        )


def comparison_lines(arms: list[Arm], proxy: tuple[int, int], target: tuple[int, int]) -> list[str]:
    """The printed comparison: one line per arm."""
    archs = len({a.arch for a in arms}) > 1
    lines = [
        f"proxy width {proxy[0]} depth {proxy[1]} → target width {target[0]} depth {target[1]}",
        ("| model " if archs else "")
        + f"| {'optimizer':<9} | {'param':<6} | {'lr (proxy best)':>15} | {'proxy val':>14} "
        f"| {'target val':>14} |",
    ]
    for a in arms:
        label = "μP" if a.param == "mup" else "SP"
        proxy_text = f"{a.proxy_loss:.4f}" + (
            f" ± {a.proxy_std:.3f}" if math.isfinite(a.proxy_std) else ""
        )
        finite = [v for v in a.target_losses if v is not None]
        if math.isfinite(a.target_loss):
            spread = statistics.stdev(finite) if len(finite) > 1 else math.nan
            target_text = f"{a.target_loss:.4f}" + (
                f" ± {spread:.3f}" if math.isfinite(spread) else ""
            )
        else:
            target_text = "/".join(a.target_status)
        lines.append(
            (f"| {a.arch:<5} " if archs else "")
            + f"| {a.optimizer:<9} | {label:<6} | {a.lr:>15.3g} | {proxy_text:>14} "
            f"| {target_text:>14} |"
        )
    return lines

"""What a probe measured and the rule it derived (``ProbeResult``): its table, plot and JSON
file (which ``optim.probed.load_rule`` reads back as a rule)."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import rules
from ..errors import ConfigError
from ..fileio import atomic_write, write_json
from ..optim.probed import FORMAT, jsonable, rule_from_json, rule_to_json
from .fit import decay_in_direction, derive_rule, follows_weight
from .measure import GROUPS


@dataclass
class ProbeResult:
    """What the probe measured and the rule it derived (``rule``)."""

    optimizer: str
    options: dict[str, Any]
    widths: list[int]
    depths: list[int]
    seeds: list[int]
    steps: int
    lr: float
    exponents: dict[str, list[float]]
    """group → [fitted width exponent of the effective update's norm ‖c·ΔW‖ (``_norm_of``),
    spread over seeds × steps]."""
    data_exponents: dict[str, list[float]]
    """The same for its norm on the data, ‖c·ΔW·X‖/‖X‖."""
    depth_exponents: list[float]
    """[exponent of the in-block raw update norm vs depth (α = 1), spread]: −k predicted."""
    k: list[float]
    """[gradient degree k, spread over tensors and steps]."""
    eps: dict[str, str | None]
    eps_response: dict[str, dict[str, float]]
    decay_ratio: float
    """‖ΔW(λ) − ΔW(0)‖ / (lr·λ·‖W‖): 1 for torch-style decay, else λ is inside the update."""
    weight_ratio: float
    """‖ΔW(2W)‖ / ‖ΔW(W)‖: 2 when the update follows ‖W‖ (LAMB), 1 otherwise."""
    nearest: dict[str, list[Any]]
    """group → [nearest known family, its exponent]."""
    families: dict[str, str]
    """role → the family the rule uses (a known family's name, or "fitted")."""
    rule: rules.OptimizerRule | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    skip: int = 0
    model: str = "gpt"
    """The probed model: a bundled arch, or the factory's name."""

    # ---- output

    def table(self) -> str:
        """Markdown: per group, the fitted exponent ± spread and the nearest known family."""
        lines = [
            f"probe of {self.optimizer} on {self.model} (widths {self.widths}, "
            f"depths {self.depths}, seeds {self.seeds}, {self.steps} steps after {self.skip}, "
            f"lr {self.lr:g}, {self.seconds:.0f} s)",
            "",
            "| group | width exponent of ‖c·ΔW‖/lr | on the data | nearest family | its exponent "
            "| rule uses |",
            "|---|---|---|---|---|---|",
        ]
        for g in GROUPS:
            if g not in self.exponents:
                continue
            (e, s), (fam, fe) = self.exponents[g], self.nearest[g]
            role = "vector" if g.startswith("vector") else g
            se, ss = self.data_exponents.get(g, (math.nan, math.nan))
            lines.append(
                f"| {g} | {e:+.3f} ± {s:.3f} | {se:+.3f} ± {ss:.3f} | {fam} | {fe:+.2f} "
                f"| {self.families[role]} |"
            )
        d, ds = self.depth_exponents
        lines += [
            "",
            f"- gradient degree k = {self.k[0]:.3f} ± {self.k[1]:.3f}"
            + (
                f"; in-block update vs depth (α = 1): {d:+.3f} ± {ds:.3f} (−k)"
                if self.depths
                else ""
            ),
            f"- eps rule: {', '.join(f'{r} {v}' for r, v in self.eps.items())}",
            f"- weight decay: ‖ΔW(λ) − ΔW(0)‖/(lr·λ·‖W‖) = {self.decay_ratio:.3f} → "
            + (
                "inside the direction (λ unchanged)" if self._decay_in() else "lr·λ·W (torch-style)"
            ),
            f"- ‖ΔW(2W)‖/‖ΔW(W)‖ = {self.weight_ratio:.3f} → "
            + ("follows ‖W‖" if self._follows() else "does not follow ‖W‖"),
        ]
        return "\n".join(lines)

    def _decay_in(self) -> bool:
        return decay_in_direction(self.decay_ratio)

    def _follows(self) -> bool:
        return follows_weight(self.k[0], self.weight_ratio)

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            **{k: v for k, v in self.__dict__.items() if k not in ("rule", "records")},
        }
        out["options"] = jsonable(self.options)
        out["rule"] = rule_to_json(self.rule) if self.rule is not None else None
        out["records"] = self.records
        return out

    def save_json(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, rederive: bool = False) -> ProbeResult:
        """A saved probe; ``rederive``: derive the rule again from its measurements (after a
        change to the matching, without measuring again)."""
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a probe result (format {FORMAT})")
        names = {f.name for f in fields(cls)} - {"rule"}
        result = cls(**{k: data[k] for k in names if k in data})
        if rederive:
            result.nearest, result.families = {}, {}
            result.rule = derive_rule(result)
        elif data.get("rule"):
            result.rule = rule_from_json(data["rule"])
        return result

    def plot(self, path: str | os.PathLike) -> Path:
        """Update norm vs width per group (seed × step mean), log-log, beside the nearest
        family's slope."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [g for g in GROUPS if g in self.exponents]
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), squeeze=False)
        for ax, g in zip(axes[0], groups, strict=True):
            keys = sorted(
                {r["tensor"] for r in self.records if r["group"] == g and r["axis"] == "width"}
            )
            for key in keys:
                ys = [
                    statistics.fmean(
                        r["norm"] for r in self.records
                        if r["tensor"] == key and r["width"] == w and r["axis"] == "width"
                    )
                    for w in self.widths
                ]  # fmt: skip
                ax.loglog(self.widths, ys, marker="o", lw=1, alpha=0.7)
            e, s = self.exponents[g]
            ax.set_title(
                f"{g}: {e:+.2f} ± {s:.2f}\n"
                f"(nearest {self.nearest[g][0]} {self.nearest[g][1]:+.2f})",
                fontsize=8,
            )
            ax.set_xlabel("width")
            ax.set_xticks(self.widths, [str(w) for w in self.widths], minor=False)
            ax.set_xticks([], minor=True)
        axes[0][0].set_ylabel("‖c·ΔW‖* / lr")
        fig.suptitle(f"smup probe: {self.optimizer}", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        return path

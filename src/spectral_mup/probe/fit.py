"""Fitting: the probe's measurements turned into exponents and a rule (docs/probe.md).

The log-log slope of c·‖ΔW‖ against width, per role (input, hidden, output, vector; in a
block or not), over seeds and steps, is the family's width exponent; the in-block updates'
slope against depth and their response to gradients × s give the gradient degree k. Each
role's exponents are matched to the nearest known family (``known_families``); a role that no
family fits within ``tolerance`` gets a ``rules.fitted_family`` (``derive_rule``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .. import rules
from ..optim.probed import known_families, rule_from_json
from .measure import GRAD_SCALE, GROUPS, MeasuredTensor

_TOL_HOMOGENEOUS = 0.02  # relative change of the update below this: homogeneous
_TOL_SENSITIVE = 0.05  # above this: eps changes the update


class Probed(Protocol):
    """What the rule is derived from: a ``ProbeResult``'s measurements (``derive_rule`` fills
    in ``nearest`` and ``families``)."""

    optimizer: str
    options: dict[str, Any]
    widths: list[int]
    seeds: list[int]
    exponents: dict[str, list[float]]
    k: list[float]
    eps: dict[str, str | None]
    decay_ratio: float
    weight_ratio: float
    nearest: dict[str, list[Any]]
    families: dict[str, str]
    records: list[dict[str, Any]]


def decay_in_direction(decay_ratio: float) -> bool:
    """λ sits inside the update's direction: the decay ratio (``measure._decay_ratio``) is
    not the 1 of torch-style lr·λ·W."""
    return not (abs(decay_ratio - 1.0) < 0.2)


def follows_weight(k: float, weight_ratio: float) -> bool:
    """The update follows ‖W‖ (LAMB): degree 0 in the gradient, and doubling W doubles it."""
    return abs(k) < 0.25 and math.log2(max(weight_ratio, 1e-12)) > 0.5


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _spread(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def width_exponents(records, widths, metric: str) -> dict[str, list[float]]:
    """Per group: [mean, spread] over (seed, step) of the mean over the group's tensors of
    the log-log slope of ``metric`` against width."""
    by_key: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["axis"] == "width":
            key = (r["seed"], r["step"], r["group"], r["tensor"])
            by_key.setdefault(key, {})[r["width"]] = r[metric]
    samples: dict[str, dict[tuple, list[float]]] = {}
    for (seed, step, group, _), ys in by_key.items():
        if len(ys) == len(widths) and all(v > 0 for v in ys.values()):
            slope = _slope(widths, [ys[w] for w in widths])
            samples.setdefault(group, {}).setdefault((seed, step), []).append(slope)
    out = {}
    for group in GROUPS:
        if group in samples:
            per = [statistics.fmean(v) for v in samples[group].values()]
            out[group] = [statistics.fmean(per), _spread(per)]
    return out


def depth_exponents(
    records: Sequence[Mapping[str, Any]], widths: Sequence[int], depths: Sequence[int]
) -> list[float]:
    """[mean, spread] over (seed, step) of the log-log slope against depth of the raw
    in-block matrix updates at the base width (branch a = m_L^-1; −k predicted), each
    tensor's blocks pooled; [0, 0] without depths."""
    if not depths:
        return [0.0, 0.0]
    keyed: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["width"] == widths[0] and r["in_block"] and r["group"] == "hidden":
            base_key = r["tensor"].split(".", 2)[-1]  # blocks.<i>.<rest>: pool the blocks
            keyed.setdefault((r["seed"], r["step"], base_key, r["tensor"].split(".")[1]), {})[
                r["depth"]
            ] = r["norm"]
    pooled: dict[tuple, dict[int, list[float]]] = {}
    for (seed, step, base_key, _), ys in keyed.items():
        for dd, v in ys.items():
            pooled.setdefault((seed, step, base_key), {}).setdefault(dd, []).append(v)
    by_sample: dict[tuple, list[float]] = {}
    for (seed, step, _), ys in pooled.items():
        if len(ys) == len(depths) and all(min(v) > 0 for v in ys.values()):
            means = [statistics.fmean(ys[dd]) for dd in depths]
            by_sample.setdefault((seed, step), []).append(_slope(depths, means))
    per = [statistics.fmean(v) for v in by_sample.values()]
    return [statistics.fmean(per), _spread(per)] if per else [0.0, 0.0]


def grad_degree(ratios: Sequence[float]) -> list[float]:
    """[gradient degree k, spread] from the log-ratios of updates with every gradient × s
    (update(s·g) = s^k·update(g))."""
    return [statistics.fmean(ratios) / math.log(GRAD_SCALE), _spread(ratios) / math.log(GRAD_SCALE)]


def eps_verdict(d: Mapping[str, float]) -> str | None:
    """An eps rule from the deviations from homogeneity: the scaling that restores it where
    a fixed ε breaks it; None when ε does not change the update."""
    for label, power in (("entry", 1), ("gram", 2)):
        fixed, follow = d[f"{label}: ε fixed"], d[f"{label}: ε × s^{power}"]
        if fixed > _TOL_SENSITIVE and follow < _TOL_HOMOGENEOUS:
            return label
    if max(d[f"{label}: ε fixed"] for label in ("entry", "gram")) <= _TOL_SENSITIVE:
        return None
    # ε matters but neither scaling restores homogeneity exactly: the closer one
    return min(("entry", "gram"), key=lambda lab: d[f"{lab}: ε × s^{1 if lab == 'entry' else 2}"])


def _path_exponent(
    family: rules.UpdateFamily, path: Sequence[MeasuredTensor], widths: Sequence[int]
) -> float:
    """The width exponent a family predicts along one tensor's path (its fans at each width)."""
    ys = [family.norm(t.fan_in, t.fan_out, t.forward, t.role) for t in path]
    return _slope(widths, ys)


def _family_exponents(
    family: rules.UpdateFamily, paths: Mapping[str, list[Sequence[MeasuredTensor]]], widths
) -> dict[str, float]:
    return {
        g: statistics.fmean(_path_exponent(family, path, widths) for path in ps)
        for g, ps in paths.items()
    }


def predicted_exponents(rule: rules.OptimizerRule, result: Probed) -> dict[str, float]:
    """The width exponent of each probed group that ``rule`` predicts along the probe's own
    tensor paths (the probed model's fans at ``result.widths``)."""
    paths = _paths(result.records, result.widths)
    out = {}
    for g, ps in paths.items():
        role = "vector" if g.startswith("vector") else g
        out[g] = statistics.fmean(
            _path_exponent(rule.family(role), path, result.widths) for path in ps
        )
    return out


def _paths(
    records: Sequence[Mapping[str, Any]], widths: Sequence[int]
) -> dict[str, list[list[MeasuredTensor]]]:
    """Per group, each measured tensor's shapes across widths, read from the probe's own
    records (so any probed model, bundled or not, gives its own fans)."""
    first = {}
    for r in records:
        if r["axis"] == "width":
            first.setdefault((r["tensor"], r["width"]), r)
    paths: dict[str, list[list[MeasuredTensor]]] = {}
    for key in dict.fromkeys(k for k, w in first if w == widths[0]):
        if not all((key, w) in first for w in widths):
            continue  # a tensor not present at every width has no path
        path = []
        for w in widths:
            r = first[(key, w)]
            role = "vector" if r["group"].startswith("vector") else r["group"]
            path.append(MeasuredTensor(key, key, None, role, r["in_block"], r["fan_in"],
                                       r["fan_out"], r["forward"], False))  # fmt: skip
        paths.setdefault(path[0].group, []).append(path)
    return paths


def derive_rule(result: Probed, *, tolerance: float = 0.2) -> rules.OptimizerRule:
    """The rule the measurements imply: per role the nearest known family of the same
    gradient degree k when its exponents are within ``tolerance`` (ties: the first in
    ``known_families`` — equal exponents give equal LR rules), else a fitted family; the
    measured weight-decay and ‖W‖ behaviour replace the family's. A registered optimizer
    keeps its auxiliary roles (Muon's AdamW part). Fills ``result.nearest`` and
    ``result.families``."""
    registered = result.optimizer in rules.OPTIMIZER_RULES
    aux_roles = rules.rule_for(result.optimizer).auxiliary if registered else ()
    paths = _paths(result.records, result.widths)
    k = result.k[0]
    cands = known_families(result.optimizer, result.options)
    order = list(cands)
    predicted = {n: _family_exponents(f, paths, result.widths) for n, f in cands.items()}
    measured = {g: e for g, (e, _) in result.exponents.items()}
    same_k = [n for n in order if abs(cands[n].grad_degree - k) <= 0.25] or order

    def groups_of(role: str) -> list[str]:
        return [g for g in measured if (g.startswith("vector") if role == "vector" else g == role)]

    def dist(n: str, gs: Sequence[str]) -> float:
        return round(max(abs(predicted[n][g] - measured[g]) for g in gs), 2)  # ties: order

    for g in measured:
        best = min(same_k, key=lambda n: (dist(n, [g]), order.index(n)))
        result.nearest[g] = [best, predicted[best][g]]
    flags = {
        "decay_in_direction": decay_in_direction(result.decay_ratio),
        "follows_weight": follows_weight(result.k[0], result.weight_ratio),
    }
    entries: dict[str, dict[str, Any]] = {}
    fitted_exp: dict[str, float] = {}
    for r in rules.ROLES:
        gs = groups_of(r)
        if not gs:
            entries[r] = {"known": "entrywise"}  # no such tensor in the probe model
            continue
        e = statistics.fmean(measured[g] for g in gs)
        # the raw update's exponent in the growing fan: remove c^(1+k) (c = 1/m on the readout)
        fitted_exp[r] = e + (1.0 + k) if r == "output" else e
        fits = [n for n in same_k if dist(n, gs) <= tolerance]
        if fits:
            best = min(fits, key=lambda n: (dist(n, gs), order.index(n)))
            entries[r] = {"known": best, **(flags if r != "vector" else {})}
    fitted = {
        "exponents": {r: fitted_exp.get(r, 0.0) for r in rules.ROLES}, "k": k,
        "eps_follows_grad": any(v == "entry" for v in result.eps.values()), **flags,
    }  # fmt: skip
    for r in rules.ROLES:
        entries.setdefault(r, {"fitted": fitted})
        result.families[r] = entries[r].get("known", "fitted")
    data = {
        "name": result.optimizer,
        "families": entries,
        "eps": {r: result.eps.get(r) for r in rules.ROLES},
        "auxiliary": list(aux_roles),
        "options": result.options,
        "source": f"smup probe (widths {result.widths}, seeds {result.seeds})",
    }
    return rule_from_json(data)

"""Probed rules: the JSON form of a rule that ``smup probe`` derived (spectral_mup.probe), the
files that hold it and their cache, so that ``build_optimizer("torch.optim.RAdam", …)`` finds
the rule of an imported optimizer class.

A rule file names, per role, a known family (``known_families``: the generic ones, and a
registered optimizer's own with its options) or a fitted family's exponents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import rules
from ..data import cache_dir
from ..errors import ConfigError
from .registry import full_options

FORMAT = "spectral-mup-rule-v1"


def jsonable(value: Any) -> Any:
    """``value`` as JSON reads it back (anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(value, default=str))


def known_families(
    optimizer: str | None = None, options: Mapping[str, Any] | None = None
) -> dict[str, rules.UpdateFamily]:
    """The known families a probed role is compared with, in order of preference for ties:
    rules.FAMILIES with Muon's shaped orthogonalized update beside the plain one, and
    Adam-grafted Shampoo's (unblocked); for a registered ``optimizer``, last, the families
    its own rule gives with ``options`` (blocked Shampoo's Kronecker family, …)."""
    fams = rules.FAMILIES
    muon = rules.rule_for("muon").family("hidden")
    grafted = rules.grafted_family()
    order = [fams["entrywise"], fams["orthogonalized"], muon, fams["trust_ratio"],
             fams["spectral_normalized"], fams["raw_gradient"], grafted]  # fmt: skip
    assert {f.name for f in order} >= set(fams), "a family is missing from the probe's list"
    if optimizer in rules.OPTIMIZER_RULES:
        own = rules.rule_for(optimizer, full_options(optimizer, options or {}))
        order += [own.family(r) for r in rules.ROLES]
    out: dict[str, rules.UpdateFamily] = {}
    for f in order:  # a name seen before keeps its place
        out.setdefault(f.name, f)
    return out


def rule_to_json(rule: rules.OptimizerRule) -> dict[str, Any]:
    """A probed rule as JSON: per role a known family's name (with the measured decay and
    ‖W‖ behaviour) or a fitted family's exponents."""
    if not rule.measured or "json" not in rule.measured:
        raise ConfigError(f"{rule.name}: only a probed rule has a JSON form")
    return dict(rule.measured["json"])


def _family_from_json(
    entry: Mapping[str, Any], known: Mapping[str, rules.UpdateFamily]
) -> rules.UpdateFamily:
    if "fitted" in entry:
        f = entry["fitted"]
        return rules.fitted_family(
            f["exponents"], f["k"], eps_follows_grad=f["eps_follows_grad"],
            decay_in_direction=f["decay_in_direction"], follows_weight=f["follows_weight"],
        )  # fmt: skip
    if entry.get("known") not in known:
        raise ConfigError(f"a rule file names an unknown family {entry.get('known')!r}")
    fam = known[entry["known"]]
    flags = {
        k: bool(entry.get(k, getattr(fam, k))) for k in ("decay_in_direction", "follows_weight")
    }
    if flags == {k: getattr(fam, k) for k in flags}:
        return fam
    notes = [n for k, n in (("decay_in_direction", "λ inside"), ("follows_weight", "∝‖W‖"))
             if flags[k]]  # fmt: skip
    return replace(fam, name=f"{fam.name} [measured: {', '.join(notes) or 'torch-style decay'}]",
                   **flags)  # fmt: skip


def rule_from_json(data: Mapping[str, Any]) -> rules.OptimizerRule:
    """The ``rules.OptimizerRule`` of a probed rule's JSON form (``rule_to_json``)."""
    try:
        known = known_families(data["name"], data.get("options"))
        families = {r: _family_from_json(data["families"][r], known) for r in rules.ROLES}
        return rules.OptimizerRule(
            data["name"], families, eps=dict(data["eps"]),
            auxiliary=tuple(data.get("auxiliary", ())), source=data.get("source", ""),
            measured={"json": dict(data)},
        )  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"a rule file lacks {exc}; write it again with smup probe") from None


def load_rule(path: str | os.PathLike) -> rules.OptimizerRule:
    """The rule in a JSON file written by ``smup probe`` (``ProbeResult.save_json``), parsed
    once per file version: a sweep resolves it for every run, a probe file holds every
    measurement (hundreds of kB)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the rule file {path} ({exc}); write it with smup probe"
        ) from None
    return _load_rule(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _load_rule(path: str, mtime_ns: int, size: int) -> rules.OptimizerRule:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the rule file {path} ({exc}); write it with smup probe"
        ) from None
    if data.get("format") != FORMAT or "rule" not in data:
        raise ConfigError(
            f"{path} is not a probed rule (format {FORMAT}); write it with smup probe"
        )
    return rule_from_json(data["rule"])


def cache_path(optimizer: str, options: Mapping[str, Any]) -> Path:
    """Where the probed rule of ``optimizer`` with ``options`` (its full option set, eps
    excluded) is cached: ``$XDG_CACHE_HOME/spectral-mup/probes/<name>-<hash>.json``."""
    key = json.dumps(jsonable(dict(options)), sort_keys=True)
    digest = hashlib.sha256(f"{optimizer}\n{key}".encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in optimizer)
    return cache_dir() / "probes" / f"{safe}-{digest}.json"


def cached_rule(optimizer: str, options: Mapping[str, Any]) -> rules.OptimizerRule:
    """The cached probed rule of an imported optimizer, or a one-line error naming the fix."""
    path = cache_path(optimizer, options)
    if not path.exists():
        raise ConfigError(
            f"no μP rule for optimizer {optimizer!r} with these options: run `smup probe "
            f"--optimizer {optimizer}` (with the same --opt options) or pass rule=<json>"
        )
    return load_rule(path)

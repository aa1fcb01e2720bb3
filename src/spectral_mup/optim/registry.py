"""One record per optimizer: everything the library knows about it, in one place.

A record holds the optimizer's class and default options, the name of its ε, its μP rule
(``rules.OptimizerRule``, built from the families and helpers of ``spectral_mup.rules``),
its auxiliary AdamW part, its curvature estimate, how ``train.slices.SliceLR`` stacks it and its
coordinate-check LR. Adding an optimizer is adding one record to ``RECORDS`` (plus an
``[optim]`` key in ``config.OptimSection`` for an option no other optimizer has:
tests/test_registry.py fails without it). ``rules.OPTIMIZER_RULES`` is a view of the
records' rules, filled here. An optimizer class given by import path (``torch.optim.RAdam``)
gets a record derived from its signature (``get_spec``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from .. import rules
from ..errors import ConfigError, import_object
from .adopt import ADOPT
from .lamb import LAMB
from .lion import Lion
from .muon import Muon
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import SophiaG

# Coordinate-check base LR (``smup coord-check`` without --lr), chosen by measurement
# (docs/measurements.md): small enough that 5 steps stay near the linear regime where slopes
# measure scaling (sign-like updates of 3e-3 move σ_b = 0.02 weights by up to 75% and the μP
# slopes then spread by ±0.2 across seeds), large enough for LAMB's relative (η·RMS(W))
# steps to move the head. SGD needs a raw-gradient LR.
DEFAULT_COORD_LR = 1e-3


@dataclass(frozen=True)
class AuxPart:
    """An auxiliary AdamW part (Muon's: the roles its rule lists as ``auxiliary``, embeddings,
    head and vectors) with a base LR and weight decay of its own, given as the options named
    ``lr`` and ``weight_decay``: ``build_optimizer`` takes them out of the class's options
    and gives them to the part's param groups."""

    lr: str = "adam_lr"
    weight_decay: str = "adam_weight_decay"
    coord_lr: float = 3e-3  # the part's base LR in a coordinate check


@dataclass(frozen=True)
class Curvature:
    """A curvature estimate the training loop refreshes through the optimizer's
    ``update_hessian()`` (Sophia's Hessian diagonal): ``interval`` names the option, kept as
    an attribute of the optimizer, with the steps between estimates; ``tokens`` the option
    the trainer sets to the tokens per optimizer step (batch_size·block_size), if any."""

    interval: str = "hessian_interval"
    tokens: str | None = "bs"


@dataclass(frozen=True)
class Stacking:
    """How ``train.slices.SliceLR`` steps K stacked runs of an optimizer whose update is linear in
    the LR with LR-free state: its weight ``decay`` ("decoupled": p·(1 − lr·λ); "l2": λ·p
    added to the gradient), "decoupled" instead where the option ``decoupled_by`` is true
    (ADOPT's ``decouple``), and ``first_decay``: whether its first step decays (ADOPT's
    first step only initializes its second moment)."""

    decay: Literal["decoupled", "l2"]
    first_decay: bool = True
    decoupled_by: str | None = None

    def mode(self, options: Mapping[str, Any]) -> tuple[str, bool]:
        """(decay, first_decay) of the optimizer built with ``options``."""
        if self.decoupled_by is not None and options.get(self.decoupled_by):
            return "decoupled", self.first_decay
        return self.decay, self.first_decay


DECOUPLED, L2 = Stacking("decoupled"), Stacking("l2")


@dataclass(frozen=True)
class OptimizerRecord:
    """One optimizer: how to build it and what it can do. ``defaults`` are its options (its
    constructor's keywords besides the LR and weight decay), ``eps_key`` the name of its ε
    among them (any optimizer's ε is given as ``eps``), ``rule`` its μP rule (named after
    the record; None: probed, for a class given by import path). ``aux``, ``curvature`` and
    ``stacking`` are None where the optimizer has no auxiliary AdamW part, keeps no
    curvature estimate, or cannot be stacked by ``train.slices.SliceLR``."""

    name: str
    cls: Callable[..., torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    eps_key: str | None = None
    rule: rules.OptimizerRule | None = None
    aux: AuxPart | None = None
    curvature: Curvature | None = None
    stacking: Stacking | None = None
    coord_lr: float = DEFAULT_COORD_LR

    def __post_init__(self) -> None:
        if self.rule is not None and self.rule.name != self.name:
            object.__setattr__(self, "rule", replace(self.rule, name=self.name))
        if self.rule is not None and bool(self.aux) != bool(self.rule.auxiliary):
            raise ValueError(f"{self.name}: an aux part needs auxiliary roles in its rule")
        named = [self.aux.lr, self.aux.weight_decay] if self.aux else []
        named += [self.curvature.interval, self.curvature.tokens] if self.curvature else []
        named += [self.stacking.decoupled_by] if self.stacking else []
        missing = [k for k in named if k is not None and k not in self.defaults]
        if missing:
            raise ValueError(f"{self.name}: options {missing} are not in its defaults")

    def config_keys(self) -> list[str]:
        """Its options as ``[optim]`` keys (``config.OptimSection``): its own names, its ε as
        ``eps``, without the option the trainer fills (the curvature's ``tokens``)."""
        filled = self.curvature.tokens if self.curvature else None
        return ["eps" if k == self.eps_key else k for k in self.defaults if k != filled]

    def curvature_interval(self, opt: torch.optim.Optimizer) -> int:
        """Steps between the curvature estimates of ``opt``, an optimizer built from this
        record (its ``hessian_interval``); 0 when it keeps none."""
        return getattr(opt, self.curvature.interval) if self.curvature else 0


# One record per optimizer: class, defaults, ε, μP rule (the family per role, the eps rule,
# the auxiliary roles and the options hook: spectral_mup.rules), capabilities.
# fmt: off
RECORDS: tuple[OptimizerRecord, ...] = (
    OptimizerRecord(
        "adamw", torch.optim.AdamW, {"betas": (0.9, 0.95), "eps": 1e-8}, "eps",
        rules.one_family("entrywise", "m/(sqrt(v)+ε): entries ~±1 (seed paper; RULES.md §3)"),
        stacking=DECOUPLED,
    ),
    OptimizerRecord(
        "sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": False},
        rule=rules.one_family("raw_gradient", "the μP gradient (Yang, Simon & Bernstein 2023)"),
        stacking=L2, coord_lr=0.1,
    ),
    OptimizerRecord(
        "adopt", ADOPT, {"betas": (0.9, 0.9999), "eps": 1e-6, "decouple": True}, "eps",
        rules.one_family("entrywise", "same Ψ as AdamW up to the order of updates (App. C.1)"),
        stacking=Stacking("l2", first_decay=False, decoupled_by="decouple"), coord_lr=3e-3,
    ),
    OptimizerRecord(
        "lamb", LAMB, {"betas": (0.9, 0.999), "eps": 1e-6}, "eps",
        rules.one_family("trust_ratio", "φ(‖W‖)/‖u‖·u (App. C.3; hidden η/sqrt(m) measured)"),
        coord_lr=1e-2,
    ),
    OptimizerRecord(
        "lion", Lion, {"betas": (0.9, 0.99)},
        rule=rules.one_family("entrywise", "sign(·): every entry ±1"), stacking=DECOUPLED,
    ),
    # lr/weight_decay are the Muon part's; adam_lr/adam_weight_decay the AdamW part's.
    # NS(momentum) on hidden matrices, times the shape factor (default "spectral"); AdamW rest
    OptimizerRecord(
        "muon", Muon,
        {"momentum": 0.95, "nesterov": True, "shape_factor": "spectral", "betas": (0.9, 0.95),
         "eps": 1e-8, "adam_lr": 3e-4, "adam_weight_decay": 0.0},
        "eps",
        rules.OptimizerRule(
            "muon", {**rules.shaped_families({}), "*": rules.ENTRYWISE},
            auxiliary=("input", "output", "vector"), configure=rules.shaped_families,
            source="U·Vᵀ·f(fan_in, fan_out) on hidden matrices (Qiu et al. 2025)",
        ),
        aux=AuxPart(), coord_lr=0.02,
    ),
    # e = ¼, unblocked, ungrafted: L^-¼ G R^-¼ ≈ U·Vᵀ (§3); vectors: diagonal AdaGrad; a
    # damping ε added to G·Gᵀ
    OptimizerRecord(
        "shampoo", Shampoo,
        {"betas": (0.0, 1.0), "epsilon": 1e-12, "exponents": (0.25, 0.25),
         "precondition_frequency": 1, "block_size": None, "grafting": "none"},
        "epsilon",
        rules.OptimizerRule(
            "shampoo", {"vector": rules.ENTRYWISE, "*": rules.ORTHOGONALIZED}, eps="gram",
            configure=lambda o: {"*": rules.preconditioned_family(
                o["grafting"], o["exponents"], o["block_size"])},
            source="Qiu et al. 2025 (blocked); grafted: measured (docs/RULES.md)",
        ),
        coord_lr=3e-3,
    ),
    # Adam in Shampoo's eigenbasis: unblocked entrywise (measured; §3 says orthogonalized);
    # blocked: Qiu et al.'s formula. Its ε is compared with rotated gradient entries.
    OptimizerRecord(
        "soap", SOAP,
        {"betas": (0.95, 0.95), "eps": 1e-8, "shampoo_beta": None, "precondition_frequency": 10,
         "block_size": None},
        "eps",
        rules.OptimizerRule(
            "soap", {"*": rules.ENTRYWISE}, eps="entry",
            configure=lambda o: {"*": rules.soap_family(o["block_size"])},
            source="measured (docs/RULES.md, SOAP); blocked: Qiu et al. 2025",
        ),
        coord_lr=3e-3,
    ),
    OptimizerRecord(
        "sophia", SophiaG,
        {"betas": (0.965, 0.99), "rho": 0.04, "bs": 5120, "hessian_interval": 10},
        rule=rules.one_family(
            "entrywise", "clip(m/(ρh), 1): entries bounded by 1, sign-like (App. C.2)"),
        curvature=Curvature(),
    ),
)
# fmt: on

REGISTRY: dict[str, OptimizerRecord] = {r.name: r for r in RECORDS}
rules.OPTIMIZER_RULES.update({name: r.rule for name, r in REGISTRY.items()})


def optimizer_key(name: str) -> str:
    """One spelling per optimizer: registered names are case-free (``AdamW`` = ``adamw``);
    an import path is kept as written (Python names are case-sensitive)."""
    return name if "." in name else name.lower()


def optimizer_names() -> list[str]:
    return sorted(REGISTRY)


# constructor arguments of torch's optimizers that are implementation switches, not options
_SWITCHES = {"params", "lr", "weight_decay", "foreach", "maximize", "capturable",
             "differentiable", "fused"}  # fmt: skip
# the classes given by import path that train.slices.SliceLR stacks (the registered ones: above)
_TORCH_STACKING = {torch.optim.AdamW: DECOUPLED, torch.optim.Adam: L2, torch.optim.SGD: L2}


def get_spec(name: str) -> OptimizerRecord:
    """A registered optimizer, or any ``torch.optim.Optimizer`` subclass by import path
    (``torch.optim.RAdam``, ``my_pkg.optim.Fancy``): its keyword defaults are its options and
    an ``eps`` argument is its Adam-like ε."""
    if name.lower() in REGISTRY:
        return REGISTRY[name.lower()]
    if "." not in name:
        raise ConfigError(
            f"unknown optimizer {name!r}; use one of: {', '.join(optimizer_names())}, or an "
            "import path such as torch.optim.RAdam"
        )
    return _imported_spec(name)


@functools.lru_cache(maxsize=32)
def _imported_spec(path: str) -> OptimizerRecord:
    cls = import_object(path, "optimizer")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"{path} is not a torch.optim.Optimizer subclass")
    return _derived_record(path, cls)


def _derived_record(name: str, cls: type[torch.optim.Optimizer]) -> OptimizerRecord:
    """The record of an unregistered class, from its signature: no rule (a probed one
    applies), no auxiliary part; a curvature estimate where the class keeps one as the
    training loop expects (an ``update_hessian`` method and a ``hessian_interval`` option,
    and the tokens per step as ``bs`` if it takes them: SophiaG's contract); stacked only if
    it is torch's AdamW, Adam or SGD."""
    params = inspect.signature(cls.__init__).parameters
    defaults = {
        k: v.default
        for k, v in params.items()
        if k not in _SWITCHES and k != "self" and v.default is not inspect.Parameter.empty
    }
    eps_key = "eps" if "eps" in params else None
    curvature = None
    contract = Curvature()
    if callable(getattr(cls, "update_hessian", None)) and contract.interval in defaults:
        curvature = replace(
            contract, tokens=contract.tokens if contract.tokens in defaults else None
        )
    return OptimizerRecord(name, cls, defaults, eps_key, curvature=curvature,
                           stacking=_TORCH_STACKING.get(cls))  # fmt: skip


def record_for_class(cls: type) -> OptimizerRecord:
    """The record of optimizer class ``cls``: its registered one, else one derived from its
    signature (as for a class given by import path)."""
    for record in RECORDS:
        if record.cls is cls:
            return record
    return _derived_record(f"{cls.__module__}.{cls.__qualname__}", cls)


def normalize_options(
    record: OptimizerRecord | str,
    given: Mapping[str, Any],
    *,
    defaults: bool = False,
    unknown: str | None = None,
) -> dict[str, Any]:
    """``given`` under the optimizer's own names: ``eps`` names any optimizer's ε (Shampoo's
    damping ``epsilon``). ``defaults``: over the record's defaults. ``unknown``: a key that
    is none of its options is a ConfigError with this message, formatted with ``keys`` (the
    unknown ones) and ``options`` (its options); None passes such a key on (to the class,
    which rejects a wrong one)."""
    record = get_spec(record) if isinstance(record, str) else record
    options = dict(given)
    if record.eps_key not in (None, "eps") and "eps" in options:
        options[record.eps_key] = options.pop("eps")
    if unknown is not None:
        keys = sorted(set(options) - set(record.defaults) - {record.eps_key})
        if keys:
            raise ConfigError(
                unknown.format(keys=", ".join(keys), options=", ".join(record.defaults))
            )
    return {**record.defaults, **options} if defaults else options


def split_options(
    record: OptimizerRecord | str, given: Mapping[str, Any]
) -> tuple[dict[str, Any], Any]:
    """The optimizer's options over its defaults (``normalize_options``), and its ε taken out
    of them (None for an optimizer without one)."""
    record = get_spec(record) if isinstance(record, str) else record
    options = normalize_options(record, given, defaults=True)
    eps = options.pop(record.eps_key) if record.eps_key else None
    return options, eps


def full_options(optimizer: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the optimizer's defaults, without its ε: a probed rule's cache key,
    as ``build_optimizer`` forms it."""
    return split_options(get_spec(optimizer), dict(options))[0]

"""The optimizer registry: a name (registered, or any optimizer class's import path) to the
class, its default options and its ε, and an optimizer's full option set.

The μP rule of every registered name lives in ``spectral_mup.rules.OPTIMIZER_RULES``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one registered optimizer."""

    cls: Callable[..., torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    eps_key: str | None = None  # name of the Adam-like epsilon hyperparameter, if any


REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(torch.optim.AdamW, {"betas": (0.9, 0.95), "eps": 1e-8}, "eps"),
    "sgd": OptimizerSpec(torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    "adopt": OptimizerSpec(ADOPT, {"betas": (0.9, 0.9999), "eps": 1e-6, "decouple": True}, "eps"),
    "lamb": OptimizerSpec(LAMB, {"betas": (0.9, 0.999), "eps": 1e-6}, "eps"),
    "lion": OptimizerSpec(Lion, {"betas": (0.9, 0.99)}),
    # lr/weight_decay are the Muon part's; adam_lr/adam_weight_decay the AdamW part's
    "muon": OptimizerSpec(
        Muon,
        {
            "momentum": 0.95,
            "nesterov": True,
            "shape_factor": "spectral",
            "betas": (0.9, 0.95),
            "eps": 1e-8,
            "adam_lr": 3e-4,
            "adam_weight_decay": 0.0,
        },
        "eps",
    ),
    "shampoo": OptimizerSpec(
        Shampoo,
        {
            "betas": (0.0, 1.0),
            "epsilon": 1e-12,
            "exponents": (0.25, 0.25),
            "precondition_frequency": 1,
            "block_size": None,
            "grafting": "none",
        },
        "epsilon",
    ),
    "soap": OptimizerSpec(
        SOAP,
        {
            "betas": (0.95, 0.95),
            "eps": 1e-8,
            "shampoo_beta": None,
            "precondition_frequency": 10,
            "block_size": None,
        },
        "eps",
    ),
    "sophia": OptimizerSpec(
        SophiaG, {"betas": (0.965, 0.99), "rho": 0.04, "bs": 5120, "hessian_interval": 10}
    ),
}
assert set(REGISTRY) == set(rules.OPTIMIZER_RULES), "every optimizer needs a scaling rule"


def optimizer_key(name: str) -> str:
    """One spelling per optimizer: registered names are case-free (``AdamW`` = ``adamw``);
    an import path is kept as written (Python names are case-sensitive)."""
    return name if "." in name else name.lower()


def optimizer_names() -> list[str]:
    return sorted(REGISTRY)


# constructor arguments of torch's optimizers that are implementation switches, not options
_SWITCHES = {"params", "lr", "weight_decay", "foreach", "maximize", "capturable",
             "differentiable", "fused"}  # fmt: skip


def get_spec(name: str) -> OptimizerSpec:
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
def _imported_spec(path: str) -> OptimizerSpec:
    cls = import_object(path, "optimizer")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"{path} is not a torch.optim.Optimizer subclass")
    params = inspect.signature(cls.__init__).parameters
    defaults = {
        k: v.default
        for k, v in params.items()
        if k not in _SWITCHES and k != "self" and v.default is not inspect.Parameter.empty
    }
    return OptimizerSpec(cls, defaults, "eps" if "eps" in params else None)


def split_options(spec: OptimizerSpec, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The optimizer's options over its defaults, and its ε (``eps`` names any optimizer's ε,
    e.g. Shampoo's damping ``epsilon``), taken out of them."""
    kwargs = dict(kwargs)
    if spec.eps_key not in (None, "eps") and "eps" in kwargs:
        kwargs[spec.eps_key] = kwargs.pop("eps")
    options = {**spec.defaults, **kwargs}
    eps = options.pop(spec.eps_key) if spec.eps_key else None
    return options, eps


def full_options(optimizer: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the optimizer's defaults, without its ε: the cache key, as
    ``build_optimizer`` forms it."""
    return split_options(get_spec(optimizer), dict(options))[0]

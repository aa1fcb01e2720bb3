"""Optimizers, one record per optimizer, and ``build_optimizer``.

Every optimizer is one record in ``optim/registry.py`` (class, defaults, ε, μP rule,
auxiliary AdamW part, curvature estimate, stacking, coordinate-check LR);
``optim/build.py`` builds one over a model with per-tensor μP groups. AdamW and SGD are
torch's own. This module re-exports both.
"""

from __future__ import annotations

from .adopt import ADOPT
from .build import build_optimizer, fused_option, optimizer_rule, resolve_rule
from .lamb import LAMB
from .lion import Lion
from .muon import Muon
from .registry import (
    RECORDS,
    REGISTRY,
    AuxPart,
    Curvature,
    OptimizerRecord,
    Stacking,
    full_options,
    get_spec,
    normalize_options,
    optimizer_key,
    optimizer_names,
    record_for_class,
    split_options,
)
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import SophiaG
from .spectral import SpectralNormalized

__all__ = [
    "ADOPT",
    "LAMB",
    "RECORDS",
    "REGISTRY",
    "SOAP",
    "AuxPart",
    "Curvature",
    "Lion",
    "Muon",
    "OptimizerRecord",
    "Shampoo",
    "SophiaG",
    "SpectralNormalized",
    "Stacking",
    "build_optimizer",
    "full_options",
    "fused_option",
    "get_spec",
    "normalize_options",
    "optimizer_key",
    "optimizer_names",
    "optimizer_rule",
    "record_for_class",
    "resolve_rule",
    "split_options",
]

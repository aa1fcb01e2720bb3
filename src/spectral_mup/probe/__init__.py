"""Derive an optimizer's μP rule by measurement (``smup probe``; RULES.md §2).

μP needs one thing from an optimizer: its update-norm model N, the spectral norm of the
effective update per unit LR as a function of a layer's fans (rules.py). The probe measures
it. It builds the bundled GPT (or any model factory's model) under μP's init and forward
multipliers at several widths and
takes a few real steps with every LR multiplier 1, at a tiny fixed LR and on small batches
(docs/probe.md says why: 1e-6 keeps every width at init, so steps differ only in their
batches; 4 × 32 tokens keep a raw gradient's stable rank from growing with width). Per
tensor and step it records the spectral norm of each update (power iteration; an
embedding's per-token row norm, a vector's ℓ2 norm), its norm on the layer's inputs and its
RMS. The log-log slope of c·‖ΔW‖ against width, per role (input, hidden, output, vector; in
a block or not), over seeds and steps, is the family's width exponent.

Short runs at the base width measure the update's degree k in the gradient scale (every
gradient × s), the eps rule (which scaling of ε — none, s or s² — keeps the update
homogeneous), whether weight decay is torch-style lr·λ·W or sits inside the normalized
direction, and whether the update follows ‖W‖; in-block updates at several depths give k a
second time. Each role's exponents are matched to the nearest known family
(``known_families``); a role that no family fits within ``tolerance`` gets a
``rules.fitted_family``. The result is a ``rules.OptimizerRule`` like the registered ones,
cached as JSON, so that ``build_optimizer("torch.optim.RAdam", …)`` uses it at once.

Modules: ``setup`` (the arguments checked: model builder, optimizer maker, batches),
``measure`` (trajectories and their update norms), ``fit`` (exponents, k, the eps rule and
the derived rule), ``result`` (``ProbeResult``: table, plot, JSON); rule files and their
cache are ``optim.probed``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import rules
from ..errors import ConfigError
from ..optim.probed import (
    FORMAT,
    cache_path,
    cached_rule,
    jsonable,
    known_families,
    load_rule,
    rule_from_json,
    rule_to_json,
)
from ..optim.registry import full_options
from ..parametrize import Parametrization
from .fit import (
    depth_exponents,
    derive_rule,
    eps_verdict,
    grad_degree,
    predicted_exponents,
    width_exponents,
)
from .measure import (
    GRAD_SCALE,
    GROUPS,
    decay_and_weight_ratios,
    eps_deviations,
    grad_scale_ratios,
    size_runs,
    spectral_norm,
)
from .result import ProbeResult
from .setup import ProbeSetup

__all__ = [
    "FORMAT",
    "GRAD_SCALE",
    "GROUPS",
    "ProbeResult",
    "ProbeSetup",
    "cache_path",
    "cached_rule",
    "derive_rule",
    "full_options",
    "known_families",
    "load_rule",
    "predicted_exponents",
    "probe",
    "rule_from_json",
    "rule_to_json",
    "spectral_norm",
]

_candidates = known_families  # its name before optim.probed


def probe(
    optimizer: str | type[torch.optim.Optimizer],
    *,
    options: Mapping[str, Any] | None = None,
    widths: Sequence[int] = (64, 128, 256, 512),
    depths: Sequence[int] = (2, 4, 8),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 5,
    skip: int = 5,
    lr: float = 1e-6,
    arch: str = "gpt",
    n_heads: int = 2,
    batch_size: int = 4,
    block_size: int = 32,
    data: str | None = None,
    model: Callable[[int, int, Parametrization], nn.Module] | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    hessian: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None = None,
    spectral_normalize: bool = False,
    tolerance: float = 0.2,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> ProbeResult:
    """Measure ``optimizer``'s update-norm model and derive its μP rule (module docstring).

    ``optimizer``: a registered name, an import path (``"torch.optim.RAdam"``) or an optimizer
    class; ``options``: its keyword options (defaults: its own). The model is the bundled
    ``arch`` at ``widths`` (heads fixed at ``n_heads``; depth ``depths[0]``) on ``data``
    (Tiny Shakespeare by default), in ``dtype``; ``depths`` at the base width measure the
    in-block depth response (empty: skip).

    Any other model: ``model(width, depth, p)`` returns it built at that size with roles for
    the μP Parametrization ``p`` (a bundled model, or ``spectral_mup.parametrize(m, p,
    base=...)`` against the model at ``p.base_width``, which is ``widths[0]``); ``batches``
    (at least ``skip + steps`` of them; default: Tiny Shakespeare tokens) are its training
    batches, the first one's inputs also the probe batch, and ``loss(model, x, y)`` its loss
    (default: cross-entropy on the logits). ``hessian(model, opt, x)`` refreshes the
    curvature estimate of an optimizer that keeps one (default: ``train.update_hessian``,
    for a language model). ``steps`` steps are measured after ``skip`` steps
    of the optimizer's transient (bias corrections; RAdam is SGD with momentum for its first
    five). Roles whose exponent is farther than ``tolerance`` from every known family get a
    fitted family.
    """
    start = time.perf_counter()
    setup = ProbeSetup.create(
        optimizer, options, widths=widths, depths=depths, seeds=seeds, steps=steps, skip=skip,
        lr=lr, arch=arch, n_heads=n_heads, batch_size=batch_size, block_size=block_size,
        data=data, model=model, batches=batches, loss=loss, hessian=hessian,
        spectral_normalize=spectral_normalize, dtype=dtype,
    )  # fmt: skip
    result = _measure(setup, progress)
    result.rule = derive_rule(result, tolerance=tolerance)
    result.seconds, result.skip = time.perf_counter() - start, skip
    return result


def _measure(setup: ProbeSetup, progress: bool) -> ProbeResult:
    """The probe's runs (measure.py) and what they fit (fit.py), the rule not yet derived."""
    seeds, widths = setup.seeds, setup.widths
    runs = len(seeds) * (len(widths) + len(setup.depths[1:]))
    bar = tqdm(total=runs + 3 * len(seeds) + 7, desc="probe", disable=not progress or None)
    records, base_runs = size_runs(setup, bar)
    exponents = width_exponents(records, widths, "norm")
    data_exponents = width_exponents(records, widths, "data")
    if not exponents:
        raise ConfigError(
            f"{setup.name} made no nonzero update in {setup.steps} steps at lr {setup.lr:g}; "
            "raise --steps or --lr"
        )
    depth = depth_exponents(records, widths, setup.depths)
    k = grad_degree(grad_scale_ratios(setup, base_runs, bar))
    tensors, base = base_runs[seeds[0]]
    if setup.spec.eps_key is not None:
        eps_response = eps_deviations(setup, tensors, k[0], bar)
        eps_rule = {role: eps_verdict(d) for role, d in eps_response.items()}
    else:
        eps_response, eps_rule = {}, {role: None for role in rules.ROLES}
        bar.update(7)
    decay_ratio, weight_ratio = decay_and_weight_ratios(setup, tensors, base, bar)
    bar.close()
    return ProbeResult(
        setup.name, jsonable(setup.options), widths, setup.depths, list(seeds), setup.steps,
        setup.lr, exponents, data_exponents, depth, k, eps_rule, eps_response, decay_ratio,
        weight_ratio, {}, {},
        records=records, model=setup.model_name,
    )  # fmt: skip

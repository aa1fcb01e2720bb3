"""``build_optimizer``: an optimizer over a model with per-tensor μP groups, from its record
(``optim/registry.py``) and its μP rule."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .. import rules
from ..errors import ConfigError
from ..parametrize import Parametrization, param_groups, smup_attr
from .probed import cached_rule, load_rule
from .registry import OptimizerRecord, get_spec, optimizer_key, split_options
from .sharded import is_sharded
from .spectral import SpectralNormalized


def optimizer_rule(name: str, options: dict[str, Any]) -> rules.OptimizerRule:
    """The μP rule of optimizer ``name`` built with ``options``: a registered rule, or the
    probed rule cached by ``smup probe`` for an imported class (``optim/probed.py``)."""
    if name.lower() in rules.OPTIMIZER_RULES:
        try:
            return rules.rule_for(name.lower()).with_options(options)
        except ValueError as exc:
            raise ConfigError(f"bad option for optimizer {name!r}: {exc}") from None
    return cached_rule(name, options)


# switches that pick torch's implementation of a step: a caller who sets one keeps its choice
_KERNEL_SWITCHES = ("foreach", "fused", "capturable", "differentiable")
# torch's optimizers whose fused step runs on CPU and CUDA alike (Adagrad's is CPU-only)
_FUSED = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def fused_option(
    cls: type,
    options: dict[str, Any],
    groups: list[dict[str, Any]],
    model: nn.Module | None = None,
) -> dict[str, bool]:
    """``{"fused": True}`` for torch's AdamW, Adam and SGD when every parameter is a plain
    floating-point tensor on a device with fused kernels (CPU included): one kernel per
    tensor instead of a chain of ``_foreach`` ops, 3.3–5.5× faster AdamW steps on a CPU core
    (benchmarks/optimizer_step.py --optimizers adamw). nanoGPT enables it on CUDA only;
    torch defaults to foreach everywhere. Left out when the caller picked a kernel switch,
    for other optimizers, for FSDP2's sharded (DTensor) parameters and for a ``model`` with
    a sparse-gradient layer (``nn.Embedding(sparse=True)``: no fused step takes those)."""
    if cls not in _FUSED or any(k in options for k in _KERNEL_SWITCHES):
        return {}
    if model is not None and any(getattr(m, "sparse", False) is True for m in model.modules()):
        return {}
    try:  # torch's own list of them (a private helper: without it, no fused step)
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return {}
    devices = _get_fused_kernels_supported_devices()
    for group in groups:
        for q in group["params"]:
            if is_sharded(q) or not q.is_floating_point() or q.device.type not in devices:
                return {}
    return {"fused": True}


def resolve_rule(
    name: str,
    rule: rules.OptimizerRule | str | None = None,
    spectral_normalize: bool = False,
    **kwargs: Any,
) -> rules.OptimizerRule:
    """The μP rule ``build_optimizer(name, …, rule=rule, **kwargs)`` applies: ``rule`` (a
    probed rule's JSON file, or an ``OptimizerRule``), else the registered rule configured by
    the options, else the probed rule cached for an imported class."""
    spec = get_spec(name)
    if rule is None:
        rule = optimizer_rule(optimizer_key(name), split_options(spec, kwargs)[0])
    elif not isinstance(rule, rules.OptimizerRule):
        rule = load_rule(rule)
    return rule.spectral_normalized() if spectral_normalize else rule


def _aux_part(spec: OptimizerRecord, options: dict[str, Any]) -> dict[str, float] | None:
    """The base LR and weight decay of the optimizer's AdamW part (Muon's), taken out of
    ``options``; None for an optimizer without one."""
    if spec.aux is None:
        return None
    aux = {"lr": options.pop(spec.aux.lr), "weight_decay": options.pop(spec.aux.weight_decay)}
    if not aux["lr"] > 0 or aux["weight_decay"] < 0:
        raise ConfigError(f"{spec.aux.lr} must be > 0 and {spec.aux.weight_decay} >= 0, got {aux}")
    return aux


def _warn_frozen(name: str, groups: list[dict[str, Any]]) -> None:
    """Warn (at build_optimizer's caller) about zero matrices an update ∝ ‖W‖ cannot grow."""
    frozen = [
        n
        for g in groups
        for n, t in zip(g["names"], g["params"], strict=True)
        if t.ndim >= 2 and not t.any()
    ]
    if frozen:
        warnings.warn(
            f"{name}: the update is proportional to ‖W‖, so zero-initialized {frozen} "
            "cannot grow; build the model with zero_init_readout=False (the default)",
            stacklevel=3,
        )


def build_optimizer(
    name: str,
    model: nn.Module,
    p: Parametrization,
    lr: float,
    weight_decay: float = 0.0,
    *,
    roles: dict | None = None,
    decay_vectors: bool = False,
    spectral_normalize: bool = False,
    rule: rules.OptimizerRule | str | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model`` with per-tensor μP lr / wd / eps groups.

    ``lr``, ``weight_decay`` and ``eps`` (the optimizer's ε under its own name or as
    ``eps``, e.g. Shampoo's damping ``epsilon``) are the base model's values; every other keyword
    goes to the optimizer unchanged (defaults: ``REGISTRY[name].defaults``; ADOPT decouples
    its weight decay, as when it replaces AdamW). ``spectral_normalize`` wraps the optimizer
    in ``SpectralNormalized`` (every matrix update rescaled to its target spectral norm; μP
    LR multipliers 1).

    ``name`` is a registered optimizer or the import path of any optimizer class
    (``torch.optim.RAdam``), whose rule is ``rule`` — an ``OptimizerRule`` or a JSON file
    written by ``smup probe`` — or else the probed rule cached for that class and options.
    """
    spec = get_spec(name)
    name = optimizer_key(name)
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    options, eps = split_options(spec, kwargs)
    rule = resolve_rule(name, rule, spectral_normalize, **kwargs)
    aux = _aux_part(spec, options)
    groups = param_groups(
        model,
        p,
        rule,
        lr,
        weight_decay,
        eps=eps,
        eps_key=spec.eps_key or "eps",
        roles=roles,
        decay_vectors=decay_vectors,
        aux=aux,
        splits=smup_attr(model, "smup_splits") if aux is not None else None,
    )
    if rule.follows_weight:
        _warn_frozen(name, groups)
    try:
        fused = fused_option(spec.cls, options, groups, model)
        opt = spec.cls(groups, lr=lr, **options, **fused)
        return SpectralNormalized(opt) if spectral_normalize else opt
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad option for optimizer {name!r}: {exc}") from None

"""Apply the rules: the ``Parametrization`` dataclass, initialization, and optimizer param
groups carrying per-tensor lr / weight-decay / eps scales.

This is the only place that multiplies a learning rate (rules.py says by how much).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from . import rules
from .errors import ConfigError
from .roles import (
    WRAPPER_ATTRS,
    ParamRole,
    Shapes,
    canonical_name,
    infer_roles,
    module_layout,
)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RMSNorm)


@dataclass(frozen=True)
class Parametrization:
    """How a model scales with width and depth.

    Attributes:
        kind: ``"sp"`` (standard: every rule is 1) or ``"mup"`` (RULES.md §3–5).
        base_width: width at which μP equals SP (tune hyperparameters here). ``1``
            reproduces the seed paper's absolute convention.
        base_depth: number of blocks at which the depth rules are 1.
        depth_alpha: residual branches are multiplied by (depth/base_depth)^-α;
            0 = off, 0.5 = Depth-μP, 1 = CompleteP.
        wd_mode: ``"coupled"`` (torch semantics: decay lr·λ, λ rescaled so lr·λ is
            invariant) or ``"independent"`` (decay schedule·λ, not multiplied by the peak LR).
        wd_width_scaling: in independent mode, ``"constant"`` λ (μP) or ``"inverse"``
            λ ∝ base_width/width (Qiu et al. 2025).
        init_std: base init std σ_b of every matrix.
        readout: ``"multiplier"`` (logits = head(x)/m, width-independent head init) or
            ``"init"`` (no multiplier, head init σ_b/m, head LR from the same rules).
        attention: under μP, ``"mup"`` sqrt(d_base)/d_head, ``"inverse"`` 1/d_head or
            ``"sp"`` 1/sqrt(d_head). SP always uses 1/sqrt(d_head).
        zero_init_readout: zero-init the head (default off: a zero head cost 0.1–0.15 nats
            at every width in the AdamW sweep of docs/sweeps.md and trains every optimizer
            slower here; a trust-ratio optimizer such as LAMB cannot grow it at all).
        zero_init_query: zero-init the query projection.

    Base-model hyperparameters beyond the LR, carried unchanged to every width and depth
    (μP's promise: tune them on the proxy), all 1 by default and applied the same way under
    SP (so μP still equals SP at the base width):

        lr_input, lr_output, lr_vector: LR multipliers of the embedding, the readout and
            every vector (norm gains, biases), on top of the optimizer's base LR and of the
            width/depth rules (hidden matrices move at the base LR). Coupled weight decay
            keeps torch's lr·λ per group, so it scales with them.
        readout_scale: the readout multiplier's constant: logits = readout_scale · head(x)/m
            under μP (readout_scale · head(x) under SP, and under readout="init").
        init_input, init_output: the embedding's and the readout's init std as multiples of
            ``init_std`` (which the hidden matrices use).
        attention_mult: the attention logits' scale × this (an inverse temperature).
    """

    kind: Literal["sp", "mup"] = "mup"
    base_width: int = 128
    base_depth: int = 2
    depth_alpha: float = 1.0
    wd_mode: Literal["coupled", "independent"] = "coupled"
    wd_width_scaling: Literal["constant", "inverse"] = "constant"
    init_std: float = 0.02
    readout: Literal["multiplier", "init"] = "multiplier"
    attention: Literal["mup", "inverse", "sp"] = "mup"
    zero_init_readout: bool = False
    zero_init_query: bool = False
    # the transferable base-model multipliers (HP_MULTIPLIERS): "lr", "forward" or "init"
    lr_input: float = field(default=1.0, metadata={"hp": "lr"})
    lr_output: float = field(default=1.0, metadata={"hp": "lr"})
    lr_vector: float = field(default=1.0, metadata={"hp": "lr"})
    readout_scale: float = field(default=1.0, metadata={"hp": "forward"})
    init_input: float = field(default=1.0, metadata={"hp": "init"})
    init_output: float = field(default=1.0, metadata={"hp": "init"})
    attention_mult: float = field(default=1.0, metadata={"hp": "forward"})

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ("sp", "mup"))
        _one_of("wd_mode", self.wd_mode, ("coupled", "independent"))
        _one_of("wd_width_scaling", self.wd_width_scaling, ("constant", "inverse"))
        _one_of("readout", self.readout, ("multiplier", "init"))
        _one_of("attention", self.attention, ("mup", "inverse", "sp"))
        for name in ("base_width", "base_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if float(self.depth_alpha) not in rules.DEPTH_ALPHAS:
            raise ConfigError(f"depth_alpha must be one of 0, 0.5, 1, got {self.depth_alpha!r}")
        for name in ("init_std", *HP_MULTIPLIERS["init"]):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in (*HP_MULTIPLIERS["lr"], *HP_MULTIPLIERS["forward"]):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")

    @property
    def is_mup(self) -> bool:
        return self.kind == "mup"

    def width_mult(self, width: int) -> float:
        """m = width / base_width under μP; 1 under SP."""
        return width / self.base_width if self.is_mup else 1.0

    def depth_mult(self, depth: int) -> float:
        """m_L = depth / base_depth under μP with α > 0; 1 otherwise."""
        return depth / self.base_depth if self.is_mup and self.depth_alpha > 0 else 1.0

    def readout_multiplier(self, width: int) -> float:
        return self.readout_for(self.width_mult(width))

    def readout_for(self, m_in: float) -> float:
        """The readout's forward multiplier for a head whose input is ``m_in`` × the base
        width's (1 under SP): readout_scale × the rule's 1/m."""
        c = rules.readout_multiplier(m_in, self.readout) if self.is_mup else 1.0
        return self.readout_scale * c

    def lr_multiplier(self, role: rules.Role) -> float:
        """The base-model LR multiplier of a role (``lr_input``, ``lr_output``, ``lr_vector``;
        1 for hidden matrices)."""
        return {"input": self.lr_input, "output": self.lr_output, "vector": self.lr_vector}.get(
            role, 1.0
        )

    def init_multiplier(self, role: rules.Role) -> float:
        """The base-model init-std multiplier of a role (``init_input``, ``init_output``)."""
        return {"input": self.init_input, "output": self.init_output}.get(role, 1.0)

    def branch_multiplier(self, depth: int) -> float:
        return rules.branch_multiplier(self.depth_mult(depth), self.depth_alpha)

    def attention_scale(self, d_head: int, *, d_head_base: int) -> float:
        """Attention-logit scale for heads of size ``d_head`` whose size in the base model is
        ``d_head_base`` — ``base_width // n_heads`` when the head count is fixed, ``d_head``
        itself when heads are added at a fixed size (GPT-2, Llama), which leaves SP's
        1/sqrt(d_head) (RULES.md §3)."""
        if not self.is_mup:
            return self.attention_mult * rules.attention_scale(d_head, d_head, "sp")
        return self.attention_mult * rules.attention_scale(d_head, d_head_base, self.attention)

    def scales(self, rule: rules.OptimizerRule | str, info: ParamRole) -> rules.Scales:
        """All multipliers of one parameter under this parametrization and optimizer rule."""
        rule = rules.rule_for(rule) if isinstance(rule, str) else rule
        family, eps = rule.family(info.role), rule.eps_rule(info.role)
        if not self.is_mup:
            s = rules.param_scales(family, info.role, info.fan_in, info.fan_out, 1.0, 1.0, eps=eps)
        else:
            s = self._mup_scales(family, eps, info)
        return dataclasses.replace(
            s,
            lr=s.lr * self.lr_multiplier(info.role),
            init_std=s.init_std * self.init_multiplier(info.role),
        )

    def _mup_scales(
        self, family: rules.UpdateFamily, eps: str | None, info: ParamRole
    ) -> rules.Scales:
        return rules.param_scales(
            family,
            info.role,
            info.fan_in,
            info.fan_out,
            info.m_in,
            info.m_out,
            m_depth=info.m_depth if self.depth_alpha > 0 else 1.0,
            in_block=info.in_block,
            alpha=self.depth_alpha,
            readout=self.readout,
            eps=eps,
        )


# The transferable base-model multipliers by kind, read from Parametrization's field metadata
# (the one list): "lr" per-role LR, "forward" forward-pass constants, "init" init stds.
HP_MULTIPLIERS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in dataclasses.fields(Parametrization) if f.metadata.get("hp") == kind)
    for kind in ("lr", "forward", "init")
}
ALL_HP_MULTIPLIERS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Parametrization) if "hp" in f.metadata
)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


# ----------------------------------------------------------------------------- model side


def model_roles(model: nn.Module) -> dict[str, ParamRole]:
    """The roles attached by ``parametrize`` (or by a bundled model), found through wrappers
    (``torch.compile``'s ``_orig_mod``, DDP's ``module``; FSDP2 keeps the module itself)."""
    roles = smup_attr(model, "smup_roles")
    if roles is None:
        raise ConfigError(
            "model has no roles; call spectral_mup.parametrize(model, p, base=...) first "
            "or pass roles=infer_roles(...)"
        )
    return roles


def smup_attr(model: nn.Module, name: str) -> Any:
    """``model.<name>`` (``smup_roles``, ``smup_splits``), found through wrappers that hold
    the user's module as a child: ``torch.compile``'s ``_orig_mod``, DDP's ``module``, FSDP1's
    ``_fsdp_wrapped_module`` (``roles.WRAPPER_ATTRS``; FSDP2 keeps the module itself).
    ``None`` if none has it."""
    while True:
        value = getattr(model, name, None)
        if value is not None:
            return value
        children = model.__dict__.get("_modules", {})
        inner = next(
            (children[a] for a in WRAPPER_ATTRS if a in children),
            None,
        )
        if inner is None:
            return None
        model = inner


def _role_of(roles: dict[str, ParamRole], name: str) -> ParamRole:
    try:
        return roles[canonical_name(name)]
    except KeyError:
        raise ConfigError(f"parameter {name!r} has no role; infer roles on this model") from None


@torch.no_grad()
def init_weights(
    model: nn.Module,
    roles: dict[str, ParamRole],
    p: Parametrization,
    generator: torch.Generator | None = None,
) -> None:
    """Init every matrix with std σ_b·(rule multiplier) (zero for the head when
    ``p.zero_init_readout``); biases 0; norm gains 1; other vectors keep their module's init."""
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)] = module
    for name, param in model.named_parameters():
        info = _role_of(roles, name)
        if info.role == "vector":
            if name.endswith("bias"):
                param.zero_()
            elif isinstance(owners.get(canonical_name(name)), _NORMS):
                param.fill_(1.0)
            continue
        if info.role == "output" and p.zero_init_readout:
            param.zero_()
            continue
        m_in = info.m_in if p.is_mup else 1.0
        std = p.init_std * p.init_multiplier(info.role)
        std *= rules.init_std_multiplier(info.role, m_in, p.readout)
        param.normal_(0.0, std, generator=generator)


def parametrize(
    model: nn.Module,
    p: Parametrization,
    base: nn.Module | Shapes | str | os.PathLike,
    delta: nn.Module | Shapes | None = None,
    *,
    overrides: dict[str, rules.Role] | None = None,
    layouts: dict[str, str] | None = None,
    init: bool = True,
) -> dict[str, ParamRole]:
    """Make any ``nn.Module`` μP-ready (the hook for third-party models).

    Infers roles against ``base`` (and ``delta``) — modules, shape mappings or a shapes file
    written once by ``save_shapes`` (``roles.infer_roles``) —, stores them as ``model.smup_roles``,
    scales the input of every readout layer (a tied head included) by the readout multiplier
    with a forward pre-hook, and (``init=True``) re-initializes the weights. Attention
    scaling and residual branch multipliers are forward-pass changes the model must make
    itself: use ``p.attention_scale(d_head, d_head_base=...)`` and
    ``p.branch_multiplier(depth)``.
    ``layouts`` names how custom layers store their weights (``roles.infer_roles``).
    """
    if getattr(model, "smup_native", False):
        raise ConfigError(
            f"{type(model).__name__} applies μP itself; build it with the Parametrization "
            "instead of calling parametrize() on it"
        )
    roles = infer_roles(model, base, delta, overrides=overrides, layouts=layouts)
    check_tied(roles, p)
    model.smup_roles = roles
    remove_hooks(model, ReadoutMultiplier)  # parametrizing twice must not stack
    modules = dict(model.named_modules())
    readouts = {}  # parameter name (its module's weight) → readout multiplier
    for name, info in roles.items():
        if info.tied_readout is not None:  # the multiplier follows the tied tensor's width
            readouts[f"{info.tied_readout}.weight" if info.tied_readout else "weight"] = info.m_out
        elif info.role == "output":
            readouts[name] = info.m_in
    for name, m in readouts.items():
        c = p.readout_for(m)
        if c == 1.0:
            continue
        mod_name, _, p_name = name.rpartition(".")
        module = modules.get(mod_name) or modules.get(_wrapped_name(modules, mod_name))
        if p_name != "weight" or module_layout(module, "weight") not in ("linear", "transposed"):
            raise ConfigError(
                f"readout {name!r} is not the weight of a Linear/Conv/Conv1D, so its input cannot "
                "be scaled by a hook: wrap it in an nn.Linear, or build the Parametrization with "
                "readout='init' (no forward multiplier)"
            )
        module.register_forward_pre_hook(ReadoutMultiplier(c))
    if init:
        init_weights(model, roles, p)
    return roles


def check_tied(roles: dict[str, ParamRole], p: Parametrization) -> None:
    """A tied head takes the embedding's init and LR; the options that would give the shared
    tensor two different rules are errors (RULES.md §3, "Tied embedding and readout")."""
    tied = [name for name, info in roles.items() if info.tied_readout is not None]
    if tied and p.is_mup and p.readout == "init":
        raise ConfigError(
            f"{tied[0]} is tied to its readout: readout='init' would give the shared tensor two "
            "inits; use readout='multiplier' (the default) or untie the weights"
        )
    if tied and p.zero_init_readout:
        raise ConfigError(
            f"{tied[0]} is tied to its readout: zero_init_readout would zero the embedding; "
            "set zero_init_readout=False or untie the weights"
        )


def _wrapped_name(modules: dict[str, nn.Module], name: str) -> str:
    """The module name under a wrapper prefix (``_orig_mod.``, ``module.``) if present."""
    return next((n for n in modules if canonical_name(n) == name), name)


class ReadoutMultiplier:
    """Forward pre-hook: scale a readout layer's input by the readout multiplier. A class
    rather than a closure, so a parametrized model pickles; found (and replaced) by type
    when a model is parametrized again."""

    def __init__(self, multiplier: float):
        self.multiplier = multiplier

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.multiplier, *args[1:])


def remove_hooks(model: nn.Module, kind: type) -> None:
    """Remove every forward (pre-)hook of type ``kind`` from ``model``'s modules."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, kind)]:
                del hooks[key]


# ------------------------------------------------------------------------- optimizer side


def param_groups(
    model: nn.Module,
    p: Parametrization,
    rule: rules.OptimizerRule | str,
    lr: float,
    weight_decay: float = 0.0,
    *,
    eps: float | None = None,
    eps_key: str = "eps",
    roles: dict[str, ParamRole] | None = None,
    decay_vectors: bool = False,
    aux: dict[str, float] | None = None,
    splits: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Param groups with per-tensor ``lr``, ``weight_decay`` and (if given) ``eps`` (stored
    under ``eps_key``, the optimizer's name for it).

    One group per distinct set of values; each group also records ``role``, ``lr_mult``
    and the parameter ``names``. Vectors get no weight decay unless ``decay_vectors``.
    ``rule`` is the optimizer's ``rules.OptimizerRule`` (configured by its options; a
    registered name takes the default options). For an optimizer with two rules (Muon),
    parameters of the auxiliary rule take their base ``lr``/``weight_decay`` from ``aux``
    and their group has ``aux=True``. ``splits`` maps glob patterns to a number of equal
    row blocks or a tuple of row sizes (``split`` key; rows of the (fan_out, fan_in)
    operator). Weights stored transposed (``ParamRole.transposed``) get ``transposed=True``.
    Under a spectrally normalized rule (``rule.normalized``, §6) groups carry ``forward_mult``.
    """
    rule = rules.rule_for(rule) if isinstance(rule, str) else rule
    roles = roles if roles is not None else model_roles(model)
    routed = bool(rule.auxiliary)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        info = _role_of(roles, name)
        is_aux = rule.is_auxiliary(info.role)
        base_lr, base_wd = (
            (aux["lr"], aux["weight_decay"]) if is_aux and aux else (lr, weight_decay)
        )
        fam, s = rule.family(info.role), p.scales(rule, info)
        group_lr = base_lr * s.lr
        lam = base_wd if (info.role != "vector" or decay_vectors) else 0.0
        if p.wd_mode == "coupled":
            wd = lam * s.weight_decay
        else:
            width_factor = 1.0
            if p.is_mup and p.wd_width_scaling == "inverse":
                width_factor = 1.0 / info.width_mult
            wd = rules.independent_weight_decay(fam, lam, group_lr, width_factor)
        cname = canonical_name(name)  # patterns name the unwrapped model's parameters
        split = next((k for pat, k in (splits or {}).items() if fnmatch.fnmatchcase(cname, pat)), 1)
        key = (info.role, info.in_block, group_lr, wd, s.eps, is_aux, split, info.transposed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr": group_lr,
                "weight_decay": wd,
                "role": info.role,
                "in_block": info.in_block,
                "lr_mult": s.lr,
            }
            if eps is not None:
                groups[key][eps_key] = eps * s.eps
            if routed:
                groups[key]["aux"] = is_aux
            if splits:
                groups[key]["split"] = split
            if rule.normalized:
                groups[key]["forward_mult"] = s.forward
            if info.transposed:  # stored (fan_in, fan_out): matrix optimizers transpose it
                groups[key]["transposed"] = True
        groups[key]["params"].append(param)
        groups[key]["names"].append(canonical_name(name))
    return list(groups.values())

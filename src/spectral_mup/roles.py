"""Role inference: which dimensions of each parameter grow with width, and which live in
residual blocks that repeat with depth.

The idea is microsoft/mup's base shapes: build the same model at two widths and compare
parameter shapes. Here the result is a plain ``dict`` keyed by parameter name — no
metadata on tensors, so wrappers (torch.compile, DDP, FSDP) cannot drop it.

Layouts: ``nn.Linear``/``nn.ConvNd`` weights are ``(fan_out, fan_in, ...)``; ``nn.Embedding``
weights are ``(num_embeddings, dim)`` = ``(fan_in, fan_out)`` (one-hot input, RULES.md §1).
A 2-D parameter of any other module whose one growing dimension cannot be placed is an
error that names the ``overrides`` entry to add.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .rules import ROLES, Role

_WRAPPER_PREFIXES = (
    "_orig_mod.",
    "module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)


@dataclass(frozen=True)
class ParamRole:
    """How one parameter scales. ``fan_in``/``fan_out``: its layer's fans (a vector is a
    fan_in = 1 matrix); ``m_in``/``m_out``: the fans relative to the base model;
    ``m_depth``: number of blocks relative to the base (1 outside blocks)."""

    role: Role
    m_in: float = 1.0
    m_out: float = 1.0
    in_block: bool = False
    m_depth: float = 1.0
    fan_in: int = 1
    fan_out: int = 1

    @property
    def width_mult(self) -> float:
        """The multiplier of the dimension that grows (fan_in for the readout, else fan_out)."""
        return self.m_in if self.role == "output" else self.m_out


def canonical_name(name: str) -> str:
    """Parameter name with wrapper prefixes (torch.compile, DDP, FSDP1) removed."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._fsdp_wrapped_module.", ".").replace(
            "._checkpoint_wrapped_module.", "."
        )
    return name


def _template(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def _layouts(model: nn.Module) -> dict[str, str]:
    """'linear' (fan_out, fan_in, ...), 'embedding' (fan_in, fan_out) or 'unknown'."""
    out: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "weight" and isinstance(module, nn.Embedding | nn.EmbeddingBag):
                out[full] = "embedding"
            elif p_name == "weight" and isinstance(
                module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Bilinear
            ):
                out[full] = "linear"
            else:
                out.setdefault(full, "unknown")
    return out


def _shapes(model: nn.Module | Mapping[str, torch.Size | tuple[int, ...]]) -> dict[str, tuple]:
    if isinstance(model, nn.Module):
        return {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    return {canonical_name(n): tuple(s) for n, s in model.items()}


def infer_roles(
    model: nn.Module,
    base: nn.Module | Mapping[str, tuple[int, ...]],
    delta: nn.Module | Mapping[str, tuple[int, ...]] | None = None,
    *,
    overrides: Mapping[str, Role] | None = None,
) -> dict[str, ParamRole]:
    """Classify every parameter of ``model``.

    Args:
        model: the model to train.
        base: the same architecture at the base width and base depth (a module — build it
            on the ``meta`` device to make it free — or a name → shape mapping).
        delta: the same architecture at another width (and, optionally, another depth);
            needed when ``model`` has the base width. Dimensions that differ between
            ``base`` and ``delta`` (or ``model``) grow with width.
        overrides: glob pattern → role, for parameters that cannot be inferred.

    Parameters whose names exist only at some depths (indices of a repeated block, e.g.
    ``blocks.3.mlp.c_fc.weight``) mark their block template ``blocks.*.mlp.c_fc.weight``;
    every parameter matching such a template is ``in_block`` and its ``m_depth`` is the
    ratio of its template's count in ``model`` to that in ``base``.
    """
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise ConfigError(f"override {pattern!r}: unknown role {role!r} (use one of {ROLES})")
    model_shapes = _shapes(model)
    base_shapes = _shapes(base)
    other_shapes = _shapes(delta) if delta is not None else model_shapes
    layouts = {canonical_name(k): v for k, v in _layouts(model).items()}

    name_sets = [set(model_shapes), set(base_shapes), set(other_shapes)]
    all_names = set().union(*name_sets)
    varying = all_names - set.intersection(*name_sets)
    block_templates = {_template(n) for n in varying}
    base_counts = Counter(_template(n) for n in base_shapes)
    model_counts = Counter(_template(n) for n in model_shapes)
    base_by_template = {_template(n): s for n, s in base_shapes.items()}
    other_by_template = {_template(n): s for n, s in other_shapes.items()}

    def counterpart(shapes: dict[str, tuple], by_template: dict[str, tuple], name: str):
        # exact name first; a block index the other model lacks falls back to its template
        return shapes.get(name, by_template.get(_template(name)))

    roles: dict[str, ParamRole] = {}
    for name, shape in model_shapes.items():
        tpl = _template(name)
        base_shape = counterpart(base_shapes, base_by_template, name)
        other_shape = counterpart(other_shapes, other_by_template, name)
        if base_shape is None or other_shape is None:
            raise ConfigError(
                f"parameter {name!r} has no counterpart in the base/delta model; "
                "build them from the same architecture"
            )
        if len(base_shape) != len(shape) or len(other_shape) != len(shape):
            raise ConfigError(
                f"parameter {name!r} changes rank between widths: {base_shape} vs {shape}"
            )
        grows = [b != o or b != s for b, o, s in zip(base_shape, other_shape, shape, strict=True)]
        mults = [s / b for s, b in zip(shape, base_shape, strict=True)]
        in_block = tpl in block_templates
        m_depth = model_counts[tpl] / base_counts[tpl] if in_block else 1.0
        forced = next((r for pat, r in overrides.items() if fnmatch.fnmatchcase(name, pat)), None)
        role, m_in, m_out, fan_in, fan_out = _classify(
            name, shape, grows, mults, layouts.get(name, "unknown"), forced
        )
        roles[name] = ParamRole(role, m_in, m_out, in_block, m_depth, fan_in, fan_out)
    return roles


def _classify(
    name: str,
    shape: tuple,
    grows: list[bool],
    mults: list[float],
    layout: str,
    forced: Role | None,
) -> tuple[Role, float, float, int, int]:
    if len(shape) <= 1:
        m = mults[0] if shape else 1.0
        if forced not in (None, "vector"):
            raise ConfigError(
                f"override for {name!r}: a {len(shape)}-D parameter can only be 'vector'"
            )
        return "vector", 1.0, m, 1, shape[0] if shape else 1
    if layout == "embedding":
        out_dim, in_dims = 1, [0]
    elif layout == "linear" or (forced is None and grows[0] == grows[1]):
        out_dim, in_dims = 0, list(range(1, len(shape)))
    elif forced is not None:
        # the override says which growing dimension is which
        growing = [i for i, g in enumerate(grows) if g]
        if forced == "input":
            out_dim = growing[0] if growing else 0
        elif forced == "output":
            out_dim = next(i for i in range(len(shape)) if i not in growing)
        else:
            out_dim = 0
        in_dims = [i for i in range(len(shape)) if i != out_dim]
    else:
        raise ConfigError(
            f"cannot tell fan_in from fan_out of {name!r} (shape {shape}, owned by a module "
            f"that is not Linear/Embedding/Conv); pass overrides={{{name!r}: 'input' or 'output'}}"
        )
    m_out, fan_out = mults[out_dim], shape[out_dim]
    m_in, fan_in = 1.0, 1
    for i in in_dims:
        m_in *= mults[i]
        fan_in *= shape[i]
    out_grows = grows[out_dim]
    in_grows = any(grows[i] for i in in_dims)
    inferred: Role
    if out_grows and in_grows:
        inferred = "hidden"
    elif in_grows:
        inferred = "output"
    else:
        inferred = "input"  # fan_in fixed; a matrix with no growing dimension has every rule 1
    return forced or inferred, m_in, m_out, fan_in, fan_out
